"""fastmoe_adv.data: official file formats (written here in the exact layouts), the restricted
unpickler, the synthetic generator, and DeviceLoader's order, augmentation, sharding and resume."""
import io
import os
import pickle
import re
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmoe_adv.data import (
    DATASET_INFO,
    DATASETS,
    DeviceLoader,
    UnsafePickleError,
    augment,
    channel_stats,
    dataset_info,
    holdout_indices,
    load_dataset,
    load_npz,
    make_synthetic,
    save_npz,
)

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------- official formats
def _cifar_batch(n, seed, label_name=b"training batch 1 of 5", str_keys=False):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]          # a list of Python ints, as shipped
    d = {b"batch_label": label_name, b"labels": labels, b"data": data,
         b"filenames": [b"img_%05d.png" % i for i in range(n)]}
    if str_keys:   # how the Python-2 originals read back under encoding="latin1"
        d = {k.decode(): v for k, v in d.items()}
    return d


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)                               # the originals are protocol 2


def write_cifar(root, n=6, str_keys=False):
    """root/cifar-10-batches-py/ in the official layout; returns {file name: batch dict}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batches[name] = _cifar_batch(n, seed=i, str_keys=str_keys)
        _write_pickle(folder / name, batches[name])
    _write_pickle(folder / "batches.meta", {b"num_cases_per_batch": n, b"num_vis": 3072,
                                            b"label_names": [s.encode() for s in CIFAR_NAMES]})
    return batches


def _labels(batch):
    return batch.get(b"labels", batch.get("labels"))


def _data(batch):
    return batch.get(b"data", batch.get("data"))


@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar_folder_reads_official_layout(tmp_path, str_keys):
    batches = write_cifar(tmp_path, n=6, str_keys=str_keys)
    x, y = load_dataset("cifar10", root=tmp_path, split="train")
    assert x.dtype == torch.uint8 and x.shape == (30, 3, 32, 32)
    assert y.dtype == torch.int64 and y.shape == (30,)
    want_y = sum((_labels(batches[f"data_batch_{k}"]) for k in range(1, 6)), [])
    assert y.tolist() == want_y                                      # batches 1..5 in order
    # Row-major R, G, B planes: column 1024*c + 32*row + col is channel c, pixel (row, col).
    d2 = _data(batches["data_batch_2"])
    for i, c, r, col in [(0, 0, 0, 0), (3, 1, 5, 7), (5, 2, 31, 30), (2, 2, 17, 0)]:
        assert x[6 + i, c, r, col].item() == d2[i, 1024 * c + 32 * r + col]
    xt, yt = load_dataset("cifar10", root=tmp_path, split="test")
    assert xt.shape == (6, 3, 32, 32)
    assert torch.equal(xt, torch.from_numpy(_data(batches["test_batch"]).reshape(6, 3, 32, 32)))
    assert yt.tolist() == _labels(batches["test_batch"])


def py2_batch_pickle(data, labels):
    """A CIFAR batch byte for byte as Python 2 with numpy 1.x wrote it: protocol 2, py2 ``str``
    keys (SHORT_BINSTRING), the array rebuilt by numpy.core.multiarray._reconstruct from raw
    bytes stored as a py2 ``str`` (BINSTRING). Python 3 cannot produce these opcodes itself."""
    def s(b):
        return b"U" + bytes([len(b)]) + b

    def i(v):
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

    n, d = data.shape
    raw = data.tobytes()
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
             + b"(" + i(1) + i(n) + i(d) + b"\x86"
             + b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"
             + b"(" + i(3) + s(b"|") + b"NNN" + b"J\xff\xff\xff\xffJ\xff\xff\xff\xff" + i(0) + b"tb"
             + b"\x89" + b"T" + struct.pack("<i", len(raw)) + raw + b"tb")
    label_list = b"](" + b"".join(i(int(v)) for v in labels) + b"e"
    return (b"\x80\x02}(" + s(b"batch_label") + s(b"testing batch 1 of 1") + s(b"data") + array
            + s(b"labels") + label_list + s(b"filenames") + b"](" + s(b"img.png") * n + b"eu.")


def test_cifar_python2_written_batch(tmp_path):
    write_cifar(tmp_path, n=4)
    data = np.random.default_rng(7).integers(0, 256, size=(5, 3072), dtype=np.uint8)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(py2_batch_pickle(data, [3, 0, 9, 1, 1]))
    x, y = load_dataset("cifar10", root=tmp_path, split="test")
    assert torch.equal(x, torch.from_numpy(data).view(5, 3, 32, 32)) and y.tolist() == [3, 0, 9, 1, 1]


def test_cifar_tar_gz_archive_matches_folder(tmp_path):
    src = tmp_path / "src"
    write_cifar(src, n=4)
    archive_root = tmp_path / "archive"
    archive_root.mkdir()
    with tarfile.open(archive_root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    for split in ("train", "test"):
        xa, ya = load_dataset("cifar10", root=archive_root, split=split)
        xf, yf = load_dataset("cifar10", root=src, split=split)
        assert torch.equal(xa, xf) and torch.equal(ya, yf)
    assert sorted(p.name for p in archive_root.iterdir()) == ["cifar-10-python.tar.gz"]   # read in place


def test_cifar_size_subset_is_seeded(tmp_path):
    write_cifar(tmp_path, n=6)
    x, y = load_dataset("cifar10", root=tmp_path, size=10, seed=3)
    x2, y2 = load_dataset("cifar10", root=tmp_path, size=10, seed=3)
    assert x.shape[0] == 10 and torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="30 images"):
        load_dataset("cifar10", root=tmp_path, size=31)


def test_cifar_missing_files_message(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar10", root=tmp_path, split="train")
    msg = str(info.value)
    for part in ("data_batch_1", "data_batch_5", "cifar-10-python.tar.gz", str(tmp_path),
                 "https://www.cs.toronto.edu/~kriz/cifar.html", "CIFAR-10 python version"):
        assert part in msg
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_dataset("cifar10", root=tmp_path, split="test")
    try:
        import torchvision  # noqa: F401
    except Exception:
        with pytest.raises(FileNotFoundError, match="torchvision could not be imported"):
            load_dataset("cifar10", root=tmp_path, split="test", download=True)


def _corrupt_batches():
    good = pickle.dumps(_cifar_batch(4, seed=0), protocol=2)
    wrong_shape = _cifar_batch(4, seed=0)
    wrong_shape[b"data"] = wrong_shape[b"data"][:, :100]
    bad_labels = _cifar_batch(4, seed=0)
    bad_labels[b"labels"] = [0, 1, 2, 10]
    short_labels = _cifar_batch(4, seed=0)
    short_labels[b"labels"] = [0, 1]
    float_data = _cifar_batch(4, seed=0)
    float_data[b"data"] = float_data[b"data"].astype(np.float32)
    return {
        "not a pickle": b"this is not a pickle at all",
        "truncated": good[: len(good) // 2],
        "wrong keys": pickle.dumps({b"images": np.zeros((4, 3072), np.uint8)}, protocol=2),
        "not a dict": pickle.dumps([1, 2, 3], protocol=2),
        "wrong shape": pickle.dumps(wrong_shape, protocol=2),
        "label 10": pickle.dumps(bad_labels, protocol=2),
        "label count": pickle.dumps(short_labels, protocol=2),
        "float data": pickle.dumps(float_data, protocol=2),
    }


@pytest.mark.parametrize("case", list(_corrupt_batches()))
def test_cifar_corrupt_batch_is_value_error(tmp_path, case):
    write_cifar(tmp_path, n=4)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(_corrupt_batches()[case])
    with pytest.raises(ValueError, match="test_batch"):
        load_dataset("cifar10", root=tmp_path, split="test")


class _RunsCode:
    """Unpickling this calls os.system: the classic malicious pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_cifar_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_RunsCode(marker), protocol=2)
    pickle.loads(evil)                      # the payload is live: plain pickle would run it
    assert marker.exists()
    marker.unlink()

    write_cifar(tmp_path, n=4)
    batch = _cifar_batch(4, seed=0)
    batch[b"filenames"] = _RunsCode(marker)
    _write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", batch)
    with pytest.raises(UnsafePickleError) as info:
        load_dataset("cifar10", root=tmp_path, split="test")
    assert not marker.exists()
    assert "test_batch" in str(info.value) and "system" in str(info.value)
    assert isinstance(info.value, ValueError)

    _write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": _CallsEval(), b"labels": []})
    with pytest.raises(UnsafePickleError, match="eval"):
        load_dataset("cifar10", root=tmp_path, split="test")


