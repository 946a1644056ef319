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
  (stopped, or non-finite) is skipped: its weights are untouched, as in ``ensemble.fused``;
- the first layer reads its batch from the data pool by row (no gathered copy), and its
  update also computes the next step's pre-activation from each new slice of W0 while
  it is in registers (``FirstLayer``), so the next forward pass does not read W0.

So the first layer's weights are read and written once per step, and the others read
once forward and read and written once in the update: for FC-5L on MNIST (W0 holds 60 %
of the weights) 2.4 passes over the weights per step, against 3 without the carry
(``CARRY``) and about 3.4 for ``ensemble.fused``, whose products are below bandwidth.
Products are float32 FMA (``DOT_PRECISION = "ieee"``: no TF32) or float64. Same
arithmetic as ``ensemble.fused`` up to float rounding (tested on the CPU through Triton's
interpreter, ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ensemble.fused import _INV_SQRT_2, _INV_SQRT_2PI, readout, readout_backward_update
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

CARRY = True
"""Carry the first layer's pre-activation from each update to the next step's forward
pass (``FirstLayer``); False, for experiments, recomputes it in every forward pass."""


@triton.jit
def _columns(Rows, k, cols, cmask, B, fan_in, su_k, su_b, FIRST: tl.constexpr):
    """Offsets of member k's B input columns: its batch's rows of the pool (FIRST), or
    its own strided input."""
    if FIRST:
        off = tl.load(Rows + k * B + cols, mask=cmask, other=0) * fan_in
    else:
        off = k * su_k + cols * su_b
    return off


@triton.jit
def _forward_layer(
    W,  # (K, H, fan_in), contiguous
    U,  # layer input (K, fan_in, B), strides (su_k, su_d, su_b); FIRST: the pool (N, fan_in)
    Rows,  # FIRST: (K, B) int64, the rows of the pool in this step's batches
    Pre,  # CARRY: (K, H, B), the carried pre-activation scale W x^T of step PreStep
    PreStep,  # CARRY: (K,) int64
    Step,  # CARRY: (K,) int64, the members' step counters
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
    FIRST: tl.constexpr,
    CARRY: tl.constexpr,
    GELU: tl.constexpr,
    PRECISION: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BH)
    cols = tl.arange(0, BB)
    rmask = rows < H
    cmask = cols < B
    out = k * H * B + rows[:, None] * B + cols[None, :]
    omask = rmask[:, None] & cmask[None, :]
    if CARRY:  # the first layer, carrying its pre-activation
        carried = tl.load(PreStep + k) == tl.load(Step + k)
    else:
        carried = False
    if carried:  # computed by the last step's update, from the weights as they are now
        pre = tl.load(Pre + out, mask=omask, other=0.0)
    else:
        col = _columns(Rows, k, cols, cmask, B, fan_in, su_k, su_b, FIRST)
        acc = tl.zeros((BH, BB), dtype=W.dtype.element_ty)
        for d0 in range(0, fan_in, BD):
            ds = d0 + tl.arange(0, BD)
            dmask = ds < fan_in
            w = tl.load(
                W + k * H * fan_in + rows[:, None] * fan_in + ds[None, :],
                mask=rmask[:, None] & dmask[None, :],
                other=0.0,
            )
            umask = dmask[:, None] & cmask[None, :]
            u = tl.load(U + ds[:, None] * su_d + col[None, :], mask=umask, other=0.0)
            acc += tl.dot(w, u, input_precision=PRECISION)
        pre = acc * tl.load(Consts)
        if CARRY:
            tl.store(Pre + out, pre, mask=omask)
            tl.store(PreStep + k, tl.load(Step + k))
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
    U,  # layer input (K, fan_in, B), strides (su_k, su_d, su_b); FIRST: the pool (N, fan_in)
    Rows,  # FIRST: (K, B) int64, the rows of the pool in this step's batches
    RowsNext,  # CARRY: (K, B) int64, the rows of the pool in the next step's batches
    Pre,  # CARRY, out: (K, H, B), scale W x^T of the next step, from the updated W
    PreStep,  # CARRY, out: (K,) int64, set to Step + 1
    Step,  # CARRY: (K,) int64, the members' step counters (before this step's increment)
    Keep,  # (K,) bool: the member updates
    Gprev,  # not FIRST, out: the layer below's G, (K, fan_in, B) contiguous
    SlopePrev,  # not FIRST, gelu: the layer below's act'(pre), (K, fan_in, B)
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
    FIRST: tl.constexpr,
    CARRY: tl.constexpr,
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
        out = k * H * B + rows[:, None] * B + cols[None, :]
        omask = rmask[:, None] & cmask[None, :]
        g = tl.load(G + out, mask=omask, other=0.0)  # (BH, BB), read once for all slices
        col = _columns(Rows, k, cols, cmask, B, fan_in, su_k, su_b, FIRST)
        if CARRY:  # the first layer, carrying its pre-activation
            col_next = _columns(RowsNext, k, cols, cmask, B, fan_in, su_k, su_b, FIRST)
            acc = tl.zeros((BH, BB), dtype=W.dtype.element_ty)
        for d0 in range(0, fan_in, BD):
            ds = d0 + tl.arange(0, BD)
            dmask = ds < fan_in
            w_ptr = W + k * H * fan_in + rows[:, None] * fan_in + ds[None, :]
            wmask = rmask[:, None] & dmask[None, :]
            w = tl.load(w_ptr, mask=wmask, other=0.0)  # (BH, BD)
            umask = dmask[:, None] & cmask[None, :]
            u = tl.load(U + ds[:, None] * su_d + col[None, :], mask=umask, other=0.0)  # (BD, BB)
            if not FIRST:  # the layer below's G, from W before it changes
                d_prev = tl.dot(tl.trans(w), g, input_precision=PRECISION) * scale  # (BD, BB)
                below = k * fan_in * B + ds[:, None] * B + cols[None, :]
                if GELU:
                    g_prev = d_prev * tl.load(SlopePrev + below, mask=umask, other=0.0)
                else:  # relu: u = relu(pre below) > 0 exactly where its slope is 1
                    g_prev = tl.where(u > 0, d_prev, 0.0)
                tl.store(Gprev + below, g_prev, mask=umask)
            w = w - tl.dot(g, tl.trans(u), input_precision=PRECISION) * scale
            tl.store(w_ptr, w, mask=wmask)
            if CARRY:  # the next step's pre-activation, while the new slice is in registers
                x = tl.load(U + ds[:, None] * su_d + col_next[None, :], mask=umask, other=0.0)
                acc += tl.dot(w, x, input_precision=PRECISION)
        if CARRY:
            tl.store(Pre + out, acc * scale, mask=omask)
            tl.store(PreStep + k, tl.load(Step + k) + 1)


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


@dataclass
class FirstLayer:
    """The first layer's side of a step: its input read from the data pool by row (no
    gathered copy of the batch) and its pre-activation carried from step to step.

    The update of W0 also computes the next step's scale W0 x^T, while each new slice of
    W0 is in registers, so the next forward pass reads W0 only where nothing is carried:
    for FC-5L on MNIST W0 holds 60 % of the weights, and the step makes 2.4 passes over
    them instead of 3. ``pre`` is what the engine keeps per slot; ``pre_step`` names the
    step it belongs to, so a member whose counter moved otherwise (a new member in the
    slot: set -1; skipped steps) has its pre-activation recomputed.

    src       : (N, d_in) the resident data pool, contiguous, in the weights' dtype
    rows      : (K, B) int64, the rows of ``src`` in this step's batches
    rows_next : (K, B) int64, the rows in the next step's batches
    pre       : (K, h, B), the carried pre-activation (updated in place)
    pre_step  : (K,) int64, the step ``pre`` is for; -1 for none (updated in place)
    step      : (K,) int64, the members' step counters
    """

    src: torch.Tensor
    rows: torch.Tensor
    rows_next: torch.Tensor
    pre: torch.Tensor
    pre_step: torch.Tensor
    step: torch.Tensor

    def strides(self) -> tuple[int, int, int]:
        """(su_k, su_d, su_b) of the pool for the kernels: a column is a row of src."""
        for name in ("src", "rows", "rows_next", "pre", "pre_step", "step"):
            assert getattr(self, name).is_contiguous(), f"the kernels index {name} row-major"
        return 0, 1, 0


def fc_forward(
    params: Params, first: FirstLayer, L: int, activation: str
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """As ``ensemble.fused.fc_forward``, with the batch given by ``first``: returns
    (F (K, B), acts, slopes), where acts[l] = act(pre_l), (K, h, B), is the input of
    layer l + 1 (the first layer's input is ``first``'s batch). The slopes list is empty
    for relu (the backward pass reads them off acts)."""
    s = activation_scale(activation)
    gelu = activation == "gelu"
    K, B = first.rows.shape
    acts, slopes = [], []
    for layer in range(L):
        W = params[f"W{layer}"]
        assert W.is_contiguous(), "the kernels index W as (K, h, fan_in), row-major"
        H, fan_in = W.shape[1:]
        u = acts[-1] if layer else first.src
        out = torch.empty(K, H, B, dtype=W.dtype, device=W.device)
        slope = torch.empty_like(out) if gelu else out
        consts = _consts((s if layer else 1.0) / math.sqrt(fan_in), W)
        _forward_layer[(K,)](
            W, u, first.rows, first.pre, first.pre_step, first.step, out, slope, consts,
            H, fan_in, B, *(u.stride() if layer else first.strides()),
            BH=_block(H), BB=_block(B), BD=FORWARD_BD, FIRST=layer == 0,
            CARRY=CARRY and layer == 0, GELU=gelu,
            PRECISION=_precision(W.dtype), num_warps=NUM_WARPS,
        )  # fmt: skip
        acts.append(out)
        if gelu:
            slopes.append(slope)
    return readout(params["w_out"], acts[-1], s), acts, slopes


def fc_backward_update(
    params: Params,
    first: FirstLayer,
    acts: list[torch.Tensor],
    slopes: list[torch.Tensor],
    g_F: torch.Tensor,
    update: torch.Tensor,
    activation: str,
) -> None:
    """As ``ensemble.fused.fc_backward_update``: w <- w - d(sum_k g_F[k] . F_k)/dw in
    place for the members where ``update`` (K,) is True; the others are not touched.
    For the members that update, also ``first.pre`` <- the next step's first-layer
    pre-activation and ``first.pre_step`` <- step + 1 (the caller then counts the step)."""
    s = activation_scale(activation)
    gelu = activation == "gelu"
    L = len(acts)
    K, B = g_F.shape
    delta = readout_backward_update(params["w_out"], acts[-1], g_F, update.view(-1, 1, 1), s)
    # the top layer's G; members that do not update are skipped by the kernels
    g = delta * slopes[-1] if gelu else torch.where(acts[-1] > 0, delta, 0)
    for layer in reversed(range(L)):
        W = params[f"W{layer}"]
        assert W.is_contiguous(), "W is updated in place"
        H, fan_in = W.shape[1:]
        u = acts[layer - 1] if layer else first.src
        g_prev = torch.empty(K, fan_in, B, dtype=W.dtype, device=W.device) if layer else g
        consts = _consts((s if layer else 1.0) / math.sqrt(fan_in), W)
        _backward_layer[(K,)](
            W, g, u, first.rows, first.rows_next, first.pre, first.pre_step, first.step,
            update, g_prev, slopes[layer - 1] if gelu and layer else g, consts,
            H, fan_in, B, *(u.stride() if layer else first.strides()),
            BH=_block(H), BB=_block(B), BD=BACKWARD_BD, FIRST=layer == 0,
            CARRY=CARRY and layer == 0, GELU=gelu,
            PRECISION=_precision(W.dtype), num_warps=NUM_WARPS,
        )  # fmt: skip
        g = g_prev
