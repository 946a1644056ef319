"""The fused FC step (``ensemble.fused``) with each layer's products and elementwise work
in one Triton kernel: the opt-in GPU path ``Engine(triton=True)``.

``ensemble.fused`` runs a layer as a batched cuBLAS product plus elementwise kernels. On an
H200 at K = 8192 (``bench --profile``) the first layer's forward product alone took 2.75 ms
of a 9.5 ms step, 3.5 times its bandwidth time: cuBLAS pads B = 16 to a 64-wide tile. Here:

- forward, one program per member: pre = scale W u over the layer's fan-in in BD-wide
  slices (all h rows at once, so u is read once), the activation in the same kernel
  (relu keeps NaN, as torch does; gelu also stores its slope);
- backward and update, one program per member, over the fan-in in BD-wide slices of W
  (g read once): each slice is read once, gives its part of scale W^T g (before W
  changes), turned into the next layer's g (relu: where u > 0; gelu: times the stored
  slope), and is written back as W - scale g u^T. A member that does not update
  (stopped, or non-finite) is skipped: its weights are untouched, as in ``ensemble.fused``.

So each weight is read once in the forward pass and read and written once in the update,
three passes per step (``ensemble.fused`` makes about 3.4, with the products below
bandwidth). Products are float32 FMA (``DOT_PRECISION = "ieee"``: no TF32) or float64.
Same arithmetic as ``ensemble.fused`` up to float rounding (tested on the CPU through
Triton's interpreter, ``TRITON_INTERPRET=1``). Interface as ``ensemble.fused``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ensemble.fused import readout, readout_backward_update
from ensemble.models import Params, activation_scale

FORWARD_BD = 16
"""Fan-in slice per iteration of the forward kernel (rows: all h of the layer)."""
BACKWARD_BD = 16
"""Fan-in slice (columns of W) per iteration of a backward-update program."""
NUM_WARPS = 8
"""Slices and warps chosen from the compiled sm_90 code (Triton 3.8, h = 128, B = 16;
``tests/ensemble/test_fused_triton.py`` compiles it without a GPU): no spills in float32
or float64, and the most programs per multiprocessor (forward 80 and backward 118
registers a thread in float32: 3 and 2 programs of 8 warps). Slices of 64 with 4 warps,
the first choice, spilled up to 6 KB a thread in the backward kernel. Not yet timed."""
DOT_PRECISION = "ieee"
"""``tl.dot``'s float32 arithmetic: "ieee" (FMA, float32 rounding: the default), or for
experiments "tf32x3" (three TF32 tensor-core products per product, close to float32
rounding) and "tf32". Float64 is always "ieee"."""

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@triton.jit
def _forward_layer(
    W,  # (K, H, fan_in), contiguous
    U,  # layer input, (K, fan_in, B) with strides (su_k, su_d, su_b)
    Out,  # act(pre), (K, H, B) contiguous
    Slope,  # gelu: act'(pre), (K, H, B); unused for relu
    Consts,  # (scale, 1 / sqrt(2), 1 / sqrt(2 pi)) in W's dtype
    H,
    fan_in,
    B,
    su_k,
    su_d,
    su_b,
    BH: tl.constexpr,
    BB: tl.constexpr,
    BD: tl.constexpr,
    GELU: tl.constexpr,
    PRECISION: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BH)
    cols = tl.arange(0, BB)
    rmask = rows < H
    cmask = cols < B
    acc = tl.zeros((BH, BB), dtype=W.dtype.element_ty)
    w_base = W + k * H * fan_in
    u_base = U + k * su_k
    for d0 in range(0, fan_in, BD):
        ds = d0 + tl.arange(0, BD)
        dmask = ds < fan_in
        w = tl.load(
            w_base + rows[:, None] * fan_in + ds[None, :],
            mask=rmask[:, None] & dmask[None, :],
            other=0.0,
        )
        u = tl.load(
            u_base + ds[:, None] * su_d + cols[None, :] * su_b,
            mask=dmask[:, None] & cmask[None, :],
            other=0.0,
        )
        acc += tl.dot(w, u, input_precision=PRECISION)
    pre = acc * tl.load(Consts)
    out = k * H * B + rows[:, None] * B + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    if GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(pre * tl.load(Consts + 1)))
        tl.store(Out + out, pre * cdf, mask=omask)
        slope = cdf + pre * tl.exp(-0.5 * pre * pre) * tl.load(Consts + 2)
        tl.store(Slope + out, slope, mask=omask)
    else:  # relu; NaN stays NaN (torch.relu), so a diverged member's loss is not finite
        tl.store(Out + out, tl.where(pre > 0, pre, tl.where(pre == pre, 0.0, pre)), mask=omask)


@triton.jit
def _backward_layer(
    W,  # (K, H, fan_in), updated in place
    G,  # step size x dloss/dpre of this layer, (K, H, B) contiguous
    U,  # layer input, (K, fan_in, B) with strides (su_k, su_d, su_b)
    Keep,  # (K,) bool: the member updates
    Gprev,  # out: the layer below's G, (K, fan_in, B) contiguous
    SlopePrev,  # gelu: the layer below's act'(pre), (K, fan_in, B); relu: unused
    Consts,  # (scale, ...) in W's dtype
    H,
    fan_in,
    B,
    su_k,
    su_d,
    su_b,
    BH: tl.constexpr,
    BB: tl.constexpr,
    BD: tl.constexpr,
    HAS_PREV: tl.constexpr,
    GELU: tl.constexpr,
    PRECISION: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    if tl.load(Keep + k) != 0:
        scale = tl.load(Consts)
        rows = tl.arange(0, BH)
        cols = tl.arange(0, BB)
        rmask = rows < H
        cmask = cols < B
        g = tl.load(
            G + k * H * B + rows[:, None] * B + cols[None, :],
            mask=rmask[:, None] & cmask[None, :],
            other=0.0,
        )  # (BH, BB), read once for all slices
        for d0 in range(0, fan_in, BD):
            ds = d0 + tl.arange(0, BD)
            dmask = ds < fan_in
            w_ptr = W + k * H * fan_in + rows[:, None] * fan_in + ds[None, :]
            wmask = rmask[:, None] & dmask[None, :]
            w = tl.load(w_ptr, mask=wmask, other=0.0)  # (BH, BD)
            umask = dmask[:, None] & cmask[None, :]
            u = tl.load(
                U + k * su_k + ds[:, None] * su_d + cols[None, :] * su_b, mask=umask, other=0.0
            )  # (BD, BB)
            if HAS_PREV:  # the layer below's G, from W before it changes
                d_prev = tl.dot(tl.trans(w), g, input_precision=PRECISION) * scale  # (BD, BB)
                out = k * fan_in * B + ds[:, None] * B + cols[None, :]
                if GELU:
                    slope = tl.load(SlopePrev + out, mask=umask, other=0.0)
                    g_prev = d_prev * slope
                else:  # relu: u = relu(pre below) > 0 exactly where its slope is 1
                    g_prev = tl.where(u > 0, d_prev, 0.0)
                tl.store(Gprev + out, g_prev, mask=umask)
            w = w - tl.dot(g, tl.trans(u), input_precision=PRECISION) * scale
            tl.store(w_ptr, w, mask=wmask)


_CONSTS: dict[tuple[float, torch.dtype, torch.device], torch.Tensor] = {}


def _consts(scale: float, like: torch.Tensor) -> torch.Tensor:
    """(scale, 1 / sqrt(2), 1 / sqrt(2 pi)) on ``like``'s device in its dtype: a kernel's
    float arguments would be float32, which float64 members must not be rounded to.
    Cached, so that a CUDA graph capture (after warm-up steps) makes no copies."""
    key = (scale, like.dtype, like.device)
    if key not in _CONSTS:
        values = [scale, _INV_SQRT_2, _INV_SQRT_2PI]
        _CONSTS[key] = torch.tensor(values, dtype=like.dtype, device=like.device)
    return _CONSTS[key]


def _precision(dtype: torch.dtype) -> str:
    return DOT_PRECISION if dtype == torch.float32 else "ieee"


def _block(n: int) -> int:
    """A power of two >= max(n, 16) (``tl.dot`` needs dimensions of at least 16)."""
    return max(16, triton.next_power_of_2(n))


def fc_forward(
    params: Params, x: torch.Tensor, L: int, activation: str
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """As ``ensemble.fused.fc_forward``: (F (K, B), layer inputs (K, width, B), slopes).
    The slopes list is empty for relu (the backward pass reads them off the inputs)."""
    s = activation_scale(activation)
    gelu = activation == "gelu"
    K, B, _ = x.shape
    u = x.transpose(1, 2)  # (K, d_in, B), a view
    us, slopes = [u], []
    for layer in range(L):
        W = params[f"W{layer}"]
        assert W.is_contiguous(), "the kernels index W as (K, h, fan_in), row-major"
        H, fan_in = W.shape[1:]
        out = torch.empty(K, H, B, dtype=W.dtype, device=W.device)
        slope = torch.empty_like(out) if gelu else out
        consts = _consts((s if layer else 1.0) / math.sqrt(fan_in), W)
        _forward_layer[(K,)](
            W, u, out, slope, consts, H, fan_in, B, *u.stride(),
            BH=_block(H), BB=_block(B), BD=FORWARD_BD, GELU=gelu, PRECISION=_precision(W.dtype),
            num_warps=NUM_WARPS,
        )  # fmt: skip
        u = out
        us.append(out)
        if gelu:
            slopes.append(slope)
    return readout(params["w_out"], u, s), us, slopes


def fc_backward_update(
    params: Params,
    us: list[torch.Tensor],
    slopes: list[torch.Tensor],
    g_F: torch.Tensor,
    update: torch.Tensor,
    activation: str,
) -> None:
    """As ``ensemble.fused.fc_backward_update``: w <- w - d(sum_k g_F[k] . F_k)/dw in
    place for the members where ``update`` (K,) is True; the others are not touched."""
    s = activation_scale(activation)
    gelu = activation == "gelu"
    L = len(us) - 1
    K, B = g_F.shape
    delta = readout_backward_update(params["w_out"], us[L], g_F, update.view(-1, 1, 1), s)
    # the top layer's G; members that do not update are skipped by the kernels
    g = delta * slopes[L - 1] if gelu else torch.where(us[L] > 0, delta, 0)
    for layer in reversed(range(L)):
        W = params[f"W{layer}"]
        assert W.is_contiguous(), "W is updated in place"
        H, fan_in = W.shape[1:]
        u = us[layer]
        g_prev = torch.empty(K, fan_in, B, dtype=W.dtype, device=W.device) if layer else g
        consts = _consts((s if layer else 1.0) / math.sqrt(fan_in), W)
        _backward_layer[(K,)](
            W, g, u, update, g_prev, slopes[layer - 1] if gelu and layer else g, consts,
            H, fan_in, B, *u.stride(),
            BH=_block(H), BB=_block(B), BD=BACKWARD_BD, HAS_PREV=layer > 0, GELU=gelu,
            PRECISION=_precision(W.dtype), num_warps=NUM_WARPS,
        )  # fmt: skip
        g = g_prev