def test_cifar_unpickler_refuses_other_codecs(tmp_path):
    # _codecs.encode is allowed only for latin1, the one encoding protocol-2 bytes use.
    import codecs

    class Zipped:
        def __reduce__(self):
            return (codecs.encode, ("x", "zlib"))

    write_cifar(tmp_path, n=4)
    _write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": Zipped(), b"labels": []})
    with pytest.raises(UnsafePickleError, match="zlib"):
        load_dataset("cifar10", root=tmp_path, split="test")


# ----------------------------------------------------------------------------- SVHN
def write_svhn(root, split, n, seed=0):
    from scipy.io import savemat
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = rng.integers(1, 11, size=(n, 1)).astype(np.uint8)            # 1..10, 10 = digit 0
    y[0, 0], y[1, 0] = 10, 3
    savemat(str(root / f"{split}_32x32.mat"), {"X": X, "y": y})
    return X, y


def test_svhn_reads_official_layout(tmp_path):
    pytest.importorskip("scipy")
    X, y = write_svhn(tmp_path, "train", 7)
    x, lab = load_dataset("svhn", root=tmp_path, split="train")
    assert x.dtype == torch.uint8 and x.shape == (7, 3, 32, 32) and lab.dtype == torch.int64
    assert lab[0].item() == 0 and lab[1].item() == 3
    assert lab.tolist() == [0 if v == 10 else int(v) for v in y[:, 0]]
    for i, c, h, w in [(0, 0, 0, 0), (2, 1, 4, 9), (6, 2, 31, 3), (3, 0, 10, 31)]:
        assert x[i, c, h, w].item() == X[h, w, c, i]                  # X[h, w, c, n] -> [n, c, h, w]
    Xe, _ = write_svhn(tmp_path, "extra", 3, seed=1)
    xe, _ = load_dataset("svhn", root=tmp_path, split="extra")
    assert torch.equal(xe, torch.from_numpy(Xe.transpose(3, 2, 0, 1).copy()))


