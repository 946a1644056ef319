"""Sweep specifications: typed, validated, loadable from TOML; no torch.

A *sweep* is a named list of *experiments*. An experiment fixes every setting of
``ensemble.cells.Group`` except P, and sweeps the grids alpha x T x P x seed; each point
of the grid is a ``Cell`` (one trained network). Everything is validated when the sweep
is loaded or constructed, before anything runs: each problem raises ``SpecError`` with a
message that names the sweep or experiment, the field, what was received and what is
allowed.

TOML format (``load_sweep``; the shipped files live in ``ensemble/sweeps/``)::

    name = "quick_fc_phase_mnist"        # [A-Za-z0-9_-]+
    description = "what the sweep is for"
    expected_cost = "about 4 min on 2 CPU cores (measured ...)"   # free text; optional

    [[experiment]]                       # one table per experiment
    name = "quick_fc_phase_mnist"        # also the Zarr group name; [A-Za-z0-9_-]+
    dataset = "mnist"                    # settings: the fields of cells.Group except P
    arch = "fc"                          #   required: dataset, arch, B; h (fc, mnas);
    activation = "gelu"                  #   d (perceptron); the rest has Group defaults
    h = 128
    L = 5
    B = 16
    pte = 1024
    max_steps = 20000
    P = [256]                            # grids: a list, or {pow2 = [lo, hi]} or
    alpha = [0.25, 4, 128, 4096]         #   {pow2 = [lo, hi, step]} = 2**lo .. 2**hi,
    dt = {pow2 = [-1, 5, 2]}             #   both ends included, integer exponent step
    seed = 2                             # seed: a list, or n meaning 0 .. n-1

- Exactly one of ``T`` and ``dt`` per experiment; ``dt`` is converted with
  T = dt / (h B) (h = 1 for the perceptron), exact when h B and dt are powers of two.
- Grids are sorted; duplicates are an error. alpha and T are finite floats > 0, P are
  integers >= 1, seeds integers >= 0.
- ``matrix = {chi = [0, 1, 3], d = [16, 32]}`` in an experiment table expands it into one
  experiment per combination (in the order written), named ``<name>_chi<chi>_d<d>``;
  matrix keys are settings. In names, an integer-valued number is written as an integer,
  otherwise ``.`` becomes ``p`` and ``-`` becomes ``m`` (chi = 0.5 -> ``chi0p5``).
- ``data_root`` is not a sweep setting (it is machine-specific; the launcher sets it).

``Sweep.to_dict`` gives the same format with every setting explicit and every grid a
plain list (JSON-able, for cube attributes); ``Sweep.from_dict`` reads it back.
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from ensemble.cells import ARCHS, DATASETS, Cell, Group, SpecError

__all__ = [
    "Experiment",
    "SpecError",
    "Sweep",
    "load_sweep",
    "shipped_sweeps",
]

NAME_RE = re.compile(r"[A-Za-z0-9_-]+")

GRIDS = ("alpha", "T", "P", "seed")
"""Swept fields, in the order of the cube's dimensions."""
MAX_INT = 2**63 - 1
"""Largest P or seed: the cube stores them as int64."""
MAX_CELLS = 10**7
"""Most cells of one experiment: the planner lists every cell and the cube holds a few
hundred bytes per cell (the paper's largest sweeps have about 10^4)."""

SETTING_TYPES: dict[str, type] = {
    "dataset": str,
    "arch": str,
    "h": int,
    "L": int,
    "activation": str,
    "B": int,
    "pte": int,
    "d": int,
    "chi": float,
    "max_steps": int,
    "max_seconds": float,
    "dtype": str,
    "tf32": bool,
    "ntk_points": int,
}
"""Settings of an experiment: every Group field except P (swept) and data_root."""

_GROUP_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(Group) if f.name in SETTING_TYPES and f.default is not MISSING
}
assert set(_GROUP_DEFAULTS) | {"dataset", "arch", "B"} == set(SETTING_TYPES), (
    "spec.SETTING_TYPES is out of step with cells.Group"
)

_ONLY_FOR: dict[str, tuple[str, ...]] = {
    "L": ("fc",),
    "activation": ("fc", "mnas"),
    "d": ("perceptron",),
    "chi": ("perceptron",),
}
"""Settings that only some architectures use; setting them elsewhere is an error."""


