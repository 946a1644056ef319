"""One SGD step of an FC-L ensemble written out by hand: the FC fast path of ``Engine``.

The generic step (``torch.func.vmap`` of ``grad_and_value``) materialises every member's
gradient, then scales, masks and subtracts it: four passes over the weights after the
backward product. Here the backward pass is written out with batched matrix products,
and each weight update is accumulated in place by the product that computes it
(``W.baddbmm_(g, u^T, alpha=-scale)``, with the step size already folded into g), so the
gradient of W is never stored and W is read and written once for its update.

Fewer passes over the activations: they are kept transposed, (K, width, B), so that every
product has the layer's width as its long side, and the constant factors (1 / sqrt(fan_in),
the activation's normalisation s, 1 / h) ride on the products' alpha instead of separate
elementwise passes; relu's slope is a bool mask. On an H200 at K = 8192 this cut the
elementwise kernels' time from 2.5 to 1.3 ms per step (``bench --profile``).

The arithmetic is the model's (``ensemble.models._fc``): pre-activations z W^T / sqrt(fan_in),
phi = the normalised activation, F = z_L . w_out / h; loss relu(1 - alpha f y) / alpha, batch
mean, f = F - F(w0). Its derivative is exact (relu: the step (z > 0), as autograd; gelu: the
erf form), so trajectories equal the generic step's up to float rounding (tested).
"""

from __future__ import annotations

import math

import torch

from ensemble.models import Params, activation_scale

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SCALE = {name: activation_scale(name) for name in ("relu", "gelu")}
"""The normalised activations' scales, computed once (not traced by torch.compile)."""


_NOTHING: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
"""A (1, 1, 1) zero per (dtype, device): the ignored ``input`` of ``baddbmm(beta=0)``."""


def _nothing(like: torch.Tensor) -> torch.Tensor:
    key = (like.dtype, like.device)
    if key not in _NOTHING:
        _NOTHING[key] = torch.zeros(1, 1, 1, dtype=like.dtype, device=like.device)
    return _NOTHING[key]


def _scaled_bmm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * (a @ b), batched, in one product (the scale is the product's alpha)."""
    return torch.baddbmm(_nothing(a), a, b, beta=0.0, alpha=scale)


def fc_forward(
    params: Params, x: torch.Tensor, L: int, activation: str, keep: bool = True
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """F(w, x) of K members on their own inputs x (K, B, d_in).

    Returns (F (K, B), layer inputs, activation slopes); without ``keep`` (evaluation)
    the two lists are empty. The activations are kept transposed, (K, width, B), with
    the activation's scale s left out: u_0 = x^T, u_{l+1} = act(pre_l) and z_l = s u_l
    for l >= 1, the scale folded into the next product. Slopes are act'(pre_l) without
    s: a bool mask (pre_l > 0) for relu. Each point's F does not depend on the other
    points of the batch (on the CPU bit for bit in one thread: tested), so the engine
    evaluates F(w0) and the training loss with this function too.

    On the CPU the first product takes x^T as a contiguous (K, d_in, B) copy: MKL's
    products with a transposed operand (the view x^T) round differently for different
    numbers of columns on some CPUs (seen with AVX-512), and a point's F would then
    depend on its batch size (the copy and the readout's row sums cost 2-4 % of an
    FC-5L h = 128 step at K = 8-128 in one thread). On a GPU the kernels depend on the
    shape anyway, so the view is used and no copy is made."""
    s = _SCALE[activation]
    us, slopes = [x.transpose(1, 2)], []
    u = us[0].contiguous() if x.device.type == "cpu" else us[0]
    for layer in range(L):
        W = params[f"W{layer}"]  # (K, h, fan_in)
        pre = _scaled_bmm(W, u, (s if layer else 1.0) / math.sqrt(W.shape[2]))  # (K, h, B)
        if activation == "relu":
            u = torch.relu(pre)
            slope = pre > 0 if keep else None
        else:
            cdf = 0.5 * (1.0 + torch.erf(pre * _INV_SQRT_2))
            u = pre * cdf
            slope = cdf + pre * torch.exp(-0.5 * pre * pre) * _INV_SQRT_2PI if keep else None
        if keep:
            us.append(u)
            slopes.append(slope)
    return readout(params["w_out"], u, s), (us if keep else []), slopes


def readout(w_out: torch.Tensor, u: torch.Tensor, s: float) -> torch.Tensor:
    """F = s w_out . u_L / h of K members: w_out (K, h), u (K, h, B) -> (K, B).

    On the CPU each point's F sums the products of its own row of u_L^T (made
    contiguous) with w_out, which rounds alike whatever the number of points: a
    product with one row (w_out u_L) rounds its last columns differently by their
    number (MKL's vector tails, seen with AVX-512)."""
    h = w_out.shape[1]
    if u.device.type == "cpu":
        return (u.transpose(1, 2).contiguous() * w_out.unsqueeze(1)).sum(-1) * (s / h)
    return _scaled_bmm(w_out.unsqueeze(1), u, s / h).squeeze(1)


def readout_backward_update(
    w_out: torch.Tensor, u: torch.Tensor, g_F: torch.Tensor, keep: torch.Tensor, s: float
) -> torch.Tensor:
    """The readout's part of the step: returns g_F times dF/du_L, (K, h, B), from w_out as
    it was, then updates w_out in place where ``keep`` (K, 1, 1) is True."""
    h = w_out.shape[1]
    delta = w_out.unsqueeze(2) * (g_F.unsqueeze(1) * (s / h))
    w_out.unsqueeze(2).baddbmm_(torch.where(keep, u, 0), g_F.unsqueeze(2), alpha=-s / h)
    return delta


def fc_backward_update(
    params: Params,
    us: list[torch.Tensor],
    slopes: list[torch.Tensor],
    g_F: torch.Tensor,
    update: torch.Tensor,
    activation: str,
) -> None:
    """w <- w - d(sum_k g_F[k] . F_k)/dw in place, for every member: g_F (K, B) is the step
    size times dloss/dF, zero where ``update`` (K,) is False. ``us`` and ``slopes`` are
    fc_forward's. The factors of each product are masked with ``where`` (not multiplied
    by zero), so a member with non-finite activations (one that diverged) gets exactly
    no update; the inputs u_0 = x^T are finite and need no mask."""
    s = _SCALE[activation]
    L = len(slopes)
    keep = update.view(-1, 1, 1)
    delta = readout_backward_update(params["w_out"], us[L], g_F, keep, s)  # dloss/du_L
    for layer in reversed(range(L)):
        W = params[f"W{layer}"]  # (K, h, fan_in)
        if activation == "relu":
            g_pre = torch.where(keep & slopes[layer], delta, 0)  # (K, h, B)
        else:
            g_pre = torch.where(keep, delta * slopes[layer], 0)
        scale = (s if layer else 1.0) / math.sqrt(W.shape[2])
        if layer:  # dloss/du_layer = scale W^T g_pre, before W changes
            delta = _scaled_bmm(W.transpose(1, 2), g_pre, scale)
        u = torch.where(keep, us[layer], 0) if layer else us[0]
        W.baddbmm_(g_pre, u.transpose(1, 2), alpha=-scale)