def test_svhn_missing_and_corrupt(tmp_path):
    pytest.importorskip("scipy")
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("svhn", root=tmp_path, split="test")
    assert "test_32x32.mat" in str(info.value) and "http://ufldl.stanford.edu/housenumbers/" in str(info.value)
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB garbage" * 20)
    with pytest.raises(ValueError, match="test_32x32.mat"):
        load_dataset("svhn", root=tmp_path, split="test")
    from scipy.io import savemat
    savemat(str(tmp_path / "test_32x32.mat"), {"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1))})
    with pytest.raises(ValueError, match=r"\[32, 32, 3, N\]"):
        load_dataset("svhn", root=tmp_path, split="test")
    savemat(str(tmp_path / "test_32x32.mat"), {"images": np.zeros((32, 32, 3, 2), np.uint8)})
    with pytest.raises(ValueError, match="'X' and 'y'"):
        load_dataset("svhn", root=tmp_path, split="test")


# ----------------------------------------------------------------------------- names, synthetic
def test_unknown_dataset_and_split():
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet")
    assert all(name in str(info.value) for name in ("cifar10", "svhn", "synthetic"))
    with pytest.raises(ValueError, match="train, test, extra"):
        load_dataset("svhn", split="validation")
    with pytest.raises(ValueError, match="train, test"):
        load_dataset("synthetic", split="extra")


def test_dataset_info():
    assert set(DATASET_INFO) == {"cifar10", "svhn", "synthetic"}
    assert DATASET_INFO["cifar10"]["mean"] == (0.4914, 0.4822, 0.4465)
    assert DATASET_INFO["svhn"]["std"] == (0.1980, 0.2010, 0.1970)
    assert DATASET_INFO["cifar10"]["flip"] and not DATASET_INFO["svhn"]["flip"]
    assert not DATASET_INFO["synthetic"]["flip"]
    for info in DATASET_INFO.values():
        assert info["num_classes"] == len(info["classes"]) == 10
    x, _ = make_synthetic(2000, seed=5)
    xf = x.float() / 255
    mean, std = xf.mean((0, 2, 3)), xf.std((0, 2, 3))
    assert torch.allclose(mean, torch.tensor(DATASET_INFO["synthetic"]["mean"]), atol=0.01)
    assert torch.allclose(std, torch.tensor(DATASET_INFO["synthetic"]["std"]), atol=0.01)


def test_synthetic_deterministic_and_seeded():
    x1, y1 = load_dataset("synthetic", split="train", seed=0, size=1500)
    x2, y2 = load_dataset("synthetic", split="train", seed=0, size=1500)
    x3, _ = load_dataset("synthetic", split="train", seed=1, size=1500)
    xt, _ = load_dataset("synthetic", split="test", seed=0, size=1500)
    assert x1.dtype == torch.uint8 and x1.shape == (1500, 3, 32, 32) and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3) and not torch.equal(x1, xt)
    xs, ys = load_dataset("synthetic", split="train", seed=0, size=700)
    assert torch.equal(xs, x1[:700]) and torch.equal(ys, y1[:700])   # smaller size = prefix
    assert torch.bincount(y1[:1000], minlength=10).tolist() == [100] * 10
    x, y = load_dataset("synthetic", split="test")
    assert x.shape[0] == y.shape[0] == 1000


def test_synthetic_default_train_size():
    x, y = load_dataset("synthetic")
    assert x.shape == (5000, 3, 32, 32) and y.min() == 0 and y.max() == 9


def _small_cnn(width=16):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.Conv2d(2 * width, 4 * width, 3, padding=1, stride=2), nn.BatchNorm2d(4 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10))


def test_small_cnn_learns_synthetic():
    torch.manual_seed(0)
    xtr, ytr = load_dataset("synthetic", split="train", size=3000)
    xte, yte = load_dataset("synthetic", split="test", size=1000)
    loader = DeviceLoader(xtr, ytr, 100, augment=True, dataset="synthetic", drop_last=True, seed=0)
    model = _small_cnn()
    epochs = 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.2, total_steps=epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte.float() / 255).argmax(1) == yte).float().mean().item()
    print(f"clean test accuracy {acc:.3f}")
    assert acc > 0.8, f"clean test accuracy {acc:.3f}"


# ----------------------------------------------------------------------------- augmentation
def _is_crop_of(out, img, pad, allow_flip):
    padded = F.pad(img[None].float(), (pad,) * 4, mode="reflect")[0]
    h, w = img.shape[1:]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            if torch.equal(crop, out.float()) or (allow_flip and torch.equal(crop.flip(2), out.float())):
                return True
    return False


def test_augment_is_reflect_crop_plus_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    out = augment(x, torch.Generator().manual_seed(1), pad=4, flip=True)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert all(_is_crop_of(out[i], x[i], 4, allow_flip=True) for i in range(len(x)))
    assert not torch.equal(out, x)
    out_nf = augment(x, torch.Generator().manual_seed(1), pad=4, flip=False)
    assert all(_is_crop_of(out_nf[i], x[i], 4, allow_flip=False) for i in range(len(x)))
    assert torch.equal(augment(x, g, pad=0, flip=False), x)
    flipped = augment(x, torch.Generator().manual_seed(2), pad=0, flip=True)
    is_flip = [torch.equal(flipped[i], x[i].flip(2)) for i in range(len(x))]
    assert all(is_flip[i] or torch.equal(flipped[i], x[i]) for i in range(len(x))) and 0 < sum(is_flip) < len(x)
    xf = torch.rand(5, 3, 32, 32)
    of = augment(xf, torch.Generator().manual_seed(3))
    assert of.dtype == torch.float32 and of.min() >= 0 and of.max() <= 1
    with pytest.raises(ValueError, match="pad"):
        augment(xf, g, pad=32)


# ----------------------------------------------------------------------------- DeviceLoader
def _id_data(n):
    """Images whose pixels encode the sample index, labels = index (to track samples)."""
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    return images, torch.arange(n)


