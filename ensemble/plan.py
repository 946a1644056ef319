"""Cells -> ensemble batches: grouping by P, balanced planned work, memory budget; no torch.

Members of one batch share a ``Group`` (all settings and P) and differ in (alpha, T,
seed). A batch trains through refilled engine slots (continuous batching, see
``ensemble.engine``), so it is not held up by a slow member as long as it has others to
run beside it; what holds up a sweep is a batch of only slow members. Inside a P the cells
are therefore dealt to the batches slowest first, each to the batch with the least planned
work that has room (longest-processing-time first): every batch gets a share of the slow
and of the fast cells, the batches' planned work differs by at most the largest single
estimate, and each batch lists its members slowest first (they start first). The cost
model (``estimate_steps``) is rough, fitted to science.md "Typical costs" and to measured
sweeps; it is used only for this dealing, for the compile policy and for the dry-run's
expected cost, never for physics (every member runs until it converges,
diverges or reaches its budget, whatever the estimate said).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ensemble.cells import INPUT_SHAPE, Cell, Group, Member, SpecError
from ensemble.spec import Experiment

__all__ = [
    "CPU_MEMORY_FRACTION",
    "Batch",
    "activation_count",
    "estimate_steps",
    "format_plan",
    "member_bytes",
    "param_count",
    "plan_batches",
]

# -- cost model (science.md "Typical costs"; rough, for grouping and dry runs only) -------

LAZY_STEPS_P1024 = 1000.0
"""Steps to zero training loss of lazy FC-5L at P = 1024 (measured 750-1,300)."""
P_EXPONENT = 1.4
"""Lazy steps grow like P^1.4 (4,600-5,700 at P = 4096, 26,000-50,000 at P = 16384)."""
T_SLOW = 2.0**-12
"""Below about this T, steps grow like T_SLOW / T at intermediate alpha (gradient flow)."""
SLOW_P_EXPONENT = 0.5
"""The small-T (gradient-flow) steps grow like P^0.5, far slower than the lazy steps:
alpha = 1 takes about 10,000 extra steps at T = 2^-13, P = 1024 (science.md, relu) and
about 10,100 at T = 2^-14, P = 256 (docs/reproduction/fc_phase_mnist_reduced.toml, gelu),
i.e. half as many at the same T for a quarter of the data."""
DIVERGE_DT = 1024.0
"""FC diverges (NaN) within about 20 steps at dt >= 1024 at every alpha tried."""
DIVERGE_STEPS = 20.0

MNAS_LAZY = 3.1
"""MNAS(h) takes about 3.1x FC-5L's lazy steps at large dt ..."""
MNAS_DT_GF = 0.26
MNAS_DT_EXPONENT = 0.61
"""... times 1 + (MNAS_DT_GF / dt)^MNAS_DT_EXPONENT: more steps at small dt = T h B (towards
gradient flow, where the steps grow like 1/dt), an empirical fit over dt = 2^-5 .. 2^6."""
MNAS_SLOW = 26.0
"""MNAS's feature-regime (small-T) term is about 26x FC-5L's."""

_ALPHA_PEAK = 8.0
_A_PEAK = 12.0
_A_EXPONENT = math.log(_A_PEAK / 4.5) / math.log(_ALPHA_PEAK)  # 0.47: A(1) = 4.5, A(8) = 12
_ALPHA_LOW = 2.0**-3
_A_LOW_EXPONENT = 0.18


def _slowdown(alpha: float) -> float:
    """A(alpha) in steps = lazy(P) + LAZY_STEPS_P1024 A(alpha) (P/1024)^0.5 T_SLOW / T.

    Fitted to FC-5L relu at P = 1024 (science.md): A is about 1.75 at alpha = 2^-3, 4.5 at
    alpha = 1 and 12 at alpha = 8 (A = 4.5 alpha^0.47); it falls like 1/alpha above
    alpha = 8 towards the lazy limit, where the number of steps does not depend on T, and
    flattens below alpha = 2^-3 like alpha^0.18 (FC-5L gelu at P = 256: 2,700 steps at
    alpha = 2^-8 against 5,000 at 2^-4 and 10,200 at 1, T = 2^-14).
    """
    if alpha <= _ALPHA_LOW:
        return 4.5 * _ALPHA_LOW**_A_EXPONENT * (alpha / _ALPHA_LOW) ** _A_LOW_EXPONENT
    if alpha <= _ALPHA_PEAK:
        return 4.5 * alpha**_A_EXPONENT
    return _A_PEAK * _ALPHA_PEAK / alpha


