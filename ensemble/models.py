"""FC-L, MNAS(h) and the perceptron as pure functions of a parameter dictionary.

Conventions (science.md, "Models"): every parameter is N(0, 1) at initialisation, the
scaling lives in the forward pass, no biases except MNAS's readout. ``forward(params, x)``
takes one network's parameters and a batch ``x`` and returns F(w, x) of shape (n,); it
is written for one member and vectorised over members with ``torch.func.vmap``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from ensemble.cells import INPUT_SHAPE, Group

Params = dict[str, torch.Tensor]


@cache
def activation_scale(name: str) -> float:
    """1 / sqrt(E[phi(g)^2]) for g ~ N(0, 1), so that the scaled phi has unit second moment.

    relu: E[relu(g)^2] = 1/2, giving sqrt(2). gelu (exact, erf form): Gauss-Hermite
    quadrature with 200 nodes (error far below float64 rounding of the result).
    """
    if name == "relu":
        return math.sqrt(2.0)
    if name == "gelu":
        g, w = np.polynomial.hermite_e.hermegauss(200)  # weight exp(-g^2 / 2)
        vals = F.gelu(torch.from_numpy(g)).numpy()
        second_moment = float((w * vals**2).sum() / w.sum())
        return 1.0 / math.sqrt(second_moment)
    raise ValueError(f"activation must be 'relu' or 'gelu', got {name!r}")


def normalised_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """phi(z) / sqrt(E[phi(g)^2]): relu becomes sqrt(2) relu; gelu likewise rescaled."""
    scale = activation_scale(name)
    base = F.relu if name == "relu" else F.gelu
    return lambda z: base(z) * scale


@dataclass(frozen=True)
class Model:
    """A network as a pure function: ``shapes`` (ordered) and ``forward(params, x) -> (n,)``;
    ``ntk(params, x) -> (n, n)``, where given, is its empirical NTK computed from the
    architecture (``ensemble.ntk.empirical_ntk`` falls back to per-point Jacobians)."""

    shapes: dict[str, tuple[int, ...]]
    forward: Callable[[Params, torch.Tensor], torch.Tensor]
    ntk: Callable[[Params, torch.Tensor], torch.Tensor] | None = None

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())


def build_model(group: Group, channels_last: bool = False) -> Model:
    """The network of ``group.arch`` for ``group.dataset``'s inputs.

    ``channels_last``: MNAS keeps its activations in (n, H, W, C) memory (the same
    function, another layout), which oneDNN's CPU convolutions run 2-4x faster; it
    survives ``vmap`` only one member at a time (see engine.MEMBER_CHUNK)."""
    if group.arch == "fc":
        return _fc(group)
    if group.arch == "mnas":
        return _mnas(group, channels_last)
    return _perceptron(group.d)


def init_params(model: Model, seed: int, dtype: torch.dtype, device: torch.device) -> Params:
    """N(0, 1) parameters drawn on the CPU from a generator seeded by ``seed``, in the
    order of ``model.shapes``, so a member's initialisation is identical on every device
    and in every ensemble."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in model.shapes.items():
        out[name] = torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
    return out