def test_loader_each_sample_once_per_epoch():
    images, labels = _id_data(50)
    loader = DeviceLoader(images, labels, 7, seed=3)
    assert len(loader) == 8
    orders = []
    for _ in range(2):
        ys = []
        for x, y in loader:
            assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.min() >= 0 and x.max() <= 1
            assert torch.equal(x, images[y].float() / 255)            # no augmentation by default
            ys.append(y)
        ys = torch.cat(ys)
        assert sorted(ys.tolist()) == list(range(50))
        orders.append(ys)
    assert not torch.equal(orders[0], orders[1])                      # a new permutation each epoch
    assert loader.epoch == 2
    dl = DeviceLoader(images, labels, 7, drop_last=True)
    assert len(dl) == 7 and sum(len(y) for _, y in dl) == 49
    ordered = torch.cat([y for _, y in DeviceLoader(images, labels, 16, shuffle=False)])
    assert ordered.tolist() == list(range(50))


def test_loader_augmentation_shape_range_and_flip_policy():
    images, labels = _id_data(40)
    aug = DeviceLoader(images, labels, 10, augment=True, dataset="cifar10")
    for x, y in aug:
        assert x.shape == (10, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
        assert all(_is_crop_of((x[i] * 255).round().to(torch.uint8), images[y[i]], 4, True) for i in range(10))
    # pad=0 isolates the flip: cifar10 flips some images, svhn and synthetic none.
    x, y = next(iter(DeviceLoader(images, labels, 40, augment=True, pad=0, dataset="cifar10")))
    assert not torch.equal(x, images[y].float() / 255)
    for name in ("svhn", "synthetic"):
        x, y = next(iter(DeviceLoader(images, labels, 40, augment=True, pad=0, dataset=name)))
        assert torch.equal(x, images[y].float() / 255)
    x, y = next(iter(DeviceLoader(images, labels, 40, augment=True, pad=0, flip=False)))
    assert torch.equal(x, images[y].float() / 255)


@pytest.mark.parametrize("n,world,drop_last",
                         [(50, 2, False), (50, 2, True), (64, 2, False), (51, 3, False), (53, 3, False)])
def test_loader_shards_concatenate_to_single_rank(n, world, drop_last):
    images, labels = _id_data(n)
    b = 4
    kw = dict(augment=True, dataset="cifar10", seed=11, drop_last=drop_last)
    single = DeviceLoader(images, labels, b * world, **kw)
    ranks = [DeviceLoader(images, labels, b, rank=r, world_size=world, **kw) for r in range(world)]
    assert len({len(single), *map(len, ranks)}) == 1
    for _ in range(2):                                                # two epochs
        batches = [list(r) for r in ranks]
        ref = list(single)
        assert all(len(bs) == len(ranks[0]) for bs in batches)
        for k in range(len(ranks[0])):
            x = torch.cat([bs[k][0] for bs in batches])
            y = torch.cat([bs[k][1] for bs in batches])
            assert torch.equal(x, ref[k][0]) and torch.equal(y, ref[k][1])
        for k in range(len(ranks[0])):                                # disjoint slices
            ids = torch.cat([bs[k][1] for bs in batches])
            assert len(set(ids.tolist())) == len(ids)


def test_loader_partial_batch_smaller_than_world_is_dropped():
    images, labels = _id_data(49)                                     # 49 = 4 * 12 + 1
    ranks = [DeviceLoader(images, labels, 4, rank=r, world_size=3) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]                       # 12-row global batches; 1 left over
    images, labels = _id_data(50)                                     # 50 = 12 * 4 + 2: 2 < 3 ranks
    ranks = [DeviceLoader(images, labels, 4, rank=r, world_size=3) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]
    images, labels = _id_data(51)                                     # 3 left over: one row per rank
    ranks = [DeviceLoader(images, labels, 4, rank=r, world_size=3) for r in range(3)]
    assert [len(r) for r in ranks] == [5, 5, 5]
    assert [len(list(r)[-1][1]) for r in ranks] == [1, 1, 1]


@pytest.mark.parametrize("stop_after", [3, 7, 8, 12])
def test_loader_resume_gives_same_batches(stop_after):
    images, labels = _id_data(30)
    kw = dict(augment=True, dataset="cifar10", seed=5)
    ref_loader = DeviceLoader(images, labels, 4, **kw)                # 8 batches per epoch
    reference = [b for _ in range(3) for b in ref_loader]

    first = DeviceLoader(images, labels, 4, **kw)
    seen, it = [], iter(first)
    while len(seen) < stop_after:
        try:
            seen.append(next(it))
        except StopIteration:
            it = iter(first)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)                               # must survive weights_only loading
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    resumed = DeviceLoader(images, labels, 4, **kw)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert rest, "a loader resumed at an epoch's end must start the next epoch, not yield an empty one"
    while len(seen) + len(rest) < len(reference):
        rest.extend(resumed)
    got = seen + rest[: len(reference) - len(seen)]
    for (xa, ya), (xb, yb) in zip(got, reference):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_loader_state_mismatch_and_bad_input():
    images, labels = _id_data(30)
    state = DeviceLoader(images, labels, 4).state_dict()
    with pytest.raises(ValueError, match="global_batch_size"):
        DeviceLoader(images, labels, 5).load_state_dict(state)
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(images.float(), labels, 4)
    with pytest.raises(ValueError, match="rank"):
        DeviceLoader(images, labels, 4, rank=2, world_size=2)


# ----------------------------------------------------------------------------- holdout split
def _rows(images):
    return [bytes(row) for row in images.reshape(len(images), -1).numpy()]