def _perceptron_steps(P: int, chi: float) -> float:
    """Steps of the perceptron (d = 16, B = 2), independent of T (dt is proportional to T).

    At P = 8192: about 7e7 for chi = 0 (measured 2e7-2e8) and 4e5 for chi = 1 (2e5-6e5),
    interpolated as log10 S = 3.35 + 4.5 / (1 + chi). Growth in P: P^b with
    b = (5/6) (3 + chi) / (1 + chi), i.e. 5/6 of the scaling argument's t* exponent, which
    matches the measured chi = 0 growth (1e5 steps at P = 512). d is not modelled.
    """
    at_8192 = 10.0 ** (3.35 + 4.5 / (1.0 + chi))
    b = (5.0 / 6.0) * (3.0 + chi) / (1.0 + chi)
    return at_8192 * (P / 8192.0) ** b


def estimate_steps(group: Group, member: Member) -> float:
    """Rough expected number of SGD steps of one member, capped at group.max_steps.

    FC: lazy = LAZY_STEPS_P1024 (P/1024)^1.4, plus
    slow = LAZY_STEPS_P1024 A(alpha) (P/1024)^SLOW_P_EXPONENT T_SLOW / T (more steps at
    small T away from the lazy limit, see ``_slowdown``); FC at dt >= DIVERGE_DT diverges
    in about DIVERGE_STEPS. Within a factor 1.7 of the measured medians of FC-5L at P = 256
    and 1024 (tested); the feature regime's diverging edge is not modelled.

    MNAS: MNAS_LAZY lazy (1 + (MNAS_DT_GF / dt)^MNAS_DT_EXPONENT) + MNAS_SLOW slow, fitted
    (least squares in log steps) to the geometric seed means of the 47 (alpha, T, P) of the
    three reduced MNAS(8) runs of docs/reproduction/ (B = 16, P = 64-256, MNIST and
    CIFAR-10; the phase diagram's first 2 seeds): measured / estimated 0.52-5.9, rms 1.6x
    (it was 1.7-28x, geometric mean 5.2x, with MNAS costed as FC). Wider MNAS and larger P
    are extrapolation. ``python -m ensemble status <cube> --estimates`` compares a cube.

    Perceptron: see ``_perceptron_steps``. Used to group members, order them, and for the
    dry run's expected cost.
    """
    if group.arch == "perceptron":
        steps = _perceptron_steps(group.P, group.chi)
    elif group.arch == "fc" and group.dt(member.T) >= DIVERGE_DT:
        steps = DIVERGE_STEPS
    else:
        x = group.P / 1024.0
        slow = LAZY_STEPS_P1024 * _slowdown(member.alpha) * x**SLOW_P_EXPONENT * T_SLOW / member.T
        lazy = LAZY_STEPS_P1024 * x**P_EXPONENT
        if group.arch == "mnas":
            gf = (MNAS_DT_GF / group.dt(member.T)) ** MNAS_DT_EXPONENT
            lazy, slow = MNAS_LAZY * lazy * (1 + gf), MNAS_SLOW * slow
        steps = lazy + slow
    return float(min(max(steps, 1.0), group.max_steps))


def compile_break_even(C: float, r_e: float, r_c: float) -> tuple[float, float]:
    """When compiling a task's step pays: (eager seconds, planned member-steps).

    C is the first compiled step's wall time (s), r_e and r_c the eager and compiled
    network-steps/s. Eager seconds C r_c / (r_c - r_e) lose C against compiled steps
    (ski rental: switch then); member-steps C r_e r_c / (r_c - r_e) is the work above
    which compiling at once is faster. Both are infinite when r_c <= r_e."""
    if r_c <= r_e:
        return math.inf, math.inf
    seconds = C * r_c / (r_c - r_e)
    return seconds, seconds * r_e


