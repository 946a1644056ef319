"""Train an ensemble of networks at once on one device with ``torch.func.vmap``.

All members of an ``Engine`` share a ``Group`` (dataset, architecture, widths, P, B,
budgets, dtype) and differ in (alpha, T, seed). The engine owns a pool of K member
*slots*; each slot has its own step counter, so when a member stops its slot is refilled
with the next pending member (continuous batching). Knows nothing of Dask or Zarr.

Physics (science.md, "Output scale, loss, dynamics"):

- prediction f(w, x) = F(w, x) - F(w0, x), zero at initialisation;
- per-sample loss hinge(alpha f y) / alpha = relu(1 - alpha f y) / alpha, batch mean;
- plain SGD, w <- w - dt grad, dt = T h B (h = 1 for the perceptron);
- each step draws B distinct training indices, a pure function of (member seed, step)
  (``draw_batch``), so a member's trajectory does not depend on its batch-mates;
- stop at exactly zero training loss (every point has alpha f y >= 1), at a non-finite
  batch loss (diverged), or at the step / time budget (unfinished).

How t* is resolved exactly without a full-training-set check at every step: zero
training loss is absorbing, because then every batch loss is zero, the gradient is
exactly zero and the weights never change again. Hence the first step s* with zero
training loss is one past the last step whose batch loss was non-zero, which the engine
tracks on the device for free (``last_active``). A full check is made only for a member
whose batch loss has been zero for a whole epoch (P/B steps) and whose weights changed
since its last check; when it passes, s* = last_active + 1 and t* = dt s*, exactly. The
weights at detection are the weights at s*.

The check evaluates F with the step's own forward pass (for FC, the fused one, with
which on the CPU a point's F does not depend on its batch, bit for bit, in a one-thread
process such as a Dask worker: tested). Where the two still round differently (on a GPU,
where cuBLAS picks kernels by shape; the Triton step, whose check runs in torch; with
several CPU threads, where a product of one member's weights can round differently from
a product of several members'; the perceptron's and MNAS's batched products, whose
rounding can depend on the number of points), in float32 at alpha = 2^15 the margins
1 - alpha f y can differ by about 0.01, and a point the step sees fitted and the check
does not would stall a member: its step never trains on it again, its check never
passes. So a member whose check failed and whose step has stayed quiet for
STALL_EPOCHS more epochs (its weights unchanged since the check) is stopped as converged
at s* = last_active + 1: in the arithmetic of its own SGD steps it has stopped moving.
Its final training loss, which the check computes, is then a rounding-level positive
number (``MemberResult.train_loss``; ``EngineStats.stalled`` counts them).

Quiet-step skipping (``skip_quiet``, on by default for the perceptron): a step whose B
drawn points all have alpha f y >= 1 has exactly zero gradient, so it changes nothing
but the step counter. Late in training almost every step is such a no-op (perceptron at
chi = 0: 98 % of the 1.9e5 steps at P = 1024). Since draws are a pure function of
(seed, step) and the weights are frozen between active steps, the engine looks ahead
over a window of S future steps of every member in one batched forward pass (fixed
weights, S * B points), jumps each member's counter to its first possibly active step
(``_skip``) and runs the real step there. The look-ahead only decides which steps are
certainly no-ops, with a rounding margin (SKIP_ULPS), so the trajectory is the plain
engine's, bit for bit; the window adapts to the observed gaps.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import grad_and_value, vmap

from ensemble import data as datasets
from ensemble import fused as fused_torch
from ensemble.cells import Group, Member, SpecError
from ensemble.models import Model, Params, build_model, init_params
from ensemble.ntk import empirical_ntk, kernel_change
from ensemble.schema import (
    CONVERGED,
    DIVERGED,
    N_CHECKPOINTS,
    N_CKPT_TEST,
    UNFINISHED,
    checkpoint_steps,
)

# Streams of numpy.random.SeedSequence([stream, seed]) that derive a member's random
# numbers from its seed; the training set's stream lives in ensemble.data.
INIT_STREAM = 0x1A17
BATCH_STREAM = 0xBA7C

_FREE, _RUNNING = 0, 1
_M32 = 0xFFFFFFFF
EVAL_BUDGET = 2**26
"""Activations (floats) held at once by an evaluation chunk; bounds evaluation memory."""
EVAL_BUDGET_CPU = 2**22
"""EVAL_BUDGET on the CPU: chunks that stay in cache and in the allocator's pool evaluate
2.6x faster per image for MNAS and 1.8x for FC than 2**26 (2-core CPU, K = 4 and 64)."""
GRAPH_STEPS = 16
"""SGD steps per CUDA graph replay."""
SKIP_ULPS = 256
"""Quiet-step skipping treats a drawn point as possibly active when its margin
1 - alpha f y exceeds -SKIP_ULPS * eps * alpha * (|F(w, x)| + |F(w0, x)|): a bound on the
rounding difference between the look-ahead's forward pass and the step's own."""
SKIP_SPAN_EPOCHS = 16
"""The skipping engine synchronises with the host (checkpoints, stopping checks, refill)
at least every SKIP_SPAN_EPOCHS epochs of each member."""
STALL_EPOCHS = 16
"""Epochs of quiet steps after a failed stopping check after which a member counts as
stalled (converged at last_active + 1; see the module docstring). A point the step sees
unfitted is drawn within an epoch with probability at least 1 - 1/e, so a member that
is not stalled is taken for one with probability below e^-17 = 4e-8."""
SKIP_ROUNDS = 2 * GRAPH_STEPS
"""Most look-ahead rounds between host synchronisations of the skipping engine."""


MEMBER_CHUNK = {"mnas": 1}
"""Members per vmap chunk of the gradient on the CPU (default: all at once). Batched
convolutions become grouped ones, whose backward in oneDNN made an MNAS ensemble slower
per network than one network alone (0.5-0.6x at K = 4-8); one member per chunk runs the
plain convolutions, in channels-last memory (models.build_model: 2x faster, bench), and
the rest of the step stays batched. Evaluation (forward only) stays batched."""
SHRINK_AT = 0.75
"""With ``shrink``, the slots are cut to the busy ones once no member is left to refill
them and at most this share of them is busy: a geometric rule, so a run of K slots
shrinks at most about log(K) / log(1 / SHRINK_AT) times (each re-captures the CUDA graph)."""
FILL_THREADS = min(
    32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
)
"""Host threads that draw new members' initial weights and training sets: the cores this
process may use (a member's float64 normal draws take about 5 ms of one core for FC-5L,
h = 128; 7 ms per member with 1 thread and 4 with 2 on this project's 2-core CPU),
in the background while the first slots train (``_Feeder``)."""
FILL_CHUNK = 256
"""Members drawn on the host at once when slots are filled (bounds the host memory)."""
CPU_SLOTS = 64
"""Members per ensemble on the CPU: past ~64 a step's cost grows linearly (bench)."""
GPU_MEMORY_FRACTION = 0.7
"""Share of the free device memory an engine's member slots may use."""


def slot_budget(device: torch.device) -> int:
    """Bytes an engine's member slots may use on ``device``: GPU_MEMORY_FRACTION of the
    CUDA memory free to this process (the device's free memory plus what torch's caching
    allocator holds unused, e.g. from an engine before this one), or CPU_MEMORY_FRACTION
    of the memory a task may use on the CPU (``cluster.task_memory``)."""
    from ensemble.cluster import task_memory
    from ensemble.plan import CPU_MEMORY_FRACTION

    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(GPU_MEMORY_FRACTION * (torch.cuda.mem_get_info(device)[0] + cached))
    return int(CPU_MEMORY_FRACTION * task_memory())


def slots_that_fit(group: Group, device: str | torch.device) -> int:
    """How many member slots of ``group`` fit in `slot_budget` (`plan.member_bytes`, host
    memory on the CPU); SpecError naming the settings to lower where not even one does."""
    from ensemble.plan import members_that_fit

    dev = torch.device(device)
    where = f"{group.arch}, P={group.P}, on {dev}"
    return members_that_fit(group, slot_budget(dev), dev.type != "cuda", where)


def default_slots(group: Group, device: str | torch.device, n_members: int) -> int:
    """Ensemble size for ``n_members`` members: as many as `slots_that_fit`, and on the CPU
    at most CPU_SLOTS. SpecError where one member does not fit."""
    k = slots_that_fit(group, device)
    if torch.device(device).type != "cuda":
        k = min(CPU_SLOTS, k)
    return max(1, min(k, n_members))


@functools.lru_cache(maxsize=2)
def _device_pool(name: str, root: str | None, device: torch.device, dtype: torch.dtype):
    """The dataset pool (x, y) resident on ``device``, loaded once per process."""
    pool = datasets.load_pool(name, root)
    return pool.x.to(device, dtype), pool.y.to(device, dtype)


@contextlib.contextmanager
def allow_tf32(allow: bool):
    """TF32 matmuls and convolutions (CUDA only) allowed inside the block if ``allow``,
    else forbidden (strict float32: cuDNN's own default allows TF32 convolutions)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _triton_step(device: torch.device, compile: bool):
    """``ensemble.fused_triton``, where its kernels can run: CUDA, or the CPU under
    Triton's interpreter; ValueError otherwise."""
    if compile:
        raise ValueError("triton=True is a CUDA path; compile is the CPU one")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"triton=True runs on CUDA devices, not {device} (on the CPU only under"
            " Triton's interpreter, TRITON_INTERPRET=1, which is for tests)"
        )
    try:
        from ensemble import fused_triton
    except ImportError as exc:
        raise ValueError(f"triton=True needs the triton package ({exc})") from exc
    return fused_triton


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def member_streams(seed: int) -> tuple[int, int]:
    """(init seed, 32-bit batch key) of a member, both pure functions of its seed."""
    init = int(np.random.SeedSequence([INIT_STREAM, seed]).generate_state(1, np.uint64)[0])
    key = int(np.random.SeedSequence([BATCH_STREAM, seed]).generate_state(1, np.uint32)[0])
    return init & (2**63 - 1), key


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32, C. Wellons) on int64 tensors holding [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32  # wraps in int64; the low 32 bits are exact
    return x ^ (x >> 16)


FLOYD_AT_ONCE = 64
"""Largest B whose batch draw decides all B indices at once (``_floyd``: (K, B, B)
comparisons); beyond it, and for B <= 4, one index after the other."""


def draw_batch(key: torch.Tensor, step: torch.Tensor, P: int, B: int) -> torch.Tensor:
    """B distinct indices in [0, P) for each member, a pure function of (key, step).

    key  : (K,) int64 member batch keys in [0, 2^32) (``member_streams``)
    step : (K,) int64 step counters of the members
    Returns (K, B) int64. Floyd's algorithm: for i = 0 .. B-1, with j_i = P - B + i, take
    t_i uniform in [0, j_i] and keep t_i, or j_i if t_i was already taken; this gives a
    uniform B-subset. The uniform numbers come from hashing (key, step, i), so draws at
    different steps are independent and do not depend on the other members.
    """
    i = torch.arange(B, device=key.device)
    j = P - B + i  # Floyd's upper ends
    return _floyd(_floyd_uniforms(key, step, i, j), j)


def _floyd_uniforms(
    key: torch.Tensor, step: torch.Tensor, i: torch.Tensor, j: torch.Tensor
) -> torch.Tensor:
    """Floyd's t_i, uniform in [0, j_i] (i = 0 .. B-1), (K, B) int64, from hashing
    (key, step, i)."""
    base = _mix32(key ^ _mix32(step & _M32) ^ _mix32(((step >> 32) + 0x9E3779B9) & _M32))
    r = _mix32(base[:, None] ^ ((i * 0x85EBCA6B + 0x27D4EB2F) & _M32))  # (K, B) 32-bit
    return r % (j + 1)


def _floyd(t: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Floyd's choices for the uniforms t (K, B) of ``_floyd_uniforms``, j_i = P - B + i.

    In sequence, each i costs about 4 small kernels, too many on a GPU for B = 16. For
    5 <= B <= FLOYD_AT_ONCE all i are decided at once: t_i is taken (so j_i = P - B + i is
    kept instead) iff it equals an earlier t_k (that t_k was kept, or was itself taken
    already), or it equals j_k of an earlier k whose own t_k was taken; the only such k is
    t_i - (P - B). Following those links back (a chain of at most B) by pointer doubling
    takes ceil(log2 B) rounds: about 25 kernels for B = 16 instead of 60. Same result."""
    B = t.shape[1]
    if B <= 4 or B > FLOYD_AT_ONCE:
        out = t.clone()
        for k in range(1, B):  # keep t_k unless already taken, else take j_k (never taken)
            taken = (out[:, :k] == out[:, k : k + 1]).any(dim=1)
            out[:, k] = torch.where(taken, j[k], out[:, k])
        return out
    i = j - j[0]
    taken = ((t[:, :, None] == t[:, None, :]) & (i[None, :] < i[:, None])).any(2)  # (K, B)
    k = t - j[0]  # t_i = j_k
    link = torch.where((k >= 0) & (k < i), k, i)  # i itself: no earlier j_k
    rounds = (B - 1).bit_length()
    for r in range(rounds):
        taken = taken | taken.gather(1, link)
        if r < rounds - 1:  # the last round's links are not followed
            link = link.gather(1, link)
    return torch.where(taken, j, t)


@dataclass
class MemberResult:
    """What the paper measures for one member (science.md, "What is measured").

    outcome : schema.CONVERGED / DIVERGED / UNFINISHED
    steps   : s* if converged, the step of the first non-finite loss if diverged,
              the budget if unfinished
    t_star  : dt * s* (NaN unless converged)
    ckpt_*  : (N_CHECKPOINTS,) dynamics at steps schema.checkpoint_steps(); after s*
              the frozen final values; NaN beyond a diverged/unfinished member's stop
    """

    member: Member
    outcome: int
    steps: int
    t_star: float
    test_error: float
    train_loss: float
    n_unfitted: float
    dw2: float
    w0_2: float
    rel_change: float
    dw2_layer: dict[str, float]
    w0_2_layer: dict[str, float]
    ckpt_t: list[float]
    ckpt_train_loss: list[float]
    ckpt_test_error: list[float]
    seconds: float
    perceptron: dict[str, float] = field(default_factory=dict)
    ntk_change: float = math.nan
    """mean((K - K0)^2) / mean(K0^2) of the empirical NTK on the first ``ntk_points``
    test points (`ensemble.ntk`); NaN where ``group.ntk_points`` is 0."""
    weights: dict[str, np.ndarray] | None = None


@dataclass
class EngineStats:
    """Counters of one ``Engine.run``: occupancy = busy_steps / slot_steps."""

    slots: int = 0
    slot_steps: int = 0
    """Executed ensemble steps times slots."""
    member_steps: int = 0
    """Steps of the finished members (simulated ones included with skipping)."""
    busy_steps: int = 0
    """Slot-steps of ``slot_steps`` that did a member's work: its steps up to t* with plain
    steps; with quiet-step skipping, where one executed step moves a member over many
    simulated ones, the executed steps while its slot held a running member."""
    seconds: float = 0.0
    check_seconds: float = 0.0
    """Wall time of the stopping checks (full training loss of quiet or budget-hit slots)."""
    checkpoint_seconds: float = 0.0
    """Wall time of the checkpoints (training loss and test error at ``checkpoint_steps``)."""
    fill_seconds: float = 0.0
    """Wall time the run spent filling slots (waiting for host draws, copying them to the
    device, F(w0)); draws made in the background while slots train are not counted."""
    checks: int = 0
    not_started: int = 0
    """Members that never got a slot: the group's ``max_seconds`` was spent first."""
    stalled: int = 0
    """Members stopped as converged after STALL_EPOCHS quiet epochs that followed a failed
    stopping check (the step's and the check's roundings disagree)."""
    real_steps: int = 0
    """Steps executed by the ensemble (each advances every slot; with quiet-step
    skipping a slot advances past its skipped steps too)."""

    @property
    def occupancy(self) -> float:
        return self.busy_steps / self.slot_steps if self.slot_steps else float("nan")


@dataclass
class _Ledger:
    """Host-side state of each slot during ``Engine.run``: the member it holds (index into
    the run's members, -1 when free) and that member's checkpoint and stopping-check
    bookkeeping. ``select`` keeps it in step with ``Engine._select``."""

    occupant: np.ndarray
    member: list[Member | None]
    next_ckpt: np.ndarray
    """Index of the member's next checkpoint (N_CHECKPOINTS once all are taken)."""
    checked_at: np.ndarray
    """last_active at the member's last failed stopping check (-2: none yet)."""
    filled_at: np.ndarray
    """perf_counter() when the member entered its slot."""
    ck: dict[str, np.ndarray]
    """Checkpoint values so far, (K, N_CHECKPOINTS) each: "t", "loss", "err"."""

    @classmethod
    def empty(cls, K: int) -> _Ledger:
        return cls(
            occupant=np.full(K, -1, dtype=np.int64),
            member=[None] * K,
            next_ckpt=np.zeros(K, dtype=np.int64),
            checked_at=np.full(K, -2, dtype=np.int64),
            filled_at=np.zeros(K),
            ck={n: np.full((K, N_CHECKPOINTS), np.nan) for n in ("t", "loss", "err")},
        )

    def assign(self, slot: int, index: int, member: Member) -> None:
        """Record that ``member`` (the run's member ``index``) now occupies ``slot``."""
        self.occupant[slot], self.member[slot] = index, member
        self.next_ckpt[slot], self.checked_at[slot] = 0, -2
        for a in self.ck.values():
            a[slot] = np.nan

    def release(self, slot: int) -> None:
        self.occupant[slot], self.member[slot] = -1, None

    def select(self, keep: Sequence[int]) -> _Ledger:
        """The ledger of the slots ``keep``, in that order."""
        return _Ledger(
            occupant=self.occupant[keep],
            member=[self.member[s] for s in keep],
            next_ckpt=self.next_ckpt[keep],
            checked_at=self.checked_at[keep],
            filled_at=self.filled_at[keep],
            ck={n: a[keep] for n, a in self.ck.items()},
        )


class _Feeder:
    """The members of an ``Engine.run`` waiting for a slot, in order, and the host draws
    (``Engine._draw``) of the next ``chunk`` of them, made in a background thread while
    the device trains: a GPU task, whose members all get a slot, starts stepping once its
    first chunk is drawn rather than once all are (about 1.2 ms of host time per FC
    member on the H200's host). ``len`` counts the members not yet taken."""

    def __init__(self, members: Iterable[Member], draw: Callable[[list[Member]], list], chunk: int):
        self.queue = deque(enumerate(members))
        self.draw, self.chunk = draw, max(1, chunk)
        self.ready: deque = deque()  # (index, member, drawn) of drawn members
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ensemble-fill")
        self.drawing = None  # Future of the chunk being drawn, [(index, member, drawn)]
        self.n_drawing = 0
        self._next()

    def __len__(self) -> int:
        return len(self.queue) + len(self.ready) + self.n_drawing

    def __enter__(self) -> _Feeder:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _next(self) -> None:
        """Start drawing the next chunk, unless one is being drawn or none is left."""
        if self.drawing is not None or not self.queue:
            return
        batch = [self.queue.popleft() for _ in range(min(self.chunk, len(self.queue)))]

        def work() -> list:
            drawn = self.draw([m for _, m in batch])
            return [(i, m, d) for (i, m), d in zip(batch, drawn, strict=True)]

        self.drawing, self.n_drawing = self.pool.submit(work), len(batch)

    def take(self, n: int, wait: bool) -> list[tuple[int, Member, tuple]]:
        """Up to ``n`` members (index, member, drawn) whose draws are done; with ``wait``,
        waits for the chunk being drawn when none is ready."""
        if self.drawing is not None and (self.drawing.done() or (wait and not self.ready)):
            self.ready.extend(self.drawing.result())  # re-raises a failed draw
            self.drawing, self.n_drawing = None, 0
        out = [self.ready.popleft() for _ in range(min(n, len(self.ready)))]
        if not self.ready:
            self._next()
        return out


class _TrainingData:
    """Device-resident data of a group: the source rows of every slot's training set.

    Every slot k reads training point i at row ``rows[k, i]`` of ``src``: for MNIST and
    CIFAR-10 ``src`` is the whole pool and ``rows`` the member's training indices; for
    the perceptron each slot owns P rows of ``src`` holding its own sampled data.
    """

    def __init__(
        self, group: Group, slots: int, device: torch.device, dtype: torch.dtype, pool=None
    ):
        self.group = group
        P = group.P
        if group.dataset == "perceptron":
            x_te, y_te = datasets.perceptron_test(group.d, group.chi, group.pte)
            self.src = torch.zeros(slots * P, group.d, dtype=dtype, device=device)
        else:
            if pool is None:
                pool = _device_pool(group.dataset, group.data_root, device, dtype)
            self.src, self.pool_y = pool
            te = torch.from_numpy(datasets.test_indices(group.dataset, group.pte)).to(device)
            x_te, y_te = self.src[te], self.pool_y[te]
        self.x_test = x_te.to(device, dtype)
        self.y_test = y_te.to(device, dtype)
        self.rows = torch.zeros(slots, P, dtype=torch.int64, device=device)
        self.y = torch.zeros(slots, P, dtype=dtype, device=device)

    def points(self, rows: torch.Tensor) -> torch.Tensor:
        """The inputs at ``rows`` (K, n) of ``src``: (K, n, *input). ``index_select``, about
        4x faster than ``src[rows]`` on the CPU (FC-5L batch of 64 x 16 MNIST points)."""
        return self.src.index_select(0, rows.reshape(-1)).view(*rows.shape, *self.src.shape[1:])

    def draw(self, seed: int):
        """The training set of the member with ``seed`` on the host: the perceptron's
        (x (P, d), y (P,)), or the pool indices (P,) of an image dataset."""
        g = self.group
        if g.dataset == "perceptron":
            return datasets.perceptron_train(g.d, g.chi, g.P, seed)
        return torch.from_numpy(datasets.train_indices(g.dataset, g.P, g.pte, seed))

    def load(self, slots: torch.Tensor, drawn: Sequence) -> None:
        """Put training sets from ``draw`` into ``slots`` (one copy per tensor)."""
        P, dev = self.group.P, self.rows.device
        if self.group.dataset == "perceptron":
            rows = slots[:, None] * P + torch.arange(P, device=dev)  # each slot's own rows
            self.src[rows.reshape(-1)] = torch.cat([x for x, _ in drawn]).to(dev, self.src.dtype)
            self.rows[slots] = rows
            self.y[slots] = torch.stack([y for _, y in drawn]).to(dev, self.y.dtype)
        else:
            idx = torch.stack(list(drawn)).to(dev)
            self.rows[slots] = idx
            self.y[slots] = self.pool_y[idx]

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the slots ``keep`` (in that order); the perceptron's own rows are
        compacted so that they stay P per slot."""
        self.rows, self.y = self.rows[keep], self.y[keep]
        if self.group.dataset == "perceptron":
            K, P = self.rows.shape
            self.src = self.src[self.rows.reshape(-1)]
            self.rows = torch.arange(K * P, device=self.rows.device).view(K, P)


class Engine:
    """K member slots of one group on one device; ``run`` trains members through them.

    group  : shared settings (validated on construction of the Group)
    slots  : K, the number of members trained at once
    device : torch device; default CUDA when available, else CPU
    keep_weights : return each member's final weights in its result (for tests, analysis)
    pool   : (x, y) dataset pool already on the device (default: ``group.dataset``'s)
    cuda_graph : replay the step from a CUDA graph on CUDA devices
    compile : CPU fast path: the step compiled by ``torch.compile`` with dynamic shapes
             (fused C++ instead of dozens of small ops; the measured cost and gain per
             architecture are ``ensemble.launch.COMPILE_COST``, from
             ``bench --compile-cost``); one compile per process and group serves any
             ensemble size; same trajectories up to float rounding (the compiler may
             reassociate sums)
    compile_after : CPU: run eager, and compile once ``run`` has spent this many seconds
             (checked between chunks of steps), so a task that turns out long pays for
             its compilation at most once more than it needed (None: never; ignored with
             ``compile=True``)
    skip_quiet : jump over steps whose drawn batch certainly has zero loss (see the
             module docstring); default on for the perceptron only, where the look-ahead
             is cheap next to the steps it saves; same trajectories bit for bit
    fused  : FC only, default on: the step written out by hand (``ensemble.fused``),
             which accumulates each weight update in place in the product that computes
             it instead of materialising gradients; same trajectories up to float rounding
    triton : FC, opt-in: the fused step's layers as Triton kernels
             (``ensemble.fused_triton``: each weight read once forward, read and written
             once in its update, the first layer's forward carried from the last update
             in ``pre0``); CUDA, or the CPU under ``TRITON_INTERPRET=1`` (tests)
    shrink : once no member is left to refill a slot and at most SHRINK_AT of the slots
             are busy, drop the idle slots (``K`` shrinks), so a run's tail, where the slowest
             members train alone, costs steps of those members only; trajectories do
             not depend on the ensemble size (up to float rounding of batched products)
    """

    SLOT_STATE = (
        "f0", "f0_test", "alpha", "dt", "key", "step", "last_active", "status", "limit", "pre0",
        "pre0_step",
    )  # fmt: skip
    """Device tensors of one row per slot besides the weights and the training data:
    ``_select`` keeps exactly these (and ``params``, ``params0``, ``data``) in step with
    the slots, so a new per-slot tensor must be named here (a test checks it)."""

    def __init__(
        self,
        group: Group,
        slots: int,
        device: str | torch.device | None = None,
        keep_weights: bool = False,
        pool: tuple[torch.Tensor, torch.Tensor] | None = None,
        cuda_graph: bool = True,
        compile: bool = False,
        skip_quiet: bool | None = None,
        compile_after: float | None = None,
        shrink: bool = True,
        fused: bool | None = None,
        triton: bool = False,
    ):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if (compile or compile_after is not None) and resolve_device(device).type != "cpu":
            raise ValueError("compile is the CPU fast path; on CUDA the step replays a CUDA graph")
        if compile_after is not None and not compile_after >= 0:
            raise ValueError(f"compile_after must be >= 0 seconds or None, got {compile_after}")
        self.group = group
        self.K = slots
        self.keep_weights = keep_weights
        self.device = resolve_device(device)
        fit = slots_that_fit(group, self.device)
        if slots > fit:
            from ensemble.plan import member_bytes

            need = slots * member_bytes(group, self.device.type != "cuda")
            raise SpecError(
                f"slots (--slots) = {slots}: {group.arch}, P={group.P}, on {self.device}, they"
                f" need {need / 2**30:.3g} GiB, more than the"
                f" {slot_budget(self.device) / 2**30:.3g} GiB they may use: at most {fit} fit"
            )
        self.dtype = torch.float64 if group.dtype == "float64" else torch.float32
        chunk = MEMBER_CHUNK.get(group.arch) if self.device.type == "cpu" else None
        self.member_chunk = chunk
        """Members per vmap chunk of the gradient (None: all at once; ``MEMBER_CHUNK``)."""
        self.model: Model = build_model(group, channels_last=chunk == 1)
        self.data = _TrainingData(group, slots, self.device, self.dtype, pool)
        self.cuda_graph = cuda_graph
        self.shrink = shrink
        self.fused = group.arch == "fc" if fused is None else fused
        if self.fused and group.arch != "fc":
            raise ValueError(f"the fused step is written for arch 'fc', not {group.arch!r}")
        if triton and not self.fused:
            raise ValueError("triton=True runs the fused FC step: arch 'fc', fused not False")
        self.triton = triton
        self._fc = _triton_step(self.device, compile) if triton else fused_torch
        self._step_fn, self._skip_fn = self._step, self._skip
        self.compiled = False
        self._compile_after = None if compile else compile_after
        if compile:
            self._compile()
        self._graph: torch.cuda.CUDAGraph | None = None
        K, dev, dt = slots, self.device, self.dtype
        self.params: Params = {
            n: torch.zeros(K, *s, dtype=dt, device=dev) for n, s in self.model.shapes.items()
        }
        self.params0: Params = {n: p.clone() for n, p in self.params.items()}
        self.f0 = torch.zeros(K, group.P, dtype=dt, device=dev)  # F(w0, x_i), training set
        # F(w0, x) on the test set: checkpoints and the final test error evaluate w only
        self.f0_test = torch.zeros(K, len(self.data.x_test), dtype=dt, device=dev)
        self.alpha = torch.ones(K, dtype=dt, device=dev)
        self.dt = torch.zeros(K, dtype=dt, device=dev)
        self.key = torch.zeros(K, dtype=torch.int64, device=dev)
        self.step = torch.zeros(K, dtype=torch.int64, device=dev)
        self.last_active = torch.full((K,), -1, dtype=torch.int64, device=dev)
        self.status = torch.zeros(K, dtype=torch.int8, device=dev)
        self.limit = torch.full((K,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=dev)
        # the Triton step's first-layer pre-activation, carried to the step pre0_step
        # (-1: none); (K, 0) without Triton (``ensemble.fused_triton.FirstLayer``)
        self.pre0 = torch.zeros((K, group.h, group.B) if triton else (K, 0), dtype=dt, device=dev)
        self.pre0_step = torch.full((K,), -1, dtype=torch.int64, device=dev)
        self.skip_quiet = group.arch == "perceptron" if skip_quiet is None else skip_quiet
        self.ntk0: dict[int, torch.Tensor] = {}  # seed -> initial NTK (_ntk_change)
        self._window = 8  # look-ahead steps per member, adapted in _advance_skipping
        self._grad = vmap(grad_and_value(self._member_loss), chunk_size=chunk)
        self._fwd_own = vmap(self.model.forward)  # per-slot inputs
        self._fwd_shared = vmap(self.model.forward, in_dims=(0, None))  # shared inputs
        if self.fused:  # evaluate with the step's own forward pass: F(w0), the stopping
            # check and the step then round alike (on the CPU bit for bit)
            L, act = group.L, group.activation

            def own(w: Params, x: torch.Tensor) -> torch.Tensor:
                return fused_torch.fc_forward(w, x.flatten(2), L, act, keep=False)[0]

            def shared(w: Params, x: torch.Tensor) -> torch.Tensor:
                return own(w, x.flatten(1).expand(w["w_out"].shape[0], -1, -1))

            self._fwd_own, self._fwd_shared = own, shared
        self.quiet_steps = math.ceil(group.P / group.B)  # one epoch
        self.sync_every = int(min(max(group.P // (4 * group.B), 16), 1024))
        self.stats = EngineStats(slots=K)

    def _compile(self) -> None:
        """Switch to the compiled step and look-ahead (dynamic shapes: one compile serves
        every ensemble size K of a process)."""
        if not torch.cuda.is_available():  # then its "No CUDA runtime is found" is moot
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        self._step_fn = torch.compile(self._step, dynamic=True)
        self._skip_fn = torch.compile(self._skip, dynamic=True)
        self.compiled = True

    # -- the hot loop ---------------------------------------------------------------

    def _member_loss(self, params: Params, x, y, f0, alpha) -> torch.Tensor:
        """Batch loss of one member: mean relu(1 - alpha f y) / alpha, f = F(w) - F(w0)."""
        f = self.model.forward(params, x) - f0
        return F.relu(1 - alpha * f * y).mean() / alpha

    def _step(self) -> None:
        """One SGD step of every running slot; no host synchronisation."""
        g = self.group
        if self.triton:  # this step's batches and the next's, in one draw
            both = torch.cat([self.step, self.step + 1])
            local, ahead = draw_batch(self.key.repeat(2), both, g.P, g.B).chunk(2)
        else:
            local = draw_batch(self.key, self.step, g.P, g.B)  # (K, B) indices, training set
        rows = self.data.rows.gather(1, local)  # (K, B) rows of the data pool
        yb = self.data.y.gather(1, local)  # (K, B)
        f0b = self.f0.gather(1, local)  # (K, B)
        if self.triton:
            first = self._fc.FirstLayer(
                self.data.src.flatten(1), rows, self.data.rows.gather(1, ahead),
                self.pre0, self.pre0_step, self.step,
            )  # fmt: skip
            F_b, zs, slopes = self._fc.fc_forward(self.params, first, g.L, g.activation)
        elif self.fused:
            xb = self.data.points(rows).flatten(2)  # (K, B, d_in)
            F_b, zs, slopes = self._fc.fc_forward(self.params, xb, g.L, g.activation)
        if self.fused:
            margin = 1 - self.alpha[:, None] * (F_b - f0b) * yb
            loss = F.relu(margin).mean(1) / self.alpha
        else:
            grads, loss = self._grad(self.params, self.data.points(rows), yb, f0b, self.alpha)
        # a slot at its limit (skip mode steps every slot until the last reaches its own)
        # takes no step: neither an update nor a divergence
        live = (self.status == _RUNNING) & (self.step < self.limit)
        finite = torch.isfinite(loss)
        update = live & finite
        lr = torch.where(update, self.dt, 0)  # (K,) step size, 0 for stopped slots
        if self.fused:
            # step size x dloss/dF, with dloss/dF = -y / B where the margin is positive
            g_F = torch.where(update[:, None] & (margin > 0), -yb / g.B, 0) * lr[:, None]
            if self.triton:
                self._fc.fc_backward_update(
                    self.params, first, zs, slopes, g_F, update, g.activation
                )
            else:
                self._fc.fc_backward_update(self.params, zs, slopes, g_F, update, g.activation)
        else:
            for name, p in self.params.items():
                shape = (-1,) + (1,) * (p.dim() - 1)
                p.sub_(torch.where(update.view(shape), lr.view(shape) * grads[name], 0))
        # in place, so that a CUDA graph of the step replays on the same tensors
        self.last_active.copy_(torch.where(update & (loss > 0), self.step, self.last_active))
        self.status.copy_(torch.where(live & ~finite, DIVERGED, self.status))
        self.step += update

    @torch.no_grad()
    def _skip(self, S: int) -> None:
        """Move every running slot's counter to its first possibly active step among the
        next S (or S on, if none), never past ``limit``. Reads the same draws, weights and
        f0 as the steps it skips; a skipped step would have had exactly zero gradient."""
        g, K = self.group, self.K
        steps = self.step[:, None] + torch.arange(S, device=self.device)  # (K, S)
        keys = self.key[:, None].expand(K, S)
        local = draw_batch(keys.reshape(-1), steps.reshape(-1), g.P, g.B).view(K, S * g.B)
        x = self.data.points(self.data.rows.gather(1, local))  # (K, S*B, *input)
        Fw = self._fwd_own(self.params, x)  # (K, S*B)
        f0 = self.f0.gather(1, local)
        a = self.alpha[:, None]
        margin = 1 - a * (Fw - f0) * self.data.y.gather(1, local)
        tol = SKIP_ULPS * torch.finfo(self.dtype).eps * a * (Fw.abs() + f0.abs())
        hot = ((margin > -tol) | ~torch.isfinite(margin)).view(K, S, g.B).any(2)  # (K, S)
        first = torch.where(hot.any(1), hot.to(torch.int8).argmax(1), S)
        jump = torch.minimum(self.step + first, self.limit)
        self.step.copy_(torch.where(self.status == _RUNNING, jump, self.step))

    def _max_window(self) -> int:
        """Largest look-ahead window: its forward pass holds at most EVAL_BUDGET / 16
        activations (a cache-sized pass; larger windows were slower per skipped step)."""
        return max(1, self._points_per_chunk() // (16 * self.K * self.group.B))

    def _advance_skipping(self) -> int:
        """Run every running slot up to its ``limit``, skipping quiet steps; returns the
        rounds run (one real step each). Rounds run in bursts of 1, 2, 4, .. SKIP_ROUNDS
        between host checks, so little is wasted once the slots reach their limits. The
        window S is twice the members' median jump per round in the last burst; below a
        jump of 1.5 steps the look-ahead costs more than it saves and plain steps run,
        with a probe of S = 8 after each plain burst."""
        rounds, burst = 0, 1
        while True:
            before = self.step.clone()
            S = self._window
            if S > 1:
                for _ in range(burst):
                    self._skip_fn(S)
                    self._step_fn()
            else:  # plain steps (replayed from a CUDA graph on CUDA)
                self._run_steps(burst)
            rounds += burst
            running = self.status == _RUNNING
            left = running & (self.step < self.limit)
            if not bool(left.any()):
                return rounds
            moving = running & (before < self.limit)
            jump = float((self.step - before)[moving].double().median()) / burst
            if S == 1:
                self._window = 8
            elif jump < 1.5:
                self._window = 1
            else:
                span = int((self.limit - self.step)[left].max())
                S = min(1 << math.ceil(math.log2(2 * jump)), 1 << math.ceil(math.log2(span)))
                self._window = min(S, self._max_window())
            burst = min(2 * burst, SKIP_ROUNDS)

    def _run_steps(self, n: int) -> None:
        """n steps of every slot. On CUDA the step is captured in a CUDA graph of
        GRAPH_STEPS steps, in the first call of more than two steps after the engine was
        built or shrunk (two eager warm-up steps, then the capture), and replayed (one
        launch for many kernels; ``run``'s chunks are ``sync_every`` >= GRAPH_STEPS steps);
        the arithmetic is the same kernels as the eager step."""
        if self.device.type != "cuda" or not self.cuda_graph:
            for _ in range(n):
                self._step_fn()
            return
        if self._graph is None and n > 2:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up: two real steps outside the graph
                self._step()
                self._step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            n -= 2
            gc.collect()  # a dead engine's graph freed mid-capture invalidates the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # records, does not run
                for _ in range(GRAPH_STEPS):
                    self._step()
            self._graph = graph
        reps, rest = divmod(n, GRAPH_STEPS) if self._graph is not None else (0, n)
        for _ in range(reps):
            self._graph.replay()
        for _ in range(rest):
            self._step()

    # -- evaluation -----------------------------------------------------------------

    def _points_per_chunk(self) -> int:
        g = self.group
        x = self.data.x_test
        per_point = max(x[0].numel(), g.h if g.arch == "fc" else 1)
        if g.arch == "mnas":
            per_point = 6 * g.h * x.shape[-1] * x.shape[-2] // 4
        budget = EVAL_BUDGET_CPU if self.device.type == "cpu" else EVAL_BUDGET
        return max(1, budget // per_point)

    def _chunks(self, slots: torch.Tensor, n: int):
        """Split (slots x n points) into pieces of at most EVAL_BUDGET(_CPU) activations
        (a last piece of one point joins the one before: on the CPU a product with one
        column rounds differently from wider ones)."""
        budget = self._points_per_chunk()
        per = max(1, budget // min(n, 1024))
        for a in range(0, len(slots), per):
            sl = slots[a : a + per]
            step = max(1, budget // len(sl))
            ranges = [(i, min(i + step, n)) for i in range(0, n, step)]
            if len(ranges) > 1 and ranges[-1][1] - ranges[-1][0] == 1:
                ranges[-2:] = [(ranges[-2][0], n)]
            yield sl, ranges

    @torch.no_grad()
    def _F(self, params: Params, slots: torch.Tensor, which: str, n: int | None = None):
        """Raw outputs F(w, x) of ``slots``: on each slot's own training set
        (``which='train'``, (k, P)) or on the first ``n`` points of the shared test set
        (``'test'``, (k, n))."""
        n = (
            self.group.P
            if which == "train"
            else min(n or len(self.data.x_test), len(self.data.x_test))
        )
        out = []
        for sl, ranges in self._chunks(slots, n):
            w = {name: p[sl] for name, p in params.items()}
            if which == "train":
                rows = self.data.rows[sl]
                parts = [self._fwd_own(w, self.data.points(rows[:, i:j])) for i, j in ranges]
            else:
                parts = [self._fwd_shared(w, self.data.x_test[i:j]) for i, j in ranges]
            out.append(torch.cat(parts, dim=1))
        return torch.cat(out)

    def _init_f0(self, slots: torch.Tensor) -> None:
        """Cache the initial outputs F(w0, x) of ``slots`` on their training sets and on
        the test set."""
        self.f0[slots] = self._F(self.params0, slots, "train")
        self.f0_test[slots] = self._F(self.params0, slots, "test")

    def _train_loss(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(full training loss (k,), unfitted mask (k, P)) for ``slots``."""
        f = self._F(self.params, slots, "train") - self.f0[slots]
        hinge = F.relu(1 - self.alpha[slots, None] * f * self.data.y[slots])
        return hinge.mean(dim=1) / self.alpha[slots], hinge > 0

    def _test_f(self, slots: torch.Tensor, n: int | None = None) -> torch.Tensor:
        """Centred outputs f = F(w, x) - F(w0, x) of ``slots`` on the first ``n`` test
        points (all by default): (k, n)."""
        f = self._F(self.params, slots, "test", n)
        return f - self.f0_test[slots, : f.shape[1]]

    def _test_error(self, f: torch.Tensor) -> torch.Tensor:
        """Test error (fraction with y f <= 0) of the centred test outputs ``f`` (k, n) on
        the first n test points; NaN where a prediction is not finite."""
        wrong = (self.data.y_test[: f.shape[1]] * f <= 0).to(self.dtype)
        return torch.where(torch.isfinite(f).all(dim=1), wrong.mean(dim=1), torch.nan)

    # -- slots ------------------------------------------------------------------------

    def _select(self, keep: Sequence[int]) -> None:
        """Keep only the slots ``keep``, in that order: K becomes len(keep)."""
        idx = torch.tensor(keep, device=self.device)
        for params in (self.params, self.params0):
            for n in params:
                params[n] = params[n][idx]
        for name in self.SLOT_STATE:
            setattr(self, name, getattr(self, name)[idx])
        self.data.select(idx)
        self.K = len(keep)
        self._graph = None  # captured on the old tensors; recaptured on the next steps

    def _fill(self, slots: Sequence[int], members: Sequence[Member]) -> None:
        """Put ``members`` into ``slots``, FILL_CHUNK at a time (``_draw`` then ``_load``)."""
        slots, members = list(slots), list(members)
        for a in range(0, len(members), FILL_CHUNK):
            chunk = members[a : a + FILL_CHUNK]
            self._load(slots[a : a + FILL_CHUNK], chunk, self._draw(chunk))

    def _draw(self, members: Sequence[Member]) -> list[tuple[Params, Any, int]]:
        """Host side of filling: each member's (initial weights, training set, batch key),
        drawn in FILL_THREADS threads (torch and numpy release the GIL). Touches no slot,
        so it may run while the device trains (``_Feeder``)."""
        cpu = torch.device("cpu")

        def draw(m: Member) -> tuple[Params, Any, int]:
            init, key = member_streams(m.seed)
            return init_params(self.model, init, self.dtype, cpu), self.data.draw(m.seed), key

        n_threads = min(FILL_THREADS, len(members))
        if n_threads <= 1:
            return [draw(m) for m in members]
        with ThreadPoolExecutor(n_threads) as pool:
            return list(pool.map(draw, members))

    def _load(
        self, slots: Sequence[int], members: Sequence[Member], drawn: Sequence[tuple]
    ) -> None:
        """Device side of filling: ``members`` and their ``_draw`` into ``slots``, each
        tensor in one copy."""
        dev = self.device
        idx = torch.tensor(list(slots), device=dev)
        for n in self.params:
            w0 = torch.stack([w[n] for w, _, _ in drawn]).to(dev)
            self.params[n][idx] = w0
            self.params0[n][idx] = w0
        self.data.load(idx, [d for _, d, _ in drawn])
        self.alpha[idx] = torch.tensor([m.alpha for m in members], dtype=self.dtype).to(dev)
        dts = [self.group.dt(m.T) for m in members]
        self.dt[idx] = torch.tensor(dts, dtype=self.dtype).to(dev)
        self.key[idx] = torch.tensor([key for _, _, key in drawn], dtype=torch.int64).to(dev)
        self.step[idx] = 0
        self.pre0_step[idx] = -1
        self.last_active[idx] = -1
        self.status[idx] = _RUNNING

    def run(
        self,
        members: Iterable[Member],
        on_result: Callable[[int, MemberResult], None] | None = None,
    ) -> list[MemberResult | None]:
        """Train ``members`` through the slots; returns their results in input order.

        on_result(index, result) is called as each member finishes (for streaming writes).
        Once the group's ``max_seconds`` is spent, the running members stop (unfinished)
        and no more start: their results are None (a later run trains them).
        """
        with (
            allow_tf32(self.group.tf32),  # evaluation too: cuDNN allows TF32 by default
            _Feeder(members, self._draw, min(FILL_CHUNK, self.K)) as feeder,
        ):
            return self._run(feeder, on_result)

    def _run(
        self,
        feeder: _Feeder,
        on_result: Callable[[int, MemberResult], None] | None,
    ) -> list[MemberResult | None]:
        results: dict[int, MemberResult] = {}
        n_members = len(feeder)
        K, ckpts = self.K, np.array(checkpoint_steps() + [np.iinfo(np.int64).max])
        led = _Ledger.empty(K)
        t_start = time.perf_counter()
        max_steps = self.group.max_steps

        def spent() -> bool:
            return (
                self.group.max_seconds is not None
                and time.perf_counter() - t_start > self.group.max_seconds
            )

        def refill() -> None:
            """Free slots take the members whose host draws are ready; only when no slot
            is busy does it wait for the draws in progress. None start once the time
            budget is spent."""
            free = np.flatnonzero(led.occupant < 0)
            if not len(free) or not feeder or spent():
                return
            t = time.perf_counter()
            got = feeder.take(len(free), wait=len(free) == K)
            if got:
                new = free[: len(got)].tolist()
                for slot, (index, member, _) in zip(new, got, strict=True):
                    led.assign(slot, index, member)
                self._load(new, [m for _, m, _ in got], [d for _, _, d in got])
                led.filled_at[new] = time.perf_counter()
                self._init_f0(torch.tensor(new, device=self.device))
            self.stats.fill_seconds += time.perf_counter() - t

        refill()
        while (led.occupant >= 0).any():
            refill()  # members drawn meanwhile, as a GPU task's first slots train
            state = torch.stack([self.step, self.last_active, self.status.long()]).cpu().numpy()
            step, last_active, status = state
            busy = led.occupant >= 0
            running = busy & (status == _RUNNING)
            # chunk length: stop on the next checkpoint or budget of any running slot
            n = self.sync_every
            next_ckpt = led.next_ckpt
            ck_next = ckpts[next_ckpt]  # int64 max once all are taken
            ck_lim = np.minimum(ck_next, max_steps)  # no slot may step past its own
            if running.any():
                n = int(min(n, (ck_lim - step)[running].min()))
            done: dict[int, tuple[int, int]] = {}  # slot -> (outcome, steps)
            for slot in np.flatnonzero(busy & (status == DIVERGED)):
                done[int(slot)] = (DIVERGED, int(step[slot]))
            t_ckpt = time.perf_counter()
            # checkpoints due now
            due = np.flatnonzero(running & (step == ck_next))
            if len(due):
                idx = torch.tensor(due, device=self.device)
                loss, _ = self._train_loss(idx)
                err = self._test_error(self._test_f(idx, N_CKPT_TEST))
                loss, err = loss.cpu().numpy(), err.cpu().numpy()
                for j, s in enumerate(due):
                    c = next_ckpt[s]
                    led.ck["t"][s, c] = self.group.dt(led.member[s].T) * step[s]
                    led.ck["loss"][s, c], led.ck["err"][s, c] = loss[j], err[j]
                    next_ckpt[s] += 1
            t_check = time.perf_counter()
            self.stats.checkpoint_seconds += t_check - t_ckpt
            # stopping checks: quiet for an epoch and changed since the last check, or budget
            over_time = spent()
            quiet_for = step - last_active - 1
            quiet = (quiet_for >= self.quiet_steps) & (last_active != led.checked_at)
            stalled = running & (last_active == led.checked_at)
            stalled &= quiet_for >= (1 + STALL_EPOCHS) * self.quiet_steps
            for s in np.flatnonzero(stalled):
                done[int(s)] = (CONVERGED, int(last_active[s]) + 1)
                self.stats.stalled += 1
            budget = (step >= max_steps) | over_time
            cand = np.flatnonzero(running & ~stalled & (quiet | budget))
            if len(cand):
                loss, _ = self._train_loss(torch.tensor(cand, device=self.device))
                zero = (loss == 0).cpu().numpy()
                self.stats.checks += len(cand)
                for j, s in enumerate(cand):
                    s = int(s)
                    if zero[j]:
                        done[s] = (CONVERGED, int(last_active[s]) + 1)
                    elif budget[s]:
                        done[s] = (UNFINISHED, int(step[s]))
                    else:
                        led.checked_at[s] = last_active[s]
            self.stats.check_seconds += time.perf_counter() - t_check
            if done:
                for s, r in self._harvest(done, led).items():
                    results[int(led.occupant[s])] = r
                    if on_result is not None:
                        on_result(int(led.occupant[s]), r)
                    self.stats.member_steps += r.steps
                    if not self.skip_quiet:
                        self.stats.busy_steps += r.steps
                    led.release(s)
                    self.status[s] = _FREE
                refill()
                busy_slots = [s for s in range(K) if led.occupant[s] >= 0]
                if self.shrink and not feeder and 0 < len(busy_slots) <= SHRINK_AT * K:
                    # a compiled step keeps K >= 2: dynamic shapes specialise K = 1
                    idle = [s for s in range(K) if led.occupant[s] < 0]
                    keep = busy_slots + idle[: max(0, 2 * self.compiled - len(busy_slots))]
                    self._select(keep)
                    K = self.K
                    led = led.select(keep)
                continue
            if (
                self._compile_after is not None
                and not self.compiled
                and time.perf_counter() - t_start >= self._compile_after
            ):
                self._compile()
            if self.skip_quiet:
                span = SKIP_SPAN_EPOCHS * self.quiet_steps
                target = np.where(running, np.minimum(ck_lim, step + span), step)
                self.limit.copy_(torch.from_numpy(target).to(self.device))
                rounds = self._advance_skipping()
                self.stats.real_steps += rounds
                self.stats.slot_steps += K * rounds
                self.stats.busy_steps += int(running.sum()) * rounds
            else:
                self._run_steps(max(n, 1))
                self.stats.real_steps += max(n, 1)
                self.stats.slot_steps += K * max(n, 1)
        self.stats.seconds += time.perf_counter() - t_start
        self.stats.not_started += n_members - len(results)
        return [results.get(i) for i in range(n_members)]

    @torch.no_grad()
    def _harvest(
        self,
        done: dict[int, tuple[int, int]],
        led: _Ledger,
    ) -> dict[int, MemberResult]:
        """Final observables of the stopped slots ``done`` (slot -> (outcome, steps))."""
        slots = sorted(done)
        idx = torch.tensor(slots, device=self.device)
        loss, unfitted = self._train_loss(idx)
        f_test = self._test_f(idx)
        err, err_sub = self._test_error(f_test), self._test_error(f_test[:, :N_CKPT_TEST])
        dw2 = {
            n: ((self.params[n][idx] - p0[idx]) ** 2).reshape(len(slots), -1).sum(1)
            for n, p0 in self.params0.items()
        }
        w02 = {n: (p0[idx] ** 2).reshape(len(slots), -1).sum(1) for n, p0 in self.params0.items()}
        extra = (
            self._perceptron_observables(idx, unfitted) if self.group.arch == "perceptron" else {}
        )
        host = lambda t: t.double().cpu().numpy()  # noqa: E731
        loss, err, err_sub, n_unf = host(loss), host(err), host(err_sub), host(unfitted.sum(1))
        dw2 = {n: host(v) for n, v in dw2.items()}
        w02 = {n: host(v) for n, v in w02.items()}
        extra = {n: host(v) for n, v in extra.items()}
        ntk = self._ntk_change(slots, [led.member[s].seed for s in slots])
        now = time.perf_counter()
        ckpts = np.array(checkpoint_steps())
        out = {}
        for j, s in enumerate(slots):
            outcome, steps = done[s]
            member = led.member[s]
            assert member is not None
            dt = self.group.dt(member.T)
            t_ck, l_ck, e_ck = (led.ck[n][s].copy() for n in ("t", "loss", "err"))
            if outcome == CONVERGED:  # frozen from s* on: later checkpoints take final values
                after = ckpts >= steps
                t_ck[after], l_ck[after], e_ck[after] = dt * ckpts[after], 0.0, err_sub[j]
            tot_dw2 = sum(v[j] for v in dw2.values())
            tot_w02 = sum(v[j] for v in w02.values())
            out[s] = MemberResult(
                member=member,
                outcome=outcome,
                steps=steps,
                t_star=dt * steps if outcome == CONVERGED else math.nan,
                test_error=float(err[j]),
                train_loss=float(loss[j]),
                n_unfitted=float(n_unf[j]),
                dw2=float(tot_dw2),
                w0_2=float(tot_w02),
                rel_change=float(math.sqrt(tot_dw2 / tot_w02)) if tot_w02 > 0 else math.nan,
                dw2_layer={n: float(v[j]) for n, v in dw2.items()},
                w0_2_layer={n: float(v[j]) for n, v in w02.items()},
                ckpt_t=t_ck.tolist(),
                ckpt_train_loss=l_ck.tolist(),
                ckpt_test_error=e_ck.tolist(),
                seconds=float(now - led.filled_at[s]),
                perceptron={n: float(v[j]) for n, v in extra.items()},
                ntk_change=ntk[j],
                weights=(
                    {
                        n: p[s].to("cpu", torch.float64, copy=True).numpy()
                        for n, p in self.params.items()
                    }
                    if self.keep_weights
                    else None
                ),
            )
        return out

    @torch.enable_grad()
    def _ntk_change(self, slots: Sequence[int], seeds: Sequence[int]) -> list[float]:
        """`ensemble.ntk.kernel_change` of each slot's empirical NTK on the first
        ``group.ntk_points`` test points (NaN for all when it is 0), one member at a time
        (``seeds``: the slots' members' seeds). The initial kernel K0 depends only on the
        seed (w0): it is computed once per seed and engine (``ntk0``), so the members of a
        seed across alpha and T share it."""
        n = min(self.group.ntk_points, len(self.data.x_test))
        if n == 0:
            return [math.nan] * len(slots)
        x = self.data.x_test[:n]
        one = lambda params, s: {name: p[s] for name, p in params.items()}  # noqa: E731
        out = []
        for s, seed in zip(slots, seeds, strict=True):
            if seed not in self.ntk0:
                self.ntk0[seed] = empirical_ntk(self.model, one(self.params0, s), x)
            K = empirical_ntk(self.model, one(self.params, s), x)
            out.append(kernel_change(K, self.ntk0[seed]))
        return out

    def _perceptron_observables(self, idx: torch.Tensor, unfitted: torch.Tensor) -> dict:
        """Signal w . e1, noise ||w_perp||^2 / (d - 1), their initial values, the noise of
        the change, and the mean |x_1| of the unfitted training points (NaN if none)."""
        w, w0 = self.params["w"][idx], self.params0["w"][idx]
        d = w.shape[1]
        x1 = self.data.src[self.data.rows[idx], 0].abs()  # (k, P)
        n_unf = unfitted.sum(1)
        x1_unf = torch.where(n_unf > 0, (x1 * unfitted).sum(1) / n_unf.clamp(min=1), torch.nan)
        return {
            "w_par": w[:, 0],
            "w_par0": w0[:, 0],
            "noise": (w[:, 1:] ** 2).sum(1) / (d - 1),
            "noise0": (w0[:, 1:] ** 2).sum(1) / (d - 1),
            "dnoise": ((w - w0)[:, 1:] ** 2).sum(1) / (d - 1),
            "x1_unfitted": x1_unf,
        }


def train_batch(
    group: Group,
    members: Sequence[Member],
    device: str | torch.device | None = None,
    slots: int | None = None,
    on_result: Callable[[int, MemberResult], None] | None = None,
    keep_weights: bool = False,
) -> list[MemberResult | None]:
    """Train ``members`` (sharing ``group``) as one ensemble; results in input order
    (None for members that never started within ``group.max_seconds``).

    slots defaults to len(members); fewer slots than members turns on continuous batching.
    """
    if not members:
        return []
    engine = Engine(group, slots or len(members), device, keep_weights)
    return engine.run(members, on_result)