def test_holdout_indices_fixed_nested_and_refused():
    a = holdout_indices(1000, 50, seed=0)
    assert a.dtype == torch.int64 and a.shape == (50,) and torch.equal(a, a.sort().values)
    assert len(set(a.tolist())) == 50 and 0 <= a.min() and a.max() < 1000
    assert torch.equal(a, holdout_indices(1000, 50, seed=0))
    assert not torch.equal(a, holdout_indices(1000, 50, seed=1))
    assert set(a.tolist()) < set(holdout_indices(1000, 80, seed=0).tolist())   # smaller holdout: a subset
    # Spread over the whole split, not a block: a quarter of the range holds roughly a quarter.
    assert 5 <= int((a < 250).sum()) <= 20
    # Pinned values: the choice must never change under a library upgrade (splitmix64, no torch/numpy RNG).
    assert holdout_indices(10, 3, seed=0).tolist() == [1, 4, 5]
    assert holdout_indices(50000, 4, seed=3).tolist() == [468, 23731, 25637, 34154]
    with pytest.raises(ValueError, match="fewer images than the 1000"):
        holdout_indices(1000, 1000)
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="holdout"):
            holdout_indices(1000, bad)
    with pytest.raises(ValueError, match="holdout_seed"):
        holdout_indices(1000, 5, seed=-1)


def test_cifar_holdout_disjoint_deterministic_and_unaffected_by_size(tmp_path):
    write_cifar(tmp_path, n=20)                                       # 100 training images
    full_x, full_y = load_dataset("cifar10", root=tmp_path)
    hx, hy = load_dataset("cifar10", root=tmp_path, split="holdout", holdout=15)
    tx, ty = load_dataset("cifar10", root=tmp_path, split="train", holdout=15)
    idx = holdout_indices(100, 15, seed=0)
    assert torch.equal(hx, full_x[idx]) and torch.equal(hy, full_y[idx])
    assert len(tx) == 85 and len(set(_rows(tx)) & set(_rows(hx))) == 0            # disjoint
    assert sorted(_rows(tx) + _rows(hx)) == sorted(_rows(full_x))                 # union = the split
    rest = [i for i in range(100) if i not in set(idx.tolist())]
    assert torch.equal(tx, full_x[rest]) and torch.equal(ty, full_y[rest])        # file order kept
    # The holdout ignores size and seed; size subsets only the remaining training images.
    for size, seed in ((10, 0), (None, 7), (40, 3)):
        h2 = load_dataset("cifar10", root=tmp_path, split="holdout", holdout=15, size=None, seed=seed)[0]
        assert torch.equal(h2, hx)
        t2, _ = load_dataset("cifar10", root=tmp_path, split="train", holdout=15, size=size, seed=seed)
        assert len(t2) == (size or 85) and set(_rows(t2)) <= set(_rows(tx))
    h3 = load_dataset("cifar10", root=tmp_path, split="holdout", holdout=15, holdout_seed=1)[0]
    assert not torch.equal(h3, hx)
    assert torch.equal(load_dataset("cifar10", root=tmp_path, split="test", holdout=15)[0],
                       load_dataset("cifar10", root=tmp_path, split="test")[0])  # test split untouched
    with pytest.raises(ValueError, match="85 images"):
        load_dataset("cifar10", root=tmp_path, holdout=15, size=86)
    with pytest.raises(ValueError, match="fewer images than the 100"):
        load_dataset("cifar10", root=tmp_path, split="holdout", holdout=100)
    with pytest.raises(ValueError, match="needs holdout=N"):
        load_dataset("cifar10", root=tmp_path, split="holdout")
    with pytest.raises(ValueError, match="holdout"):
        load_dataset("cifar10", root=tmp_path, holdout=-3)


def test_synthetic_holdout_fixed_when_train_size_changes():
    hx, hy = load_dataset("synthetic", split="holdout", holdout=200, seed=2)
    full_x, _ = load_dataset("synthetic", seed=2)                                 # the default 5000
    assert torch.equal(hx, full_x[holdout_indices(5000, 200)])
    held = set(_rows(hx))
    for size in (300, 5100):                                          # 5100 > 5000 - 200: generated beyond
        tx, ty = load_dataset("synthetic", split="train", holdout=200, size=size, seed=2)
        assert len(tx) == len(ty) == size and not held & set(_rows(tx))
    tx, _ = load_dataset("synthetic", split="train", holdout=200, seed=2)
    assert len(tx) == 4800 and sorted(_rows(tx) + _rows(hx)) == sorted(_rows(full_x))
    assert torch.equal(load_dataset("synthetic", split="train", holdout=200, size=300, seed=2)[0], tx[:300])
    with pytest.raises(ValueError, match="fewer images than the 5000"):
        load_dataset("synthetic", split="holdout", holdout=5000)


# ----------------------------------------------------------------------------- npz format
def _npz_arrays(n=12, seed=0, layout="nhwc"):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 4, size=n).astype(np.int32)
    y[:4] = [0, 1, 2, 3]
    return (x if layout == "nhwc" else x.transpose(0, 3, 1, 2).copy()), y


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_npz_images_labels_file(tmp_path, layout):
    x, y = _npz_arrays(12, layout=layout)
    path = tmp_path / "set.npz"
    np.savez(path, images=x, labels=y)
    images, labels = load_dataset("npz", root=path)
    want = x.transpose(0, 3, 1, 2) if layout == "nhwc" else x
    assert images.dtype == torch.uint8 and images.shape == (12, 3, 32, 32) and images.is_contiguous()
    assert torch.equal(images, torch.from_numpy(want.copy()))
    assert labels.dtype == torch.int64 and labels.tolist() == y.tolist()
    info = dataset_info("npz", path)
    assert info["num_classes"] == 4 and info["classes"] == ("0", "1", "2", "3") and info["flip"] is False
    assert info["splits"] == ("train",) and info["sizes"] == {"train": 12}
    # No mean/std in the file: computed from its training images, and said so.
    xf = torch.from_numpy(want.astype(np.float64) / 255)
    assert np.allclose(info["mean"], xf.mean((0, 2, 3)).numpy(), atol=1e-12)
    assert np.allclose(info["std"], xf.std((0, 2, 3), correction=0).numpy(), atol=1e-12)
    assert "computed from the file's 12 training images" in info["mean_source"]
    with pytest.raises(ValueError, match="no split 'test'.*holdout"):
        load_dataset("npz", root=path, split="test")
    hx, _ = load_dataset("npz", root=path, split="holdout", holdout=3)
    tx, _ = load_dataset("npz", root=path, split="train", holdout=3)
    assert torch.equal(hx, images[holdout_indices(12, 3)]) and len(tx) == 9


