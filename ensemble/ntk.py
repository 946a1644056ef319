"""The empirical neural tangent kernel and its change over training (science.md,
"What is measured": optional, on the first n points).

K(x_a, x_b) = sum over every parameter p of dF(x_a)/dp dF(x_b)/dp, with F the network's
raw output (the kernel of f = alpha (F - F0) is alpha^2 K, so the relative change is the
same). The change is mean((K - K0)^2) / mean(K0^2) over the n x n entries, K0 at
initialisation: near 0 in the lazy regime (large alpha), of order 1 where features are
learned.
"""

from __future__ import annotations

import torch
from torch.func import jacrev, vmap

from ensemble.models import Model, Params


def empirical_ntk(model: Model, params: Params, x: torch.Tensor) -> torch.Tensor:
    """K (n, n) of one network (``params`` without a member dimension) on the points ``x``
    (n, ...), in float64: the model's own ``ntk`` where it has one (FC: by layer), else
    `jacobian_ntk`."""
    if model.ntk is not None:
        return model.ntk(params, x)
    return jacobian_ntk(model, params, x)


def jacobian_ntk(model: Model, params: Params, x: torch.Tensor) -> torch.Tensor:
    """K = J J^T from the per-point gradients J, taken in the parameters' dtype
    (n x n_params numbers at once); only their products are summed in float64."""
    n = x.shape[0]

    def output(w: Params, xi: torch.Tensor) -> torch.Tensor:
        return model.forward(w, xi.unsqueeze(0))[0]

    grads = vmap(jacrev(output), in_dims=(None, 0))(params, x)  # name -> (n, *shape)
    J = torch.cat([g.reshape(n, -1) for g in grads.values()], dim=1).double()
    return J @ J.T


def kernel_change(K: torch.Tensor, K0: torch.Tensor) -> float:
    """mean((K - K0)^2) / mean(K0^2); NaN where either kernel is not finite."""
    ratio = ((K - K0) ** 2).mean() / (K0**2).mean()
    return float(ratio) if torch.isfinite(ratio) else float("nan")


def ntk_change(model: Model, params: Params, params0: Params, x: torch.Tensor) -> float:
    """`kernel_change` of the empirical NTK on ``x`` from ``params0`` to ``params`` (one
    network each)."""
    return kernel_change(empirical_ntk(model, params, x), empirical_ntk(model, params0, x))
