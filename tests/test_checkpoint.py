"""fastmoe_adv.checkpoint: round trip, atomic writes, refusal of code-executing files, RNG state."""
import collections
import dataclasses
import enum
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmoe_adv.checkpoint import (
    UnsafeCheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    to_plain,
)


def _model_and_optimizer():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    return model, opt


def _assert_same(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same(u, v)
    else:
        assert a == b


def test_round_trip(tmp_path):
    model, opt = _model_and_optimizer()
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 12, "lr": 0.05,
               "done": False, "note": None, "name": "run-1", "shape": (3, 32, 32), "roles": ["clean", "fgsm"],
               "half": torch.ones(3, dtype=torch.bfloat16), "gen": torch.Generator().manual_seed(1).get_state(),
               "nested": {"a": [1, 2.5, {"b": torch.arange(4)}]}}
    path = save_checkpoint(tmp_path / "deep" / "dir" / "ck.pt", payload)
    assert path == tmp_path / "deep" / "dir" / "ck.pt" and path.is_file()
    back = load_checkpoint(path)
    _assert_same(payload, back)
    fresh, fresh_opt = _model_and_optimizer()
    fresh.load_state_dict(back["model"])
    fresh_opt.load_state_dict(back["optimizer"])
    assert back["model"]._metadata == payload["model"]._metadata       # state_dict versions survive
    assert sorted(p.name for p in path.parent.iterdir()) == ["ck.pt"]   # no temp file left


def test_overwrite_replaces(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"v": 1})
    save_checkpoint(path, {"v": 2})
    assert load_checkpoint(path) == {"v": 2}
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_crash_during_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"v": 1, "w": torch.ones(100)})
    before = path.read_bytes()
    seen = {}

    def crashing_save(obj, f, *args, **kwargs):
        seen["dir"] = Path(f.name).parent
        f.write(b"PK\x03\x04 half a checkpoint")
        f.flush()
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(RuntimeError, match="simulated"):
        save_checkpoint(path, {"v": 2, "w": torch.zeros(100)})
    assert seen["dir"] == tmp_path                                     # temp file in the same folder
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ck.pt"]                           # temp file removed
    monkeypatch.undo()
    assert load_checkpoint(path)["v"] == 1

    # An interrupt (e.g. Ctrl-C) mid-write is cleaned up too.
    def interrupted_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"v": 3})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ck.pt"]


def test_crash_before_first_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    def crashing_save(obj, f, *args, **kwargs):
        raise OSError("no space left on device (simulated)")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ck.pt", {"v": 1})
    assert os.listdir(tmp_path) == []


@dataclasses.dataclass
class _Opt:
    lr: float = 0.1
    betas: tuple = (0.9, 0.99)


class _Mode(enum.Enum):
    FAST = "fast"


_Pair = collections.namedtuple("_Pair", "left right")


@dataclasses.dataclass
class _Config:
    out: Path = Path("/tmp/run")
    steps: np.int64 = np.int64(7)
    scale: np.float32 = np.float32(0.5)
    mode: _Mode = _Mode.FAST
    opt: _Opt = dataclasses.field(default_factory=_Opt)
    pair: _Pair = _Pair(1, np.float64(2.0))
    tags: frozenset = frozenset({"b", "a"})
    table: np.ndarray = dataclasses.field(default_factory=lambda: np.arange(3))


def test_non_plain_payload_names_key_path(tmp_path):
    path = tmp_path / "ck.pt"
    cases = [({"config": _Config()}, "payload['config']"),
             ({"train": {"lr": np.float64(0.1)}}, "payload['train']['lr']"),
             ({"dirs": ["a", Path("/b")]}, "payload['dirs'][1]"),
             ({"pair": _Pair(1, 2)}, "payload['pair']"),
             ({"fn": print}, "payload['fn']"),
             ({"arr": np.zeros(3)}, "payload['arr']")]
    for payload, where in cases:
        with pytest.raises(TypeError) as info:
            save_checkpoint(path, payload)
        assert where in str(info.value)
    with pytest.raises(TypeError, match="to_plain"):
        save_checkpoint(path, {"config": _Config()})
    with pytest.raises(TypeError, match="must be a dict"):
        save_checkpoint(path, [1, 2])
    assert not path.exists()


def test_to_plain_converts_configs(tmp_path):
    plain = to_plain({"config": _Config(), "sd": torch.nn.Linear(2, 2).state_dict()})
    cfg = plain["config"]
    assert cfg["out"] == "/tmp/run" and type(cfg["steps"]) is int and cfg["steps"] == 7
    assert type(cfg["scale"]) is float and cfg["mode"] == "fast"
    assert cfg["opt"] == {"lr": 0.1, "betas": (0.9, 0.99)}
    assert cfg["pair"] == {"left": 1, "right": 2.0} and type(cfg["pair"]["right"]) is float
    assert cfg["tags"] == ["a", "b"] and torch.equal(cfg["table"], torch.arange(3))
    assert isinstance(plain["sd"], collections.OrderedDict) and hasattr(plain["sd"], "_metadata")
    save_checkpoint(tmp_path / "ck.pt", plain)
    _assert_same(plain, load_checkpoint(tmp_path / "ck.pt"))
    with pytest.raises(TypeError, match="obj\\['x'\\]"):
        to_plain({"x": object()})


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_torch(path, obj):
    torch.save(obj, path)


def _write_torch_protocol4(path, obj):
    torch.save(obj, path, pickle_protocol=4)


def _write_legacy(path, obj):
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("writer", [_write_torch, _write_torch_protocol4, _write_legacy, _write_pickle])
def test_malicious_checkpoint_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_RunsCode(marker)))                      # the payload is live
    assert marker.exists()
    marker.unlink()

    path = tmp_path / "evil.pt"
    writer(path, {"model": {"w": torch.ones(2)}, "step": 3, "x": _RunsCode(marker)})
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and "execute code" in msg and "system" in msg
    assert isinstance(info.value, ValueError)
    assert not marker.exists()


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"w": torch.randn(1000)})
    data = good.read_bytes()
    cases = {"truncated.pt": data[: len(data) // 2], "empty.pt": b"", "text.pt": b"not a checkpoint at all",
             "noise.pt": bytes(np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8)),
             "tail_cut.pt": data[:-30]}
    for name, content in cases.items():
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(ValueError) as info:
            load_checkpoint(bad)
        assert name in str(info.value)
        assert not isinstance(info.value, UnsafeCheckpointError), name


def _draws():
    return (random.random(), random.gauss(0, 1), random.getrandbits(64), np.random.rand(3).tolist(),
            np.random.randn(), torch.rand(4).tolist(), torch.randint(0, 1000, (3,)).tolist())


def test_rng_capture_restore_reproduces_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)                          # leave a cached gaussian in both generators
    np.random.randn()
    state = capture_rng_state()
    first = _draws()
    _draws()
    restore_rng_state(state)
    assert _draws() == first
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    _draws()
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert _draws() == first
    with pytest.raises(ValueError, match="python"):
        restore_rng_state({"torch": state["torch"]})


def test_restore_warns_about_missing_cuda_generators(monkeypatch):
    state = capture_rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(RuntimeWarning, match="CUDA"):
        restore_rng_state(state)