def test_npz_train_test_file_with_stats_and_classes(tmp_path):
    x, y = _npz_arrays(10, seed=1)
    xt, yt = _npz_arrays(6, seed=2, layout="nchw")
    path = tmp_path / "tt.npz"
    np.savez(path, train_images=x, train_labels=y, test_images=xt, test_labels=yt.astype(np.uint8),
             mean=np.array([0.5, 0.4, 0.3], np.float32), std=np.array([0.2, 0.25, 0.3]),
             classes=np.array(["cat", "dog", "emu", "fox", "gnu"]), flip=np.array(True))
    train, test = load_npz(path, "train"), load_npz(path, "test")
    assert torch.equal(train[0], torch.from_numpy(x.transpose(0, 3, 1, 2).copy())) and train[1].tolist() == y.tolist()
    assert torch.equal(test[0], torch.from_numpy(xt)) and test[1].dtype == torch.int64
    assert torch.equal(load_dataset("npz", path, split="test")[0], test[0])
    info = dataset_info("npz", str(path))
    assert info["num_classes"] == 5 and info["classes"][4] == "gnu" and info["flip"] is True
    assert info["mean"] == pytest.approx((0.5, 0.4, 0.3)) and info["std"] == (0.2, 0.25, 0.3)
    assert info["mean_source"] == "file" and info["sizes"] == {"train": 10, "test": 6}
    assert "npz" in DATASETS and "npz" not in DATASET_INFO


def _bad_npz_cases():
    x, y = _npz_arrays(6)
    return {
        "float images": (dict(images=x.astype(np.float32), labels=y), "'images' must be uint8"),
        "28x28 images": (dict(images=x[:, :28, :28], labels=y), r"\[N, 32, 32, 3\] or \[N, 3, 32, 32\]"),
        "grey images": (dict(images=x[..., 0], labels=y), "'images' must be uint8"),
        "float labels": (dict(images=x, labels=y.astype(np.float32)), "'labels' must be integer"),
        "2-D labels": (dict(images=x, labels=y[:, None]), "'labels' must be integer labels"),
        "negative label": (dict(images=x, labels=np.array([0, 1, -1, 2, 0, 1])), r"range -1\.\.2"),
        "label >= classes": (dict(images=x, labels=y, classes=np.array(["a", "b", "c"])),
                             r"0\.\.2 \(3 classes\), got range 0\.\.3"),
        "length mismatch": (dict(images=x, labels=y[:5]), "6 images but 'labels' 5 labels"),
        "missing labels": (dict(images=x), r"missing keys \['labels'\]"),
        "missing test": (dict(train_images=x, train_labels=y), r"missing keys \['test_images', 'test_labels'\]"),
        "both layouts": (dict(images=x, labels=y, train_images=x, train_labels=y), "expected uint8 images"),
        "unknown key": (dict(images=x, labels=y, lables=y), r"unexpected keys \['lables'\]"),
        "no images": (dict(mean=np.zeros(3)), "found keys"),
        "empty": (dict(images=x[:0], labels=y[:0]), "holds no images"),
        "mean shape": (dict(images=x, labels=y, mean=np.zeros(4)), "'mean' must be 3 finite floats"),
        "std zero": (dict(images=x, labels=y, std=np.array([0.2, 0.0, 0.2])), "'std' must be positive"),
        "classes ints": (dict(images=x, labels=y, classes=np.arange(4)), "'classes' must be a 1-D array"),
        "object array": (dict(images=x, labels=y, classes=np.array(["a", 1, None], dtype=object)),
                         "object arrays are refused"),
    }


@pytest.mark.parametrize("case", list(_bad_npz_cases()))
def test_npz_bad_file_is_clear_value_error(tmp_path, case):
    arrays, message = _bad_npz_cases()[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)                                          # np.savez pickles object arrays
    with pytest.raises(ValueError, match=message) as info:
        load_dataset("npz", root=path)
    assert str(path) in str(info.value)