def _fc(group: Group) -> Model:
    """FC-L: x <- phi(W_l x / sqrt(fan_in)) for l = 0..L-1, F = w_out . x / h (mean field)."""
    d_in = math.prod(INPUT_SHAPE[group.dataset])
    h, L = group.h, group.L
    shapes = {"W0": (h, d_in)}
    for layer in range(1, L):
        shapes[f"W{layer}"] = (h, h)
    shapes["w_out"] = (h,)
    phi = normalised_activation(group.activation)

    def forward(params: Params, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1)  # (n, d_in)
        for layer in range(L):
            W = params[f"W{layer}"]  # (h, fan_in)
            z = phi(z @ W.T / math.sqrt(W.shape[1]))  # (n, h)
        return z @ params["w_out"] / h  # (n,)

    def ntk(params: Params, x: torch.Tensor) -> torch.Tensor:
        """Empirical NTK (n, n) in float64, by layer: a point's dF/dW_l is
        delta_l a_l^T / sqrt(fan_in), with a_l the layer's input and delta_l = dF/du_l at
        its pre-activation u_l, so K = sum_l (delta_l delta_l^T)(a_l a_l^T) / fan_in
        (elementwise) + a_L a_L^T / h^2: n^2 (h + fan_in) products per layer instead of
        n^2 h fan_in. The deltas and activations are in the parameters' dtype (one
        backward pass of sum F: a point's F depends only on its own u_l), their products
        summed in float64."""

        def total(offsets: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
            """sum of F over the points, u_l shifted by offsets[l] (zero); and the a_l."""
            acts, z = [], x.flatten(1)
            for layer in range(L):
                W = params[f"W{layer}"]
                acts.append(z)
                z = phi(z @ W.T / math.sqrt(W.shape[1]) + offsets[layer])
            return (z @ params["w_out"]).sum() / h, [*acts, z]

        zeros = [x.new_zeros(x.shape[0], h) for _ in range(L)]
        deltas, a = torch.func.grad(total, has_aux=True)(zeros)
        gram = lambda m: m.double() @ m.double().T  # noqa: E731
        K = gram(a[L]) / h**2
        for layer in range(L):
            K += gram(deltas[layer]) * gram(a[layer]) / a[layer].shape[1]
        return K

    return Model(shapes, forward, ntk)


def _same_pad(size: int, k: int, stride: int) -> tuple[int, int]:
    """'SAME' padding as in JAX/TF (extra pixel at the end), which the reference code used."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def _conv(x: torch.Tensor, W: torch.Tensor, stride: int = 1, groups: int = 1) -> torch.Tensor:
    """Conv with 'SAME' padding; x (n, C, H, W); W (C_out, C_in / groups, k, k).

    The convolution pads symmetrically by the larger side (r) itself, and a kernel that
    'SAME' pads less on its leading side (l < r) gets r - l leading zero rows and columns:
    the same sums, without a padded copy of x (a copy that would also lose a
    channels-last layout under vmap)."""
    k = W.shape[-1]
    if k == 1:
        return F.conv2d(x, W, stride=stride, groups=groups)
    top, bottom = _same_pad(x.shape[-2], k, stride)
    left, right = _same_pad(x.shape[-1], k, stride)
    if (top, left) != (bottom, right):
        W = F.pad(W, (right - left, 0, bottom - top, 0))
    return F.conv2d(x, W, stride=stride, groups=groups, padding=(bottom, right))


def _mnas(group: Group, channels_last: bool = False) -> Model:
    """MNAS(h): normalised convs (conv / (k sqrt(C_in)), depthwise / k), see science.md.

    stem 5x5/2 to 4h, depthwise 5x5, 1x1 to 2h; inverted residual blocks (expand x3,
    depthwise 5x5 with the block's stride, project; (x + res) / sqrt(2) when the shapes
    match) with (C_out, stride) = (h, 2), (h, 1), (3h, 2), (3h, 1); 1x1 to 20h; global
    average pool; F = (w . pooled + b) / (20h).
    """
    c_in, h = INPUT_SHAPE[group.dataset][0], group.h
    k = 5
    shapes: dict[str, tuple[int, ...]] = {
        "stem": (4 * h, c_in, k, k),
        "stem_dw": (4 * h, 1, k, k),
        "stem_pw": (2 * h, 4 * h, 1, 1),
    }
    blocks = [(h, 2), (h, 1), (3 * h, 2), (3 * h, 1)]
    c = 2 * h
    for i, (c_out, _) in enumerate(blocks):
        shapes[f"b{i}_expand"] = (3 * c, c, 1, 1)
        shapes[f"b{i}_dw"] = (3 * c, 1, k, k)
        shapes[f"b{i}_project"] = (c_out, 3 * c, 1, 1)
        c = c_out
    shapes["head"] = (20 * h, c, 1, 1)
    shapes["w_out"] = (20 * h,)
    shapes["b_out"] = ()
    phi = normalised_activation(group.activation)

    # the normalisations scale the (small) kernels rather than the (large) outputs
    def conv(x: torch.Tensor, W: torch.Tensor, stride: int = 1) -> torch.Tensor:
        return _conv(x, W / (W.shape[-1] * math.sqrt(W.shape[1])), stride)

    def depthwise(x: torch.Tensor, W: torch.Tensor, stride: int = 1) -> torch.Tensor:
        return _conv(x, W / W.shape[-1], stride, groups=W.shape[0])

    def forward(params: Params, x: torch.Tensor) -> torch.Tensor:
        if channels_last:  # (n, C, H, W) indexed, (n, H, W, C) in memory; convs keep it
            x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        z = phi(conv(x, params["stem"], stride=2))  # (n, 4h, H/2, W/2)
        z = phi(depthwise(z, params["stem_dw"]))
        z = phi(conv(z, params["stem_pw"]))  # (n, 2h, H/2, W/2)
        for i, (_, stride) in enumerate(blocks):
            res = z
            z = phi(conv(z, params[f"b{i}_expand"]))
            z = phi(depthwise(z, params[f"b{i}_dw"], stride))
            z = conv(z, params[f"b{i}_project"])
            if z.shape == res.shape:
                z = (z + res) / math.sqrt(2.0)
        z = phi(conv(z, params["head"]))  # (n, 20h, H/8, W/8)
        pooled = z.mean(dim=(-2, -1))  # (n, 20h)
        return (pooled @ params["w_out"] + params["b_out"]) / (20 * h)

    return Model(shapes, forward)


def _perceptron(d: int) -> Model:
    """F(w, x) = w . x / sqrt(d)."""

    def forward(params: Params, x: torch.Tensor) -> torch.Tensor:
        return x @ params["w"] / math.sqrt(d)

    return Model({"w": (d,)}, forward)
