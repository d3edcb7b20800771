"""fastmoe_adv.square: the paper's p schedule, the margin loss, success on an undefended model within
the query budget, eps-ball and box invariants, agreement with torchattacks' Square, no gradients."""
import pytest
import torch
import torch.nn as nn
from test_apgd import conv_model, correct_data, gen, robust_acc

from fastmoe_adv import square as SQ


class QueryCounter(nn.Module):
    """Counts the images each forward sees and records whether grad mode was on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows, self.grad_mode = model, 0, []

    def forward(self, x):
        self.rows += x.shape[0]
        self.grad_mode.append(torch.is_grad_enabled())
        return self.model(x)


def test_p_schedule_follows_the_paper():
    assert [SQ.square_p(0.8, i, 10000) for i in (0, 10, 11, 50, 51, 200, 201)] == [0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1]
    assert SQ.square_p(0.8, 8001, 10000) == 0.8 / 512
    assert SQ.square_p(0.8, 9999, 10000) == 0.8 / 512
    # Rescaled to a shorter budget: iteration 2 of 1000 is iteration 20 of 10000.
    assert SQ.square_p(0.8, 1, 1000) == 0.8 and SQ.square_p(0.8, 2, 1000) == 0.4


def test_margin_by_hand():
    z = torch.tensor([[3.0, 1.0, 2.0], [0.5, 4.0, -1.0]])
    y = torch.tensor([0, 0])
    torch.testing.assert_close(SQ.margin(z, y), torch.tensor([1.0, -3.5]))


def test_fools_an_undefended_model_within_budget_without_gradients():
    model = conv_model()
    x, y = correct_data(model, b=16)
    counter = QueryCounter(model)
    n_queries = 150
    out = SQ.square(counter, x, y, 0.06, n_queries=n_queries, generator=gen())
    acc = robust_acc(model, out, y)
    assert acc < 0.75  # clean accuracy is 1.0
    assert counter.rows <= 16 * (n_queries + 1)  # + the clean forward that picks the points to attack
    assert not any(counter.grad_mode)
    assert (out - x).abs().max() <= 0.06 + 1e-6 and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("eps", [0.0, 0.01, 0.2])
def test_stays_in_ball_and_box(eps):
    model = conv_model(seed=5)
    x, y = correct_data(model, b=8, seed=2)
    x[0, 0, 0, :2] = torch.tensor([0.0, 1.0])  # pixels on the box edges
    y[1] = (y[1] + 1) % 10  # misclassified before the attack: returned unchanged
    out = SQ.square(model, x, y, eps, n_queries=20, generator=gen())
    assert out.shape == x.shape and not out.requires_grad
    assert (out - x).abs().max() <= eps + 1e-6 and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out[1], x[1])
    if eps == 0:
        assert torch.equal(out, x)


def test_agrees_with_torchattacks_square():
    torchattacks = pytest.importorskip("torchattacks")
    model = conv_model()
    x, y = correct_data(model, b=32)
    ours = robust_acc(model, SQ.square(model, x, y, 0.06, n_queries=100, generator=gen()), y)
    theirs = robust_acc(model, torchattacks.Square(model, eps=0.06, n_queries=100, seed=0)(x, y), y)
    assert 0.05 < theirs < 0.95
    assert abs(ours - theirs) <= 3 / 32 + 1e-9, (ours, theirs)


def test_empty_batch_mode_and_errors():
    model = conv_model().train()
    out = SQ.square(model, torch.rand(0, 3, 8, 8), torch.zeros(0, dtype=torch.long), 0.03, n_queries=5)
    assert out.shape == (0, 3, 8, 8) and model.training
    x, y = correct_data(model.eval(), b=2)
    with pytest.raises(ValueError, match="Linf"):
        SQ.square(model, x, y, 0.5, norm="L2")
    with pytest.raises(ValueError, match="p_init"):
        SQ.square(model, x, y, 0.03, p_init=1.5)
    with pytest.raises(ValueError, match="n_queries"):
        SQ.square(model, x, y, 0.03, n_queries=0)