def test_npz_path_errors_and_no_pickle_execution(tmp_path):
    with pytest.raises(ValueError, match="path of a .npz file"):
        load_dataset("npz")
    with pytest.raises(FileNotFoundError, match="folder"):
        load_dataset("npz", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        dataset_info("npz", tmp_path / "nope.npz")
    np.save(tmp_path / "one.npy", np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="single .npy array"):
        load_dataset("npz", root=tmp_path / "one.npy")
    marker = tmp_path / "pwned"
    (tmp_path / "evil.npz").write_bytes(pickle.dumps(_RunsCode(marker), protocol=2))
    with pytest.raises(ValueError, match="evil.npz"):
        load_dataset("npz", root=tmp_path / "evil.npz")
    assert not marker.exists()


def test_save_npz_round_trip(tmp_path):
    x, y = load_dataset("synthetic", size=40, seed=4)
    xt, yt = load_dataset("synthetic", split="test", size=9, seed=4)
    info = DATASET_INFO["synthetic"]
    path = save_npz(tmp_path / "syn.npz", x, y, mean=info["mean"], std=info["std"], classes=info["classes"],
                    flip=info["flip"], test_images=xt, test_labels=yt)
    assert path == tmp_path / "syn.npz" and sorted(p.name for p in tmp_path.iterdir()) == ["syn.npz"]
    for split, (want_x, want_y) in (("train", (x, y)), ("test", (xt, yt))):
        got_x, got_y = load_dataset("npz", root=path, split=split)
        assert torch.equal(got_x, want_x) and torch.equal(got_y, want_y)
    got = dataset_info("npz", path)
    for key in ("mean", "std", "classes", "flip", "num_classes"):
        assert got[key] == info[key], key
    small = save_npz(tmp_path / "train_only.npz", x[:8], y[:8], compress=True)
    assert torch.equal(load_dataset("npz", small)[0], x[:8])
    assert dataset_info("npz", small)["mean"] == pytest.approx(channel_stats(x[:8])[0], abs=1e-12)
    with pytest.raises(ValueError, match="must end in .npz"):
        save_npz(tmp_path / "x.data", x, y)
    with pytest.raises(ValueError, match="'labels' must be integer"):
        save_npz(tmp_path / "bad.npz", x, y.float())
    with pytest.raises(ValueError, match="both test_images and test_labels"):
        save_npz(tmp_path / "bad.npz", x, y, test_images=xt)
    assert not (tmp_path / "bad.npz").exists() and not list(tmp_path.glob("*.tmp*"))


def test_channel_stats_matches_direct_computation():
    x = torch.randint(0, 256, (37, 3, 5, 7), dtype=torch.uint8)
    mean, std = channel_stats(x, chunk=8)                             # several chunks and a ragged last one
    xf = x.double() / 255
    assert np.allclose(mean, xf.mean((0, 2, 3)).numpy(), atol=1e-12, rtol=0)
    assert np.allclose(std, xf.std((0, 2, 3), correction=0).numpy(), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        channel_stats(x.float())


# ----------------------------------------------------------------------------- unpickler: protocol-2 bytes
def test_cifar_protocol2_empty_arrays_and_bytes_load(tmp_path):
    write_cifar(tmp_path, n=4)
    empty = {b"batch_label": b"", b"labels": [], b"data": np.zeros((0, 3072), np.uint8), b"filenames": [],
             b"note": bytearray(b"ab"), b"blank": bytearray()}
    raw = pickle.dumps(empty, protocol=2)
    assert b"__builtin__\nbytes" in raw and b"__builtin__\nbytearray" in raw    # what protocol 2 emits
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "test_batch").write_bytes(raw)
    x, y = load_dataset("cifar10", root=tmp_path, split="test")
    assert x.shape == (0, 3, 32, 32) and y.shape == (0,) and y.dtype == torch.int64
    # An empty batch among full ones: the others' images come through unchanged.
    (folder / "data_batch_3").write_bytes(raw)
    x, _ = load_dataset("cifar10", root=tmp_path, split="train")
    assert x.shape == (16, 3, 32, 32)


def _global_call(module, name, arg_opcodes=b")"):
    """Protocol-2 bytes that call module.name(*args) and return the result."""
    return b"\x80\x02c" + module + b"\n" + name + b"\n" + arg_opcodes + b"R."


@pytest.mark.parametrize("payload,message", [
    (_global_call(b"__builtin__", b"bytes", b"J\x00\x00\x00\x40\x85"), "bytes(int)"),      # bytes(2**30)
    (_global_call(b"builtins", b"bytearray", b"J\x00\x00\x00\x40\x85"), "bytearray(int)"),
    (_global_call(b"__builtin__", b"eval", b"X\x05\x00\x00\x001 + 1\x85"), "__builtin__.eval"),
    (_global_call(b"builtins", b"exec", b"X\x04\x00\x00\x00pass\x85"), "builtins.exec"),
    (_global_call(b"posix", b"system", b"X\x04\x00\x00\x00true\x85"), "posix.system"),
    (_global_call(b"__builtin__", b"getattr", b")"), "__builtin__.getattr"),
    (_global_call(b"__builtin__", b"open", b"X\x04\x00\x00\x00/tmp\x85"), "__builtin__.open"),
    (_global_call(b"subprocess", b"Popen", b")"), "subprocess.Popen"),
])
def test_cifar_unpickler_still_refuses_everything_else(tmp_path, payload, message):
    write_cifar(tmp_path, n=4)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(payload)
    with pytest.raises(UnsafePickleError, match=re.escape(message)):
        load_dataset("cifar10", root=tmp_path, split="test")


# ----------------------------------------------------------------------------- SVHN labels
def test_svhn_label_zero_is_refused(tmp_path):
    pytest.importorskip("scipy")
    from scipy.io import savemat
    X, y = write_svhn(tmp_path, "train", 5)
    y[2, 0] = 0                                                       # digit 0 is 10 in the official files
    savemat(str(tmp_path / "train_32x32.mat"), {"X": X, "y": y})
    with pytest.raises(ValueError, match=r"1\.\.10 \(10 = digit 0\), got range 0\.\.10.*stored as 10") as info:
        load_dataset("svhn", root=tmp_path, split="train")
    assert "train_32x32.mat" in str(info.value)
    y[2, 0] = 11
    savemat(str(tmp_path / "train_32x32.mat"), {"X": X, "y": y})
    with pytest.raises(ValueError, match=r"1\.\.10 \(10 = digit 0\), got range \d+\.\.11$"):
        load_dataset("svhn", root=tmp_path, split="train")


# ----------------------------------------------------------------------------- DeviceLoader: one shared copy
def test_loaders_share_one_device_copy_and_stay_independent():
    images, labels = _id_data(37)
    kw = dict(augment=True, dataset="cifar10", drop_last=False)
    a = DeviceLoader(images, labels, 5, "cpu", seed=1, **kw)
    b = DeviceLoader(images, labels, 5, "cpu", seed=2, **kw)
    assert a.images.data_ptr() == b.images.data_ptr() == images.data_ptr()       # no copy of on-device data
    assert a.labels.data_ptr() == b.labels.data_ptr() == labels.data_ptr()       # int64 already: no copy
    group = DeviceLoader.group(images, labels.to(torch.int32), 5, "cpu", seeds=[1, 2, 3], **kw)
    assert len({g.images.data_ptr() for g in group}) == 1 and group[0].images.data_ptr() == images.data_ptr()
    assert len({g.labels.data_ptr() for g in group}) == 1 and group[0].labels.dtype == torch.int64
    # Independent streams: each group member yields what a loader built alone with its seed yields.
    solo = [DeviceLoader(images.clone(), labels.clone(), 5, seed=s, **kw) for s in (1, 2, 3)]
    first = [[next(iter(g)) for _ in range(3)] for g in group]
    assert not torch.equal(first[0][0][1], first[1][0][1])                       # different permutations
    for g_batches, s_loader in zip(first, solo):
        s_it = iter(s_loader)
        for xg, yg in g_batches:
            xs, ys = next(s_it)
            assert torch.equal(xg, xs) and torch.equal(yg, ys)
    # Resume is bit-exact for a member of a group while its siblings keep going.
    state = group[1].state_dict()
    expected = [bt for _ in range(2) for bt in group[1]]
    list(group[0]), list(group[2])
    fresh = DeviceLoader.group(images, labels, 5, "cpu", seeds=[1, 2, 3], **kw)[1]
    fresh.load_state_dict(state)
    got = [bt for _ in range(2) for bt in fresh]
    assert len(got) == len(expected) and all(torch.equal(x1, x2) and torch.equal(y1, y2)
                                             for (x1, y1), (x2, y2) in zip(got, expected))
    with pytest.raises(ValueError, match="seeds="):
        DeviceLoader.group(images, labels, 5, seeds=[1], seed=3)
    with pytest.raises(ValueError, match="at least one seed"):
        DeviceLoader.group(images, labels, 5, seeds=[])
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader.group(images.float(), labels, 5, seeds=[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loaders_share_one_cuda_copy():
    images, labels = _id_data(64)
    group = DeviceLoader.group(images, labels, 8, "cuda", seeds=range(9), augment=True, dataset="cifar10")
    assert len({g.images.data_ptr() for g in group}) == 1 and group[0].images.is_cuda
    on_gpu = images.cuda()
    again = DeviceLoader(on_gpu, labels.cuda(), 8, "cuda", seed=0)
    assert again.images.data_ptr() == on_gpu.data_ptr()
    cpu_ref = DeviceLoader(images, labels, 8, "cpu", seed=4, augment=True, dataset="cifar10")
    for (xg, yg), (xc, yc) in zip(group[4], cpu_ref):
        assert torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)   # same batches as on the CPU


# ----------------------------------------------------------------------------- real CIFAR-10 (when present)
def _real_cifar_dir():
    env = os.environ.get("FASTMOE_CIFAR10_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train"


@pytest.fixture(scope="module")
def real_cifar():
    root = _real_cifar_dir()
    if not (root / "cifar-10-python.tar.gz").is_file() and not (root / "cifar-10-batches-py").is_dir():
        pytest.skip(f"real CIFAR-10 not found in {root} (set FASTMOE_CIFAR10_DIR to a folder holding "
                    "cifar-10-python.tar.gz)")
    full = load_dataset("cifar10", root=root, split="train")
    train = load_dataset("cifar10", root=root, split="train", holdout=1000)
    return root, full, train


def test_real_cifar10_train_split_and_holdout(real_cifar):
    _, (x, y), (tx, ty) = real_cifar
    assert x.shape == (50000, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.bincount(y, minlength=10).tolist() == [5000] * 10                 # 10 classes, balanced
    mean, std = channel_stats(x)                                                   # the published constants
    assert np.allclose(mean, DATASET_INFO["cifar10"]["mean"], atol=1e-4)
    assert np.allclose(std, DATASET_INFO["cifar10"]["std"], atol=1e-4)
    held = holdout_indices(50000, 1000)
    rest = torch.ones(50000, dtype=torch.bool)
    rest[held] = False
    assert tx.shape == (49000, 3, 32, 32) and torch.equal(tx, x[rest]) and torch.equal(ty, y[rest])
    assert set(held.tolist()).isdisjoint(rest.nonzero().view(-1).tolist())
    assert torch.bincount(y[held], minlength=10).min() >= 70                       # every class represented


def test_real_cifar10_npz_subset_round_trip(real_cifar, tmp_path):
    _, (x, y), _ = real_cifar
    info = dataset_info("cifar10")
    path = save_npz(tmp_path / "c10.npz", x[:2000], y[:2000], mean=info["mean"], std=info["std"],
                    classes=info["classes"], flip=info["flip"])
    got_x, got_y = load_dataset("npz", root=path)
    assert torch.equal(got_x, x[:2000]) and torch.equal(got_y, y[:2000])
    assert dataset_info("npz", path)["classes"] == DATASET_INFO["cifar10"]["classes"]
