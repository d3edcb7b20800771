"""Square attack (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient
black-box adversarial attack via random search", ECCV 2020), L-inf, score-based: it reads logits
only, so it does not rely on gradients and sees through gradient masking.

Random search on the vertices of the eps-ball: start from vertical stripes of +-eps; each query
changes one random square window (side from the paper's p schedule) of every still-robust image to
a random per-channel +-eps and keeps the change if the margin loss ``z_y - max_{j!=y} z_j`` drops.
"""
from __future__ import annotations

import math

import torch

from .attacks import _check_inputs, _check_number, _per_sample, attack_mode, check_norm, logits_of
from .kernels import pgd_step

__all__ = ["square", "square_p", "margin"]

# The paper's schedule: p halves at these iterations of a 10000-query run (Sec. 3, Appendix).
_P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def square_p(p_init: float, iteration: int, n_queries: int) -> float:
    """Fraction of pixels a window covers at ``iteration``: ``p_init`` halved at iterations
    10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of a 10000-query budget, rescaled to ``n_queries``."""
    it = int(iteration / n_queries * 10000)
    return p_init / 2 ** sum(it > h for h in _P_HALVINGS)


def margin(logits, y):
    """``z_y - max_{j != y} z_j`` per sample: negative exactly when the sample is misclassified."""
    z = logits.float()
    z_y = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], -math.inf)
    return z_y - others.amax(dim=1)


def _choice(shape, generator, device, dtype):
    """Uniform random signs +-1."""
    return torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1


def _window_signs(n, c, h, w, side, generator, device, dtype):
    """[n, c, h, w]: a random per-channel sign inside one random side x side window per image, 0 outside."""
    vh = torch.randint(0, h - side + 1, (n, 1), generator=generator, device=device)
    vw = torch.randint(0, w - side + 1, (n, 1), generator=generator, device=device)
    rows = torch.arange(h, device=device)[None, :]
    cols = torch.arange(w, device=device)[None, :]
    in_h = (rows >= vh) & (rows < vh + side)
    in_w = (cols >= vw) & (cols < vw + side)
    window = (in_h[:, None, :, None] & in_w[:, None, None, :]).to(dtype)
    return window * _choice((n, c, 1, 1), generator, device, dtype)


def _search(model, x, y, eps, n_queries, p_init, generator):
    """Random search on all of x (every sample classified correctly at the start)."""
    b, c, h, w = x.shape
    stripes = _choice((b, c, 1, w), generator, x.device, x.dtype)
    x_best = (x + eps * stripes).clamp(0.0, 1.0)
    margin_best = margin(logits_of(model(x_best)), y)
    for i in range(1, n_queries):
        # Score-based search: dropping the fooled points each query (a sync) is what keeps it cheap.
        idx = (margin_best > 0).nonzero().flatten()
        if idx.numel() == 0:
            break
        side = max(int(round(math.sqrt(square_p(p_init, i, n_queries) * h * w))), 1)
        side = min(side, h, w)
        signs = _window_signs(idx.numel(), c, h, w, side, generator, x.device, x.dtype)
        # x_best + 2 eps * sign in the window, projected back: the window lands on +-eps (a vertex).
        x_new = pgd_step(x_best[idx], signs, x[idx], 2.0 * eps, eps, validate=False)
        m_new = margin(logits_of(model(x_new)), y[idx])
        better = m_new < margin_best[idx]
        x_best[idx] = torch.where(_per_sample(better, x_new), x_new, x_best[idx])
        margin_best[idx] = torch.where(better, m_new, margin_best[idx])
    return x_best


def square(model, x, y, eps, n_queries=5000, p_init=0.8, generator=None, norm="Linf"):
    """L-inf Square attack (Andriushchenko et al., ECCV 2020) with the margin loss.

    Args:
        model: maps images [B,C,H,W] in [0, 1] to logits [B, K]; only its outputs are read.
        x: float images [B,C,H,W] in [0, 1] (B may be 0).  y: integer labels [B].
        eps: L-inf radius, >= 0.
        n_queries: model queries per image, >= 1 (the start counts as one); AutoAttack uses 5000.
        p_init: initial fraction of pixels per window (0.8 in AutoAttack), in (0, 1].
        generator: torch.Generator for all random draws (None: the global RNG).
        norm: only "Linf" is implemented (L2 is a ValueError).
    Returns:
        adversarial images like x, detached: per image the first point found misclassified, else
        the lowest-margin one; images misclassified before the attack are returned unchanged.
    """
    eps = _check_number("eps", eps)
    n_queries = _check_number("n_queries", n_queries, integer=True, minimum=1)
    p_init = _check_number("p_init", p_init)
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init: expected a fraction in (0, 1], got {p_init}")
    if check_norm(norm) != "Linf":
        raise ValueError(f"square: only norm='Linf' is implemented, got {norm!r}")
    with attack_mode(model), torch.no_grad():
        x, y = _check_inputs(model, x, y)
        out = x.clone()
        if x.shape[0] == 0:
            return out
        robust = (logits_of(model(x)).argmax(dim=1) == y).nonzero().flatten()
        if robust.numel():
            out[robust] = _search(model, x[robust], y[robust], eps, n_queries, p_init, generator)
        return out
