"""One SGD step of an FC-L ensemble written out by hand: the FC fast path of ``Engine``.

The generic step (``torch.func.vmap`` of ``grad_and_value``) materialises every member's
gradient, then scales, masks and subtracts it: four passes over the weights after the
backward product. Here the backward pass is written out with batched matrix products,
and each weight update is accumulated in place by the product that computes it
(``W.baddbmm_(g^T, z, alpha=-1/sqrt(fan_in))``, with the step size already folded into g),
so the gradient of W is never stored and W is read and written once for its update.

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


def _phi_and_slope(
    pre: torch.Tensor, activation: str, s: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi(pre), phi'(pre)) of the normalised activation, s = activation_scale(activation)."""
    if activation == "relu":
        return torch.relu(pre) * s, (pre > 0).to(pre.dtype) * s
    cdf = 0.5 * (1.0 + torch.erf(pre * _INV_SQRT_2))
    pdf = torch.exp(-0.5 * pre * pre) * _INV_SQRT_2PI
    return pre * cdf * s, (cdf + pre * pdf) * s


def fc_forward(
    params: Params, x: torch.Tensor, L: int, activation: str
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """F(w, x) of K members on their own inputs x (K, B, d_in): (F (K, B), layer inputs
    [z_0 .. z_L], activation slopes [phi'(pre_0) .. phi'(pre_{L-1})])."""
    s = _SCALE[activation]
    z, zs, slopes = x, [x], []
    for layer in range(L):
        W = params[f"W{layer}"]  # (K, h, fan_in)
        pre = torch.bmm(z, W.transpose(1, 2)) / math.sqrt(W.shape[2])
        z, slope = _phi_and_slope(pre, activation, s)
        zs.append(z)
        slopes.append(slope)
    w_out = params["w_out"]  # (K, h)
    F = torch.bmm(z, w_out.unsqueeze(2)).squeeze(2) / w_out.shape[1]
    return F, zs, slopes


def fc_backward_update(
    params: Params,
    zs: list[torch.Tensor],
    slopes: list[torch.Tensor],
    g_F: torch.Tensor,
    update: torch.Tensor,
) -> None:
    """w <- w - d(sum_k g_F[k] . F_k)/dw in place, for every member: g_F (K, B) is the step
    size times dloss/dF, zero where ``update`` (K,) is False. The factors of each product
    are masked with ``where`` (not multiplied by zero), so a member with non-finite
    activations (one that diverged) gets exactly no update."""
    L = len(slopes)
    w_out = params["w_out"]
    h = w_out.shape[1]
    keep = update.view(-1, 1, 1)
    delta = g_F.unsqueeze(2) * w_out.unsqueeze(1) / h  # dloss/dz_L, before w_out changes
    z = torch.where(keep, zs[L], 0)
    w_out.unsqueeze(1).baddbmm_(g_F.unsqueeze(1), z, alpha=-1.0 / h)
    for layer in reversed(range(L)):
        W = params[f"W{layer}"]
        g_pre = torch.where(keep, delta * slopes[layer], 0)  # (K, B, h)
        scale = 1.0 / math.sqrt(W.shape[2])
        if layer:
            delta = torch.bmm(g_pre, W) * scale  # dloss/dz_layer, before W changes
        z = torch.where(keep, zs[layer], 0)
        W.baddbmm_(g_pre.transpose(1, 2), z, alpha=-scale)
