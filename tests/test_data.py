"""fastmoe_adv.data: official file formats (written here in the exact layouts), the restricted
unpickler, the synthetic generator, and DeviceLoader's order, augmentation, sharding and resume."""
import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastmoe_adv.data import DATASET_INFO, DeviceLoader, UnsafePickleError, augment, load_dataset, make_synthetic

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
