"""fastmoe_adv.presets: each stage attacks only the points still robust, the result is the per-point
worst case over the stages, per-stage figures and timings, the quick preset end to end, errors."""
import pytest
import torch
import torch.nn as nn
from test_apgd import conv_model, correct_data

from fastmoe_adv import presets as P

EPS = 0.1


class KeyModel(nn.Module):
    """Two classes. Pixel (0,0,0) is 0.5 on clean images (class 0); lowering it by more than eps/2
    flips the prediction to class 1. Pixel (1,0,0) carries each image's id, which attacks never touch,
    so a forward can tell which points an attack is working on."""

    def __init__(self):
        super().__init__()
        self.seen = {}      # stage name -> set of image ids forwarded during that stage
        self.stage = "clean"

    def forward(self, x):
        ids = torch.round(x[:, 1, 0, 0] * 100).long().tolist()
        self.seen.setdefault(self.stage, set()).update(ids)
        z0 = 10 * (x[:, 0, 0, 0] - (0.5 - EPS / 2))
        return torch.stack([z0, torch.zeros_like(z0)], dim=1)


def key_images(n):
    x = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x[:, 0, 0, 0] = 0.5
    x[:, 1, 0, 0] = torch.arange(n) / 100
    return x, torch.zeros(n, dtype=torch.long)


def fooling(ids):
    """A stage that fools exactly the images whose id is in ``ids`` (and leaves the rest unchanged)."""
    def attack(model, x, y, eps, norm, generator):
        out = x.clone()
        hit = torch.tensor([int(i) in ids for i in torch.round(x[:, 1, 0, 0] * 100).long()], dtype=torch.bool)
        out[hit, 0, 0, 0] -= eps
        return out
    return attack


def test_stages_attack_only_still_robust_points_and_result_is_per_point_minimum():
    model = KeyModel()
    x, y = key_images(12)
    y[[0, 1]] = 1  # two points wrong before any attack
    stages = [P.Stage("a", fooling({2, 3, 4})), P.Stage("b", fooling({3, 5, 6, 0})), P.Stage("c", fooling({7}))]
    events = []

    def progress(name, info):
        events.append((name, info["event"]))
        model.stage = name if info["event"] == "start" else "between"

    res = P.run_preset(model, x, y, eps=EPS, stages=stages, progress=progress)
    assert events == [(s.name, e) for s in stages for e in ("start", "done")]
    assert model.seen["a"] == set(range(2, 12))
    assert model.seen["b"] == set(range(2, 12)) - {2, 3, 4}
    assert model.seen["c"] == set(range(2, 12)) - {2, 3, 4, 5, 6}
    expected = torch.ones(12, dtype=torch.bool)
    expected[[0, 1, 2, 3, 4, 5, 6, 7]] = False
    assert torch.equal(res.robust, expected)
    assert res.clean_accuracy == 10 / 12 and res.robust_accuracy == 4 / 12
    assert [s.robust_accuracy for s in res.stages] == [7 / 12, 5 / 12, 4 / 12]
    assert [(s.attacked, s.fooled) for s in res.stages] == [(10, 3), (7, 2), (5, 1)]
    assert all(s.seconds >= 0 for s in res.stages)
    with torch.no_grad():
        assert torch.equal(model(res.x_adv).argmax(1) == y, res.robust)
    assert torch.equal(res.x_adv[res.robust], x[res.robust])  # robust points keep their clean image
    for chunked in (1, 3):  # chunks do not change the result
        again = P.run_preset(KeyModel(), x, y, eps=EPS, stages=stages, batch_size=chunked)
        assert torch.equal(again.robust, res.robust) and torch.equal(again.x_adv, res.x_adv)


def test_a_stage_leaving_the_ball_is_refused():
    x, y = key_images(4)

    def cheat(model, x, y, eps, norm, generator):
        out = x.clone()
        out[:, 0, 0, 0] = 0.0
        return out

    with pytest.raises(RuntimeError, match="leaves the Linf ball"):
        P.run_preset(KeyModel(), x, y, eps=EPS, stages=[P.Stage("cheat", cheat)])


@pytest.mark.parametrize("norm,eps", [("Linf", 0.06), ("L2", 0.6)])
def test_quick_preset_end_to_end(norm, eps):
    model = conv_model()
    x, y = correct_data(model, b=16)
    res = P.run_preset(model, x, y, preset="quick", eps=eps, norm=norm, seed=0)
    assert [s.name for s in res.stages] == ["apgd-ce", "apgd-t"]
    accs = [res.clean_accuracy] + [s.robust_accuracy for s in res.stages]
    assert accs == sorted(accs, reverse=True) and res.robust_accuracy == accs[-1] < 1.0
    d = (res.x_adv - x).flatten(1)
    dist = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    assert (dist <= eps + 1e-5).all()
    with torch.no_grad():
        assert torch.equal(model(res.x_adv).argmax(1) == y, res.robust)
    summary = res.to_dict()
    assert summary["robust_accuracy"] == res.robust_accuracy and len(summary["stages"]) == 2


def test_standard_and_adaptive_stage_lists_and_skips():
    assert [(s.name, s.settings) for s in P.preset_stages("standard")] == [
        ("apgd-ce", {"steps": 100, "loss": "ce"}), ("apgd-t", {"steps": 100, "n_targets": 9, "loss": "dlr-t"}),
        ("square", {"n_queries": 5000, "p_init": 0.8})]
    assert [s.name for s in P.preset_stages("adaptive")] == ["apgd-ce", "apgd-t", "apgd-moe", "square"]
    x, y = correct_data(conv_model(), b=2)
    # L2 has no Square stage; a plain model has no mixture stage: both are reported as skipped.
    res = P.run_preset(conv_model(), x, y, preset="adaptive", eps=0.0, norm="L2",
                       stages=[s for s in P.preset_stages("adaptive") if s.name in ("apgd-moe", "square")])
    assert [bool(s.skipped) for s in res.stages] == [True, True] and res.stages[0].attacked == 0


def test_empty_batch_defaults_and_errors():
    model = conv_model()
    res = P.run_preset(model, torch.rand(0, 3, 8, 8), torch.zeros(0, dtype=torch.long), preset="quick")
    assert res.robust.shape == (0,) and res.x_adv.shape == (0, 3, 8, 8)
    assert res.eps == 8 / 255 and res.clean_accuracy == 0.0 and [s.attacked for s in res.stages] == [0, 0]
    assert P.run_preset(model, torch.rand(0, 3, 8, 8), torch.zeros(0, dtype=torch.long), preset="quick",
                        norm="L2").eps == P.L2_EPS
    from fastmoe_adv import attacks as A  # the families are reachable from the attacks module too
    assert A.run_preset is P.run_preset and A.apgd.__module__ == "fastmoe_adv.apgd"
    x, y = correct_data(model, b=2)
    with pytest.raises(ValueError, match="preset"):
        P.run_preset(model, x, y, preset="fast")
    with pytest.raises(ValueError, match="norm"):
        P.run_preset(model, x, y, norm="L0")
    with pytest.raises(ValueError, match="eps"):
        P.run_preset(model, x, y, eps=-1.0)


def test_compare_with_original_autoattack():
    pytest.importorskip("autoattack")
    model = conv_model()
    x, y = correct_data(model, b=16)
    res = P.run_preset(model, x, y, preset="quick", eps=0.06, compare_autoattack=True)
    assert abs(res.autoattack["robust_accuracy"] - res.robust_accuracy) <= 2 / 16 + 1e-9