# -- sizes -------------------------------------------------------------------------------


def _input_shape(group: Group, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(int(n) for n in input_shape)
    if group.arch == "perceptron":
        return (group.d,)
    return INPUT_SHAPE[group.dataset]


def _mnas_layers(h: int, C: int) -> list[tuple[int, int, int, bool, int]]:
    """MNAS(h) convolutions as (C_in, C_out, kernel, depthwise, stride), science.md."""
    layers = [(C, 4 * h, 5, False, 2), (4 * h, 4 * h, 5, True, 1), (4 * h, 2 * h, 1, False, 1)]
    c_in = 2 * h
    for c_out, stride in ((h, 2), (h, 1), (3 * h, 2), (3 * h, 1)):  # inverted residuals
        e = 3 * c_in
        layers += [(c_in, e, 1, False, 1), (e, e, 5, True, stride), (e, c_out, 1, False, 1)]
        c_in = c_out
    layers.append((c_in, 20 * h, 1, False, 1))
    return layers


def param_count(group: Group, input_shape: Sequence[int] | None = None) -> int:
    """Number of trained parameters of one member.

    input_shape : (C, H, W) of an image, default INPUT_SHAPE[dataset]; (d,) for the
                  perceptron
    FC-L : d_in h + (L - 1) h^2 + h (no biases; 166,016 for FC-5L h = 128 on MNIST).
    MNAS(h) : the convolutions of science.md (no biases) + a 20h -> 1 linear with bias
              (707,649 at h = 64 on CIFAR-10). Perceptron : d.
    """
    shape = _input_shape(group, input_shape)
    if group.arch == "perceptron":
        return group.d
    if group.arch == "fc":
        d_in = math.prod(shape)
        return d_in * group.h + (group.L - 1) * group.h**2 + group.h
    n = 0
    for c_in, c_out, k, depthwise, _ in _mnas_layers(group.h, shape[0]):
        n += k * k * c_out if depthwise else k * k * c_in * c_out
    return n + 20 * group.h + 1


def activation_count(group: Group, input_shape: Sequence[int] | None = None) -> int:
    """Activations (floats) of one forward pass of one input, input and output included.

    MNAS uses 'same' padding, so a stride-s layer maps H to ceil(H / s).
    """
    shape = _input_shape(group, input_shape)
    if group.arch == "perceptron":
        return group.d + 1
    if group.arch == "fc":
        return math.prod(shape) + group.L * group.h + 1
    _, H, W = shape
    n = math.prod(shape)
    for _, c_out, _, _, stride in _mnas_layers(group.h, shape[0]):
        H, W = -(-H // stride), -(-W // stride)
        n += c_out * H * W
    return n + 20 * group.h + 1


WEIGHT_COPIES = 5
"""w, w0, the gradient and two update temporaries."""
TRAIN_ACT_COPIES = 3
"""Per activation of the training batch: pre-activation, activation, its gradient."""
EVAL_POINTS = 128
"""Points per member in an evaluation chunk (forward only: pre-activation, activation)."""


HOST_DRAWS = 2
"""Host draws held per slot while an engine fills its slots (``engine._Feeder``: the chunk
drawn ahead and the chunk being drawn, each of up to as many members as there are slots)."""
CPU_MEMORY_FRACTION = 0.6
"""Share of a CPU worker's memory a task's slots and host draws may use (Dask pauses a
worker at 80 % of its memory limit; the dataset and the interpreter need the rest)."""


def member_bytes(group: Group, host: bool = False) -> int:
    """Memory one ensemble member needs, in bytes (a simple upper estimate).

    On the device: itemsize(dtype) * (WEIGHT_COPIES n_params + TRAIN_ACT_COPIES B n_act
    + 2 EVAL_POINTS n_act + P + pte) + member data, where n_act = ``activation_count``,
    P + pte are the cached outputs F(w0, x), and the member data are its training-set
    indices (8 P bytes) for images or its own training points (P d floats) for the
    perceptron. The shared dataset and the engine's own evaluation budget are not counted.
    ``host``: the slots live in host memory (a CPU worker), which also holds HOST_DRAWS
    host draws per slot: initial weights (itemsize n_params) and the training set (8 P
    bytes of indices; the perceptron's float64 points and labels, 8 P (d + 1) bytes).
    """
    itemsize = {"float32": 4, "float64": 8}[group.dtype]
    n_act = activation_count(group)
    floats = (
        WEIGHT_COPIES * param_count(group)
        + TRAIN_ACT_COPIES * group.B * n_act
        + 2 * EVAL_POINTS * n_act
        + group.P
        + group.pte
    )
    perceptron = group.arch == "perceptron"
    device = (
        itemsize * (floats + group.P * group.d) if perceptron else itemsize * floats + 8 * group.P
    )
    if not host:
        return device
    draw = itemsize * param_count(group) + 8 * group.P * ((group.d + 1) if perceptron else 1)
    return device + HOST_DRAWS * draw


def members_that_fit(group: Group, budget: int, host: bool, where: str) -> int:
    """How many members of ``group`` fit in ``budget`` bytes (`member_bytes`, ``host`` as
    there); SpecError naming ``where`` and the settings to lower where not even one does."""
    need = member_bytes(group, host)
    if need > budget:
        raise SpecError(
            f"{where}: one member needs {need} bytes ({need / 2**30:.3g} GiB), more than the"
            f" {budget} bytes ({budget / 2**30:.3g} GiB) a task may use: lower P, pte or d"
            " (the perceptron's training points), or h or B (the networks' weights and"
            " activations)"
        )
    return budget // need


# -- batches -----------------------------------------------------------------------------


def _fmt(x: float) -> str:
    """Short number for keys and tables: %g, or 2^k for a power of two %g writes long."""
    short = f"{x:g}"
    m, e = math.frexp(x)
    if m == 0.5 and len(short) > 5:
        return f"2^{e - 1}"
    return short


@dataclass(frozen=True)
class Batch:
    """Members that train together on one device: one Group, different (alpha, T, seed).

    est_steps : ``estimate_steps`` of the slowest member (the batch's sequential steps)
    """

    experiment: str
    group: Group
    members: tuple[Member, ...]
    est_steps: float

    @functools.cached_property
    def estimates(self) -> tuple[float, ...]:
        """``estimate_steps`` of each member (computed once)."""
        return tuple(estimate_steps(self.group, m) for m in self.members)

    @property
    def work(self) -> float:
        """Planned member-steps: ``estimates`` summed over the members."""
        return sum(self.estimates)

    @property
    def dt_range(self) -> tuple[float, float]:
        dts = [self.group.dt(m.T) for m in self.members]
        return min(dts), max(dts)

    @property
    def key(self) -> str:
        """Readable, unique Dask key: <experiment>-P<P>-dt<lo>..<hi>-K<K>-<8 hex>.

        The hex digits hash the group's settings and the members, so the key is the same
        in every process and differs for any other batch.
        """
        lo, hi = self.dt_range
        dt = _fmt(lo) if lo == hi else f"{_fmt(lo)}..{_fmt(hi)}"
        payload = json.dumps(
            [
                self.experiment,
                self.group.as_dict(),
                [[repr(m.alpha), repr(m.T), m.seed] for m in self.members],
            ],
            sort_keys=True,
        )
        digest = hashlib.sha1(payload.encode()).hexdigest()[:8]
        return f"{self.experiment}-P{self.group.P}-dt{dt}-K{len(self.members)}-{digest}"

    def cells(self) -> list[Cell]:
        """The cells of the members, in the batch's order."""
        return [Cell(self.experiment, m.alpha, m.T, self.group.P, m.seed) for m in self.members]


def plan_batches(
    experiment: Experiment,
    cells: Iterable[Cell] | None = None,
    max_members: int = 256,
    memory_bytes: int | None = None,
    host: bool = False,
) -> list[Batch]:
    """Cut the cells of one experiment into ensemble batches; deterministic.

    cells        : cells of ``experiment`` to plan (default: its full grid), any order;
                   each at most once, all on the experiment's grid
    max_members  : most members per batch
    memory_bytes : memory for one batch; a batch then has at most
                   memory_bytes // member_bytes(group, host) members (None: no limit);
                   SpecError, naming the settings to lower, where one member needs more
    host         : the batch trains in host memory (CPU workers; see `member_bytes`)

    Inside a P, the cells sorted by (-estimate_steps, dt, alpha, seed) go one by one to
    the batch with the least planned work (ties: the lower index) among the
    n = ceil(cells / size) batches (size: the largest allowed) that hold fewer than
    ceil(cells / n) members. Planned work then differs by at most the largest estimate,
    and members are listed slowest first. Batches are ordered by P, then by index. The
    result does not depend on the order of ``cells``.
    """
    if not isinstance(max_members, int) or isinstance(max_members, bool) or max_members < 1:
        raise ValueError(f"max_members must be an integer >= 1, got {max_members!r}")
    if memory_bytes is not None and (not isinstance(memory_bytes, int) or memory_bytes < 1):
        raise ValueError(f"memory_bytes must be a positive integer or None, got {memory_bytes!r}")
    cells = experiment.cells() if cells is None else list(cells)
    grid = {key: set(getattr(experiment, key)) for key in ("alpha", "T", "P", "seed")}
    seen: set[Cell] = set()
    by_P: dict[int, list[Member]] = {}
    for c in cells:
        if c.experiment != experiment.name:
            raise ValueError(
                f"cell {c.id} belongs to experiment {c.experiment!r}, not {experiment.name!r}"
            )
        off = [key for key in grid if getattr(c, key) not in grid[key]]
        if off:
            raise ValueError(f"cell {c.id} is off the grid of {experiment.name!r} in {off}")
        if c in seen:
            raise ValueError(f"cell {c.id} is given twice")
        seen.add(c)
        by_P.setdefault(c.P, []).append(c.member())

    batches = []
    for P in sorted(by_P):
        group = experiment.group(P)
        size = max_members
        if memory_bytes is not None:
            where = f"{experiment.name} (P={P})"
            size = min(size, members_that_fit(group, memory_bytes, host, where))
        ranked = sorted(
            ((-estimate_steps(group, m), group.dt(m.T), m.alpha, m.seed, m) for m in by_P[P]),
            key=lambda r: r[:4],
        )
        n = math.ceil(len(ranked) / size)
        cap = math.ceil(len(ranked) / n)
        dealt: list[list[tuple]] = [[] for _ in range(n)]
        load = [0.0] * n
        for r in ranked:
            i = min((k for k in range(n) if len(dealt[k]) < cap), key=lambda k: (load[k], k))
            dealt[i].append(r)
            load[i] -= r[0]
        batches += [
            Batch(
                experiment=experiment.name,
                group=group,
                members=tuple(r[4] for r in chunk),
                est_steps=-chunk[0][0],
            )
            for chunk in dealt
        ]
    return batches


def format_plan(batches: Sequence[Batch]) -> str:
    """A table of the batches for ``--dry-run``, totals at the end (estimates only)."""
    head = ("key", "P", "K", "dt", "est steps", "est member-steps")
    rows = []
    for b in batches:
        lo, hi = b.dt_range
        rows.append(
            (
                b.key,
                str(b.group.P),
                str(len(b.members)),
                _fmt(lo) if lo == hi else f"{_fmt(lo)}..{_fmt(hi)}",
                f"{b.est_steps:.3g}",
                f"{b.work:.3g}",
            )
        )
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(head)]

    def line(cols: Sequence[str]) -> str:
        first = cols[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cols[1:], widths[1:], strict=True))])

    out = [line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    members = sum(len(b.members) for b in batches)
    steps = sum(b.est_steps for b in batches)
    longest = max((b.est_steps for b in batches), default=0.0)
    member_steps = sum(b.work for b in batches)
    out.append(
        f"total: {len(batches)} batches, {members} members; est steps {steps:.3g} in all"
        f" (one device, batches in turn), longest batch {longest:.3g};"
        f" est member-steps {member_steps:.3g}. Estimates from plan.estimate_steps (rough)."
    )
    return "\n".join(out)