def setting_applies(key: str, arch: str) -> bool:
    """Whether setting ``key`` means anything for ``arch`` (e.g. ``d`` for FC does not)."""
    return arch in _ONLY_FOR.get(key, (arch,))


_EXPERIMENT_KEYS = ("name", "matrix", "dt", *GRIDS, *SETTING_TYPES)
_SWEEP_KEYS = ("name", "description", "expected_cost", "experiment")
NOT_MEASURED = "not yet measured"


# -- small validators ------------------------------------------------------------------


def _hint(key: str, allowed: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest allowed key, case-insensitive, or ''."""
    allowed = list(allowed)
    lower = {a.lower(): a for a in allowed}
    close = difflib.get_close_matches(key.lower(), list(lower), n=1, cutoff=0.6)
    return f" (did you mean {lower[close[0]]!r}?)" if close else ""


def _check_keys(where: str, table: Mapping[str, Any], allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    for key in table:
        if key not in allowed:
            raise SpecError(
                f"{where}: unknown key {key!r}{_hint(str(key), allowed)};"
                f" allowed keys: {', '.join(allowed)}"
            )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_name(where: str, name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SpecError(f"{where}: name must be a non-empty string of [A-Za-z0-9_-], got {name!r}")
    return name


def _pow2(where: str, key: str, spec: Any) -> list[int] | list[float]:
    """Expand {pow2 = [lo, hi(, step)]} into [2**lo, ..., 2**hi] (ints for P)."""
    _check_keys(f"{where}, field {key!r}", spec, ("pow2",))
    args = spec.get("pow2")
    if not isinstance(args, list) or len(args) not in (2, 3) or not all(_is_int(a) for a in args):
        raise SpecError(
            f"{where}, field {key!r}: pow2 must be [lo, hi] or [lo, hi, step] with integer"
            f" exponents, got {args!r}"
        )
    lo, hi, step = (*args, 1) if len(args) == 2 else args
    if step < 1 or hi < lo or (hi - lo) % step:
        raise SpecError(
            f"{where}, field {key!r}: pow2 = {args!r} needs lo <= hi, step >= 1 and hi - lo"
            f" a multiple of step"
        )
    if key == "P":
        if lo < 0 or hi > 62:
            raise SpecError(
                f"{where}, field 'P': pow2 exponents must be in [0, 62] (P <= 2**63 - 1),"
                f" got {args!r}"
            )
        return [2**k for k in range(lo, hi + 1, step)]
    if max(abs(lo), abs(hi)) > 1000:
        raise SpecError(f"{where}, field {key!r}: pow2 exponents must be in [-1000, 1000]")
    return [math.ldexp(1.0, k) for k in range(lo, hi + 1, step)]


def _grid_values(where: str, key: str, value: Any) -> list:
    """A grid as written in a file (list, pow2 table, or seed count) -> list of values."""
    if key == "seed" and _is_int(value):
        if not 1 <= value <= MAX_CELLS:
            raise SpecError(
                f"{where}, field 'seed': a seed count must be from 1 to {MAX_CELLS:.0e},"
                f" got {value}"
            )
        return list(range(value))
    if isinstance(value, Mapping):
        if key == "seed":
            raise SpecError(
                f"{where}, field 'seed': give a list of seeds or a count n (seeds 0..n-1),"
                f" not {value!r}"
            )
        return _pow2(where, key, value)
    if isinstance(value, (list, tuple)):
        return list(value)
    extra = " or a count n (seeds 0..n-1)" if key == "seed" else " or {pow2 = [lo, hi(, step)]}"
    raise SpecError(f"{where}, field {key!r}: expected a list{extra}, got {value!r}")


def _normalise_grid(where: str, key: str, values: Iterable[Any]) -> tuple:
    """Check types and ranges, sort, reject duplicates."""
    values = list(values)
    if not values:
        raise SpecError(f"{where}, field {key!r}: the grid is empty")
    if key in ("alpha", "T", "dt"):
        for v in values:
            if not _is_number(v) or not math.isfinite(v) or v <= 0:
                raise SpecError(
                    f"{where}, field {key!r}: values must be finite numbers > 0, got {v!r}"
                )
        values = [float(v) for v in values]
    else:
        low = 1 if key == "P" else 0
        for v in values:
            if not _is_int(v) or not low <= v <= MAX_INT:
                raise SpecError(
                    f"{where}, field {key!r}: values must be integers from {low} to 2**63 - 1"
                    f" (the cube's int64), got {v!r}"
                )
    out = tuple(sorted(values))
    dups = sorted({v for v, w in zip(out, out[1:], strict=False) if v == w})
    if dups:
        raise SpecError(f"{where}, field {key!r}: duplicate values {dups}")
    return out


def _normalise_settings(where: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check keys and types of settings, fill in Group defaults; ranges are Group's job."""
    if not isinstance(settings, Mapping):
        raise SpecError(f"{where}: settings must be a table, got {settings!r}")
    _check_keys(where, settings, SETTING_TYPES)
    out: dict[str, Any] = {}
    for key, typ in SETTING_TYPES.items():
        if key not in settings or (settings[key] is None and key == "max_seconds"):
            continue
        value = settings[key]
        if typ is bool:
            ok = isinstance(value, bool)
        elif typ is int:
            ok = _is_int(value)
        elif typ is float:
            ok = _is_number(value)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, str)
        if not ok:
            raise SpecError(
                f"{where}, field {key!r}: expected {typ.__name__}, got {settings[key]!r}"
                f" ({type(settings[key]).__name__})"
            )
        out[key] = value
    for key in ("dataset", "arch", "B"):
        if key not in out:
            raise SpecError(f"{where}: missing required setting {key!r}")
    arch, dataset = out["arch"], out["dataset"]
    if dataset not in DATASETS:
        raise SpecError(f"{where}, field 'dataset': must be one of {DATASETS}, got {dataset!r}")
    if arch not in ARCHS:
        raise SpecError(f"{where}, field 'arch': must be one of {ARCHS}, got {arch!r}")
    if (arch == "perceptron") != (dataset == "perceptron"):
        raise SpecError(
            f"{where}, field 'arch': arch 'perceptron' goes with dataset 'perceptron' only,"
            f" got arch={arch!r} and dataset={dataset!r}"
        )
    if arch in ("fc", "mnas") and "h" not in out:
        raise SpecError(f"{where}: missing required setting 'h' (the width of arch {arch!r})")
    if arch == "perceptron" and "d" not in out:
        raise SpecError(f"{where}: missing required setting 'd' (the perceptron's dimension)")
    for key, archs in _ONLY_FOR.items():
        if key in out and arch not in archs and out[key] != _GROUP_DEFAULTS[key]:
            raise SpecError(
                f"{where}, field {key!r}: {key} = {out[key]!r} is only used by arch"
                f" {' / '.join(archs)}, not {arch!r}; remove it"
            )
    return {key: out.get(key, _GROUP_DEFAULTS.get(key)) for key in SETTING_TYPES}


