"""Cells and ensemble groups: the units of work, free of torch.

A *cell* is one trained network, identified by (experiment, alpha, T, P, seed). A *group*
is everything that members of one ensemble batch share (dataset, architecture, widths,
P, B, budgets, dtype); members differ only in (alpha, T, seed).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

DATASETS = ("mnist", "cifar10", "perceptron")
ARCHS = ("fc", "mnas", "perceptron")
ACTIVATIONS = ("relu", "gelu")
DTYPES = ("float32", "float64")
POOL_SIZE = {"mnist": 70_000, "cifar10": 60_000}
INPUT_SHAPE = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
"""(C, H, W) of one image; the perceptron's input is (d,)."""
FLOAT32_RANGE = (2.0**-126, (2 - 2.0**-23) * 2.0**127)
"""Smallest normal and largest float32 numbers: alpha and dt = T h B of a float32
group must lie between them."""


class EnsembleError(Exception):
    """A problem the user can fix (bad settings, missing data, busy store); the CLI
    prints its message instead of a traceback."""


class SpecError(EnsembleError, ValueError):
    """An invalid setting; the message names the field, the value and the allowed range."""


def _finite_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise SpecError(f"{name} must be a number > 0, got {value!r}")
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise SpecError(f"{name} must be a finite number > 0, got {value!r}")


def _int_at_least(name: str, value: int, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise SpecError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class Group:
    """Settings shared by every member of an ensemble batch.

    dataset     : "mnist" (parity), "cifar10" (animals) or "perceptron" (depleted sign)
    arch        : "fc" (FC-L), "mnas" (MNAS(h) CNN) or "perceptron"
    P           : training set size (images / points)
    pte         : test set size
    B           : batch size (distinct training indices per step)
    h           : width (FC, MNAS); 1 for the perceptron, so that T = dt / (h B) = dt / B
    L           : hidden layers of FC-L (ignored otherwise)
    activation  : "relu" or "gelu", both normalised to unit second moment
    d, chi      : perceptron input dimension and depletion exponent (chi >= 0)
    max_steps   : step budget per member (outcome "unfinished" when reached)
    max_seconds : wall-time budget of one ensemble batch (None: no limit): once spent,
                  the running members stop "unfinished" and the ones still waiting for a
                  slot do not start (their cells stay missing: a rerun trains them)
    dtype       : "float32" (default) or "float64"
    tf32        : allow TF32 matmuls on CUDA (opt-in, recorded in the cube)
    ntk_points  : measure the change of the empirical NTK on the first ntk_points test
                  points at the end of training (`ensemble.ntk`; 0: not measured). Costs
                  two Jacobians of ntk_points x (parameters) numbers per member.
    """

    dataset: str
    arch: str
    P: int
    B: int
    pte: int = 2048
    h: int = 1
    L: int = 5
    activation: str = "relu"
    d: int = 0
    chi: float = 0.0
    max_steps: int = 1_000_000
    max_seconds: float | None = None
    dtype: str = "float32"
    tf32: bool = False
    ntk_points: int = 0
    data_root: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise SpecError naming the first invalid field and its allowed range."""
        if self.dataset not in DATASETS:
            raise SpecError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.arch not in ARCHS:
            raise SpecError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if (self.arch == "perceptron") != (self.dataset == "perceptron"):
            raise SpecError(
                f"arch 'perceptron' goes with dataset 'perceptron' only, got arch={self.arch!r}"
                f" and dataset={self.dataset!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise SpecError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.dtype not in DTYPES:
            raise SpecError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _int_at_least("P", self.P, 1)
        _int_at_least("B", self.B, 1)
        _int_at_least("pte", self.pte, 1)
        _int_at_least("max_steps", self.max_steps, 1)
        _int_at_least("ntk_points", self.ntk_points, 0)
        if self.ntk_points > self.pte:
            raise SpecError(
                f"ntk_points must be an integer from 0 to pte = {self.pte} (the test points"
                f" the kernel is measured on), got {self.ntk_points}"
            )
        if self.B > self.P:
            raise SpecError(
                f"B must be <= P (distinct indices per step), got B={self.B} > P={self.P}"
            )
        if self.max_seconds is not None:
            _finite_positive("max_seconds", self.max_seconds)
        if self.arch == "perceptron":
            _int_at_least("d", self.d, 2)
            if self.h != 1:
                raise SpecError(f"h must be 1 for the perceptron (T = dt / B), got {self.h}")
            if (
                not isinstance(self.chi, (int, float))
                or not math.isfinite(self.chi)
                or self.chi < 0
            ):
                raise SpecError(f"chi must be a finite number >= 0, got {self.chi!r}")
        else:
            _int_at_least("h", self.h, 1)
            if self.arch == "fc":
                _int_at_least("L", self.L, 1)
            pool = POOL_SIZE[self.dataset]
            if self.P + self.pte > pool:
                raise SpecError(
                    f"P + pte must be <= {pool} (the {self.dataset} pool), got P={self.P},"
                    f" pte={self.pte}"
                )

    def dt(self, T: float) -> float:
        """SGD step dt = T * h * B (h = 1 for the perceptron)."""
        return T * self.h * self.B

    def check_scales(self, alpha: Iterable[float], T: Iterable[float]) -> None:
        """Every alpha and T must be finite and > 0; with dtype float32, every alpha and
        dt = T h B must also be a normal float32 number:
        the engine holds them as float32 (alpha = 1e-50 became 0 and read as diverged at
        step 0). Raises SpecError naming the field."""
        for key, values in (("alpha", alpha), ("T", T)):
            bad = [v for v in values if not (math.isfinite(v) and v > 0)]
            if bad:
                raise SpecError(f"field {key!r}: values must be finite numbers > 0, got {bad[0]!r}")
        if self.dtype != "float32":
            return
        tiny, huge = FLOAT32_RANGE
        for key, values, scale in (("alpha", alpha, 1.0), ("T", T, self.dt(1.0))):
            bad = [v for v in values if not tiny <= v * scale <= huge]
            if bad:
                what = "alpha" if key == "alpha" else "dt = T h B"
                raise SpecError(
                    f"field {key!r}: {what} must be a normal float32 number ({tiny:.3g} to"
                    f" {huge:.3g}) with dtype float32, got {key} = {bad[0]!r};"
                    ' use dtype = "float64" for more range'
                )

    def as_dict(self) -> dict:
        """Settings as plain values (for cube attributes and task keys)."""
        out = asdict(self)
        out.pop("data_root")
        return out


@dataclass(frozen=True)
class Member:
    """One network of an ensemble: output scale alpha, temperature T, seed."""

    alpha: float
    T: float
    seed: int

    def __post_init__(self) -> None:
        _finite_positive("alpha", self.alpha)
        _finite_positive("T", self.T)
        _int_at_least("seed", self.seed, 0)


@dataclass(frozen=True, order=True)
class Cell:
    """One point of a sweep's grid; its id is stable across runs and processes."""

    experiment: str
    alpha: float
    T: float
    P: int
    seed: int

    @property
    def id(self) -> str:
        return f"{self.experiment}/a={self.alpha!r}/T={self.T!r}/P={self.P}/s={self.seed}"

    def member(self) -> Member:
        return Member(alpha=self.alpha, T=self.T, seed=self.seed)