def _name_part(value: Any) -> str:
    """How a matrix value appears in an experiment name (chi=0.5 -> '0p5', 3.0 -> '3')."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).replace(".", "p").replace("-", "m")


# -- the spec ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Experiment:
    """One experiment: fixed settings, swept grids; one Zarr group in the cube.

    name     : also the Zarr group name; [A-Za-z0-9_-]+
    settings : every Group field except P (and data_root), defaults filled in; read-only
    alpha    : output scales, sorted, unique, finite, > 0
    T        : temperatures T = dt / (h B) (h = 1 for the perceptron), sorted, unique, > 0
    P        : training set sizes, sorted, unique, >= 1
    seed     : member seeds, sorted, unique, >= 0

    Construction validates everything, including a Group per P (so B <= min(P) and
    P + pte <= the dataset's pool are checked); errors name the experiment.
    """

    name: str
    settings: dict
    alpha: tuple[float, ...]
    T: tuple[float, ...]
    P: tuple[int, ...]
    seed: tuple[int, ...]

    def __post_init__(self) -> None:
        where = f"experiment {_check_name('experiment', self.name)!r}"
        object.__setattr__(self, "settings", _normalise_settings(where, self.settings))
        for key in GRIDS:
            object.__setattr__(self, key, _normalise_grid(where, key, getattr(self, key)))
        n_cells = math.prod(len(getattr(self, key)) for key in GRIDS)
        if n_cells > MAX_CELLS:
            raise SpecError(
                f"{where}: the grid has {n_cells} cells (alpha x T x P x seed ="
                f" {' x '.join(str(len(getattr(self, k))) for k in GRIDS)}), at most"
                f" {MAX_CELLS:.0e} per experiment: split it into experiments"
            )
        for P in self.P:
            self.group(P)
        try:
            self.group(self.P[0]).check_scales(self.alpha, self.T)
        except SpecError as err:
            raise SpecError(f"{where}, {err}") from None

    def group(self, P: int) -> Group:
        """The validated Group of this experiment's members at training set size P."""
        try:
            return Group(P=P, **self.settings)
        except SpecError as err:
            raise SpecError(f"experiment {self.name!r} (P={P}): {err}") from None

    def dt(self, T: float) -> float:
        """SGD step dt = T h B of a temperature T (h = 1 for the perceptron)."""
        return T * self.settings["h"] * self.settings["B"]

    def cells(self) -> list[Cell]:
        """The full grid, in the order of the cube's dimensions (alpha, T, P, seed)."""
        return [
            Cell(self.name, alpha, T, P, seed)
            for alpha, T, P, seed in itertools.product(self.alpha, self.T, self.P, self.seed)
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in the file format: name, settings, explicit grids (T, not dt)."""
        out: dict[str, Any] = {"name": self.name}
        out.update({k: v for k, v in self.settings.items() if v is not None})
        out.update({key: list(getattr(self, key)) for key in GRIDS})
        return out

    @classmethod
    def from_table(cls, table: Mapping[str, Any], where: str = "") -> list[Experiment]:
        """Experiments of one ``[[experiment]]`` table (several if it has a ``matrix``)."""
        if not isinstance(table, Mapping):
            raise SpecError(f"{where}experiment: expected a table, got {table!r}")
        name = table.get("name")
        label = f"{where}experiment {name!r}" if name is not None else f"{where}experiment"
        _check_keys(label, table, _EXPERIMENT_KEYS)
        if name is None:
            raise SpecError(f"{label}: missing required key 'name'")
        _check_name(label, name)
        for key in ("alpha", "P", "seed"):
            if key not in table:
                raise SpecError(f"{label}: missing required key {key!r}")
        if ("T" in table) == ("dt" in table):
            raise SpecError(f"{label}: give exactly one of 'T' and 'dt' (T = dt / (h B))")

        matrix = table.get("matrix", {})
        if not isinstance(matrix, Mapping):
            raise SpecError(f"{label}, field 'matrix': expected a table of lists, got {matrix!r}")
        _check_keys(f"{label}, field 'matrix'", matrix, SETTING_TYPES)
        for key, values in matrix.items():
            if key in table:
                raise SpecError(f"{label}: {key!r} is both a setting and a matrix key")
            if not isinstance(values, list) or not values:
                raise SpecError(
                    f"{label}, field 'matrix': {key!r} must be a non-empty list, got {values!r}"
                )
        settings = {k: v for k, v in table.items() if k in SETTING_TYPES}
        grids = {key: _grid_values(label, key, table[key]) for key in ("alpha", "P", "seed")}

        out = []
        for combo in itertools.product(*matrix.values()):
            these = dict(settings, **dict(zip(matrix, combo, strict=True)))
            sub = name + "".join(f"_{k}{_name_part(v)}" for k, v in zip(matrix, combo, strict=True))
            sublabel = f"{where}experiment {sub!r}"
            if "T" in table:
                T = _grid_values(sublabel, "T", table["T"])
            else:
                dts = _normalise_grid(sublabel, "dt", _grid_values(sublabel, "dt", table["dt"]))
                norm = _normalise_settings(sublabel, these)
                if norm["h"] < 1 or norm["B"] < 1:
                    raise SpecError(
                        f"{sublabel}: converting dt to T = dt / (h B) needs h >= 1 and B >= 1,"
                        f" got h={norm['h']}, B={norm['B']}"
                    )
                T = [dt / (norm["h"] * norm["B"]) for dt in dts]
            out.append(cls(name=sub, settings=these, T=T, **grids))
        return out


@dataclass(frozen=True)
class Sweep:
    """A named list of experiments, with a description and its measured cost.

    expected_cost : free text, e.g. "about 4 min on 2 CPU cores (measured ...)"
    """

    name: str
    description: str
    experiments: tuple[Experiment, ...]
    expected_cost: str = NOT_MEASURED

    def __post_init__(self) -> None:
        where = f"sweep {_check_name('sweep', self.name)!r}"
        for key in ("description", "expected_cost"):
            if not isinstance(getattr(self, key), str):
                raise SpecError(
                    f"{where}, field {key!r}: expected a string, got {getattr(self, key)!r}"
                )
        experiments = tuple(self.experiments)
        if not experiments:
            raise SpecError(f"{where}: no experiments; add at least one [[experiment]] table")
        for e in experiments:
            if not isinstance(e, Experiment):
                raise SpecError(f"{where}: experiments must be Experiment objects, got {e!r}")
        names = [e.name for e in experiments]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise SpecError(f"{where}: duplicate experiment names {dups}; names must be unique")
        object.__setattr__(self, "experiments", experiments)

    def experiment(self, name: str) -> Experiment:
        """The experiment called ``name``."""
        for e in self.experiments:
            if e.name == name:
                return e
        names = [e.name for e in self.experiments]
        raise KeyError(f"no experiment {name!r} in sweep {self.name!r}{_hint(name, names)}")

    def cells(self) -> list[Cell]:
        """Cells of every experiment, experiment by experiment."""
        return [c for e in self.experiments for c in e.cells()]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict in the file format; ``from_dict`` round-trips it."""
        return {
            "name": self.name,
            "description": self.description,
            "expected_cost": self.expected_cost,
            "experiment": [e.to_dict() for e in self.experiments],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sweep:
        """A sweep from a parsed TOML file or a ``to_dict`` result; validates everything."""
        if not isinstance(d, Mapping):
            raise SpecError(f"a sweep must be a table, got {type(d).__name__}")
        name = d.get("name")
        where = f"sweep {name!r}" if name is not None else "sweep"
        _check_keys(where, d, _SWEEP_KEYS)
        for key in ("name", "description", "experiment"):
            if key not in d:
                raise SpecError(f"{where}: missing required key {key!r}")
        _check_name(where, name)
        tables = d["experiment"]
        if not isinstance(tables, list):
            raise SpecError(f"{where}: 'experiment' must be an array of tables ([[experiment]])")
        experiments = [e for t in tables for e in Experiment.from_table(t, f"{where}, ")]
        return cls(
            name=name,
            description=d["description"],
            experiments=tuple(experiments),
            expected_cost=d.get("expected_cost", NOT_MEASURED),
        )


# -- files -------------------------------------------------------------------------------

_SWEEPS_PACKAGE = "ensemble"
_SWEEPS_DIR = "sweeps"


def _shipped_dir():
    return resources.files(_SWEEPS_PACKAGE).joinpath(_SWEEPS_DIR)


def shipped_sweeps() -> list[str]:
    """Names (file stems) of the sweep files shipped in ``ensemble/sweeps/``, sorted."""
    return sorted(
        p.name[: -len(".toml")] for p in _shipped_dir().iterdir() if p.name.endswith(".toml")
    )


def load_sweep(path_or_name: str | Path) -> Sweep:
    """Load and validate a sweep: a .toml path, or the name of a shipped sweep file.

    A string that names an existing file, or contains a path separator, is a path;
    otherwise it is looked up in ``ensemble/sweeps/`` (with or without ``.toml``).
    """
    path = Path(path_or_name)
    text = str(path_or_name)
    if path.is_file() or isinstance(path_or_name, Path) or "/" in text or "\\" in text:
        if not path.is_file():
            raise SpecError(f"sweep file {text!r} does not exist")
        source, raw = str(path), path.read_bytes()
    else:
        stem = text[: -len(".toml")] if text.endswith(".toml") else text
        shipped = shipped_sweeps()
        if stem not in shipped:
            raise SpecError(
                f"no sweep file {text!r} and no shipped sweep {stem!r}{_hint(stem, shipped)};"
                f" shipped sweeps: {', '.join(shipped)}"
            )
        source = f"ensemble/sweeps/{stem}.toml"
        raw = _shipped_dir().joinpath(f"{stem}.toml").read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SpecError(f"{source}: not valid TOML: {err}") from None
    try:
        return Sweep.from_dict(data)
    except SpecError as err:
        raise SpecError(f"{source}: {err}") from None
