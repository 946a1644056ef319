r"""``python -m analysis reproduce MANIFEST``: the reproduction page, written from the cubes.

The manifest is a TOML file listing runs; each run is one cube (its ``store`` path is
relative to the current directory), optionally a subset of its groups, and the sweep
that made it. Adding a run is a five-line ``[[run]]`` table::

    title = "Reproduction at reduced scale"
    description = "optional paragraph under the title"

    [[run]]
    key = "fc_phase"                          # folder under <out>/reproduction/
    title = "FC-5L (alpha, T) phase diagram, MNIST parity"
    store = "results/quick.zarr"
    experiments = ["quick_fc_phase_mnist"]    # optional; default: every group
    sweep = "quick_fc_phase_mnist"            # optional: sweep file or shipped name
    note = "free text shown under the run"    # optional; no hand-typed results

Every store is checked before anything is written. Then each run gets the full report
of `analysis.report` in ``<out>/reproduction/<key>/`` and ``<out>/reproduction.md``
gathers a provenance table (from the groups' launch records,
``ensemble.schema.LAUNCHES_ATTR``) and, per run, the key figures and a reading computed
from the numbers of that report:

- phase diagrams (several alpha and T): for each alpha whether the seed-mean test error
  falls (noise helps) or rises (noise hurts) with T (paired t tests, `error_trend`);
  the best cell; the diverged cells; smallest alpha (feature side) against largest
  (lazy side);
- lazy T-sweeps (several T and P): delta, gamma, c, b, a and the check a = gamma/delta;
  per P the test error against T (`error_trend`) with T_c (b) and whether the error
  rises or falls past it;
- perceptron groups: one table across (chi, d) of the signal's P-exponent against
  1/(1+chi), its local P-exponents and the noise's P-exponent against 0, each with a
  verdict (`verdict`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import xarray as xr

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from analysis.aggregate import (
    Change,
    at_alpha,
    compared_T,
    effective_outcome,
    masked,
    mean_stderr,
    outcome_counts,
    paired_change,
    seed_mean,
)
from analysis.crossover import DIRECTION
from analysis.fits import Estimate, ratio
from analysis.load import experiment_names
from analysis.optimal import CLASSES
from analysis.perceptron import is_perceptron, local_exponent_map
from analysis.plots import pow2_text
from analysis.report import (
    FEATURE_SIDE,
    OPTIMUM_FITS,
    ExperimentReport,
    Report,
    analysis_commit,
    build_report,
    check_formats,
    divergence_fit_text,
    divergence_text,
    optimum_fit_text,
)
from ensemble.schema import DIVERGED, LAUNCHES_ATTR, OUTCOME_FLAGS, UNFINISHED

TOLERANCE = 0.05
"""An exponent within this of its prediction "agrees within 0.05" (absolute)."""
KEY_FIGURES = re.compile(
    r"_(phase_P\d+|optimal_T_P\d+|ntk_scaling|tsweep|crossover|perceptron|summary|finite_d)$"
)
"""Figures (by file stem) embedded in reproduction.md; the others (dynamics) stay in the
run's report."""


class ManifestError(ValueError):
    """The manifest is malformed, or a run's cube is missing; the message says which."""


@dataclass(frozen=True)
class Run:
    """One ``[[run]]`` of the manifest (see the module docstring)."""

    key: str
    title: str
    store: str
    experiments: tuple[str, ...] | None = None
    sweep: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class Manifest:
    path: Path
    title: str
    runs: tuple[Run, ...]
    description: str = ""


# ---------------------------------------------------------------------------- manifest

_TOP_KEYS = {"title", "description", "run"}
_RUN_KEYS = {"key", "title", "store", "experiments", "sweep", "note"}


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest; raises ManifestError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} not found")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"manifest {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise ManifestError(f"manifest {path}: unknown keys {unknown}; allowed {sorted(_TOP_KEYS)}")
    tables = doc.get("run")
    if not isinstance(tables, list) or not tables:
        raise ManifestError(f"manifest {path} lists no runs: add [[run]] tables")
    runs = tuple(_run(table, i, path) for i, table in enumerate(tables))
    keys = [r.key for r in runs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ManifestError(f"manifest {path}: run keys {repeated} appear more than once")
    return Manifest(path, str(doc.get("title", "Reproduction")), runs, doc.get("description", ""))


def _run(table: Mapping, index: int, path: Path) -> Run:
    where = f"manifest {path}, run {index + 1} ({table.get('key', 'no key')!r})"
    unknown = sorted(set(table) - _RUN_KEYS)
    missing = sorted({"key", "title", "store"} - set(table))
    if unknown or missing:
        raise ManifestError(
            f"{where}: unknown keys {unknown}, missing keys {missing}; allowed {sorted(_RUN_KEYS)}"
        )
    key = str(table["key"])
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", key):
        raise ManifestError(f"{where}: key {key!r} must be a folder name (letters, digits, _.-)")
    experiments = table.get("experiments")
    if experiments is not None and (
        not isinstance(experiments, list) or not all(isinstance(e, str) for e in experiments)
    ):
        raise ManifestError(f"{where}: experiments must be a list of group names")
    return Run(
        key=key,
        title=str(table["title"]),
        store=str(table["store"]),
        experiments=tuple(experiments) if experiments else None,
        sweep=table.get("sweep"),
        note=table.get("note"),
    )


def absent_runs(manifest: Manifest, only: Sequence[str] | None = None) -> dict[str, str]:
    """{run key: why its cube cannot be read} for the runs (those of ``only``, if given)
    whose store is missing, unreadable or lacks a listed group."""
    out = {}
    for run in manifest.runs:
        if only is not None and run.key not in only:
            continue
        local = "://" not in run.store
        if local and not Path(run.store).exists():
            out[run.key] = (
                f"store {run.store} does not exist (paths are relative to the directory"
                " the command runs in)"
            )
            continue
        try:
            names = experiment_names(run.store)
        except Exception as exc:  # noqa: BLE001 -- any failure to open means "absent"
            out[run.key] = f"store {run.store} is not a readable cube ({type(exc).__name__}: {exc})"
            continue
        lacking = [e for e in run.experiments or () if e not in names]
        if lacking or not names:
            out[run.key] = f"store {run.store} lacks the groups {lacking or 'any'}; it has {names}"
    return out


# ---------------------------------------------------------------------------- the page


def reproduce(
    manifest: str | os.PathLike,
    out_dir: str | os.PathLike = "docs",
    *,
    skip_missing: bool = False,
    only: Sequence[str] | None = None,
    n_boot: int = 200,
    seed: int = 0,
    formats: Sequence[str] = ("png",),
    command: str | None = None,
) -> Path:
    """Write ``<out_dir>/reproduction.md`` and ``<out_dir>/reproduction/<key>/`` per run.

    skip_missing : for a run whose cube is absent, keep the section (and report folder)
                   that an earlier call wrote from it, marked with its date and analysis
                   code (`KEPT_FILE`), or write a line saying the cube is absent;
                   without it an absent cube fails
    only         : keys of the runs to regenerate (default: all); the others keep the
                   section an earlier call wrote, marked likewise, and need no cube now
    n_boot, seed : bootstrap of the fits (see `analysis.report.write_report`)
    formats      : figure formats; the page embeds the first
    command      : the command line named in the page's header
    Raises ManifestError before writing anything when a cube is absent (unless
    ``skip_missing``) or ``only`` names no run of the manifest. Returns the path of
    reproduction.md.
    """
    m = load_manifest(manifest)
    formats = tuple(formats) or ("png",)
    keys = [run.key for run in m.runs]
    if only is not None and (not only or set(only) - set(keys)):
        bad = sorted(set(only) - set(keys)) or "nothing"
        raise ManifestError(f"--only names {bad}; the runs of {m.path} are {keys}")
    absent = absent_runs(m, only)
    if absent and not skip_missing:
        raise ManifestError(
            "; ".join(f"run {key!r}: {why}" for key, why in absent.items())
            + " -- run the sweep(s) first, fix the manifest, or pass --skip-missing"
        )
    check_formats(formats)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reports = {
        run.key: build_report(
            run.store,
            out_dir / "reproduction" / run.key,
            experiments=run.experiments,
            n_boot=n_boot,
            seed=seed,
            formats=formats,
        )
        for run in m.runs
        if run.key not in absent and (only is None or run.key in only)
    }
    command = command or f"python -m analysis reproduce {m.path} --out {out_dir}"
    held = {k: "not selected by --only" for k in keys if only and k not in only}
    held |= absent
    kept = {key: _kept(out_dir, key) for key in held}
    rows, sections = {}, {}
    for run in m.runs:
        if run.key in held:
            rows[run.key], sections[run.key] = _absent_run(
                run, held[run.key], kept[run.key], out_dir
            )
            continue
        rows[run.key] = _provenance_row(run, reports[run.key], out_dir)
        sections[run.key] = _run_section(run, reports[run.key], out_dir, formats[0])
        _keep(out_dir, run.key, rows[run.key], sections[run.key])
    lines = _header(m, command, n_boot, seed)
    if any(kept.values()):
        lines += [
            f"**Not every run was regenerated**: {len([k for k in kept.values() if k])} run(s)"
            " show the section written from their cube by an earlier call (marked under its"
            " title with its date, analysis code and why).",
            "",
        ]
    lines += ["## Provenance", "", *_table(PROVENANCE_HEADER, [rows[r.key] for r in m.runs])]
    for run in m.runs:
        lines += sections[run.key]
    path = out_dir / "reproduction.md"
    path.write_text("\n".join(lines) + "\n")
    return path


KEPT_FILE = "page.json"
"""Per run, in ``<out>/reproduction/<key>/``: the run's provenance row and section as last
written from its cube, with the date and analysis code, reused by ``skip_missing``."""


def _keep(out_dir: Path, key: str, row: list[str], section: list[str]) -> None:
    kept = {
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "analysis_code": analysis_commit(),
        "row": row,
        "section": section,
    }
    (out_dir / "reproduction" / key / KEPT_FILE).write_text(json.dumps(kept, indent=1) + "\n")


def _kept(out_dir: Path, key: str) -> dict | None:
    """The run's last section (`KEPT_FILE`), or None when there is none or it is unreadable."""
    try:
        kept = json.loads((out_dir / "reproduction" / key / KEPT_FILE).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(kept, dict) and {"generated", "analysis_code", "row", "section"} <= set(kept)
    return kept if ok else None


def _absent_run(
    run: Run, why: str, kept: dict | None, out_dir: Path
) -> tuple[list[str], list[str]]:
    """Provenance row and section of a run whose cube is absent: the kept ones, marked."""
    if kept is None:
        row = [f"`{run.key}`", _sweep_cell(run, None, out_dir), "not regenerated"] + ["—"] * 5
        return row, [f"## {run.title}", "", f"Not regenerated: {why}.", ""]
    when, code = kept["generated"], _short(str(kept["analysis_code"]))
    row = list(kept["row"])
    row[-1] += f"; section of {when[:10]}, not regenerated"
    title, *rest = kept["section"]
    mark = (
        f"**Not regenerated**: {why}. This section and its report were written on {when}"
        f" by analysis code `{code}`; analysis changes since then are not in their numbers."
    )
    return row, [title, "", mark, *rest]


def _header(m: Manifest, command: str, n_boot: int, seed: int) -> list[str]:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = [f"# {m.title}", ""]
    if m.description:
        lines += [m.description.strip(), ""]
    return lines + [
        f"Generated {now} by `{command}` (analysis code {analysis_commit()}) from the"
        f" manifest `{m.path}`; do not edit by hand."
        " Every number is read from the cubes; the detail of each run is in its report.",
        "",
        "Conventions: seed means over converged cells; `±` is the larger of the"
        f" least-squares and bootstrap ({n_boot} resamples over seeds, seed {seed})"
        " standard errors. Wall time: summed over a run's launches (a launch that trained"
        " groups of several runs counts in each). Test-error trends with T are paired by"
        " seed (a seed fixes init, training set and batches at every T) and count where"
        " the mean per-seed change exceeds Student's t_(n-1) at two-sided 5 % times its"
        " standard error, Bonferroni-corrected for the T the lowest error was picked"
        " among; they run between the smallest and largest T where at least half as many"
        " seeds converged as at the best-covered T, and a phase diagram's lowest cell is"
        " ranked among the same T; where the ends do not differ, an error that rises to an"
        " inner T and falls back (both beyond t, corrected for the inner T) is a peak."
        " Exponent verdicts: `agrees within"
        f" {TOLERANCE:g}` when |fitted - predicted| <= {TOLERANCE:g}, else `agrees within 1"
        " sigma` when |fitted - predicted| <= its standard error, else `differs by X sigma`.",
        "",
    ]


# ---------------------------------------------------------------------------- provenance


@dataclass(frozen=True)
class Provenance:
    """Where a run's cells came from, read from its groups' attributes.

    launches : unique launch records (one launch records itself in each group it trained)
    recorded : cells covered by launch records; done / total: cells of the groups
    """

    sweeps: list[str]
    launches: list[dict]
    recorded: int
    done: int
    total: int
    outcomes: dict[str, int]
    fallback_devices: list[str]
    fallback_commits: list[str]

    @property
    def wall_s(self) -> float | None:
        """Summed wall time of the launches that have one (None: none has)."""
        walls = [r["wall_s"] for r in self.launches if r.get("wall_s") is not None]
        return float(sum(walls)) if walls else None

    @property
    def untimed(self) -> int:
        """Launches without a wall time: killed (settled by a later launch) or running."""
        return sum(r.get("wall_s") is None for r in self.launches)


def provenance(data: Mapping[str, xr.Dataset]) -> Provenance:
    """Launch records, cell counts and outcomes over the groups ``data``."""
    unique: dict[object, dict] = {}
    recorded = 0
    counts = {name: 0 for name in OUTCOME_FLAGS.values()}
    for ds in data.values():
        for r in ds.attrs.get(LAUNCHES_ATTR, []):
            unique.setdefault(r.get("id") or (r.get("started"), r.get("command")), r)
            recorded += int(r.get("cells_trained", 0))
        per = outcome_counts(ds, dims=None)
        for name, n in zip(per["outcome"].values, per.values, strict=True):
            counts[str(name)] += int(n)

    def attr(key: str) -> list[str]:
        return sorted({str(ds.attrs[key]) for ds in data.values() if key in ds.attrs})

    return Provenance(
        sweeps=attr("sweep"),
        launches=sorted(unique.values(), key=lambda r: str(r.get("started"))),
        recorded=recorded,
        done=sum(int(ds["done"].sum()) for ds in data.values()),
        total=sum(int(ds["done"].size) for ds in data.values()),
        outcomes=counts,
        fallback_devices=attr("device"),
        fallback_commits=attr("git_commit"),
    )


PROVENANCE_HEADER = ["run", "sweep", "command(s)", "device", "wall time"]
PROVENANCE_HEADER += ["cells done / total", "outcomes", "code"]


def _provenance_row(run: Run, report: Report, out_dir: Path) -> list[str]:
    p = provenance({name: e.data for name, e in report.experiments.items()})
    link = _rel(report.path, out_dir)
    return (
        [f"[`{run.key}`]({link})", _sweep_cell(run, p, out_dir)]
        + _launch_cells(p)
        + [f"{p.done} / {p.total}", _outcome_text(p.outcomes)]
        + [_commits(p)]
    )


def _sweep_cell(run: Run, p: Provenance | None, out_dir: Path) -> str:
    """The manifest's sweep (linked when it is a file), and the cube's sweep names when
    they differ from it."""
    cube_names = p.sweeps if p else []
    if not run.sweep:
        return ", ".join(f"`{s}`" for s in cube_names) or "not recorded"
    path = Path(run.sweep)
    text = f"[`{run.sweep}`]({_rel(path, out_dir)})" if path.is_file() else f"`{run.sweep}`"
    name = _sweep_name(path) if path.is_file() else run.sweep
    if cube_names and cube_names != [name]:
        text += f" (cube says {', '.join(f'`{s}`' for s in cube_names)})"
    return text


def _sweep_name(path: Path) -> str:
    try:
        return str(tomllib.loads(path.read_text()).get("name", path.stem))
    except (OSError, tomllib.TOMLDecodeError):
        return path.stem


def _launch_cells(p: Provenance) -> list[str]:
    """Command(s), device and wall time, or "not recorded" for cubes without records."""
    if not p.launches:
        devices = ", ".join(p.fallback_devices)
        device = f"{devices} (at group creation)" if devices else "not recorded"
        return ["not recorded", device, "not recorded"]
    commands = list(dict.fromkeys(str(r.get("command", "?")) for r in p.launches))
    devices = list(dict.fromkeys(str(r.get("device", "?")) for r in p.launches))
    n = len(p.launches)
    wall = p.wall_s
    wall_text = _duration(wall) if wall is not None else "not recorded"
    wall_text += f" ({n} launch{'es' if n > 1 else ''}"
    k = p.untimed
    wall_text += f"; {k} of them killed or running, not timed)" if k else ")"
    if p.recorded < p.done:
        wall_text += f"; records cover {p.recorded} of {p.done} done cells"
    return ["<br>".join(f"`{c}`" for c in commands), ", ".join(devices), wall_text]


def _short(commit: str) -> str:
    """A commit's first 10 hex digits, keeping a "+dirty" mark (uncommitted changes ran)."""
    return commit[:10] + ("+dirty" if commit.endswith("+dirty") else "")


def _commits(p: Provenance) -> str:
    """Code commits of the launches, else of the groups' creation."""
    recorded = [str(r["git_commit"]) for r in p.launches if r.get("git_commit")]
    if recorded:
        return ", ".join(f"`{_short(c)}`" for c in dict.fromkeys(recorded))
    if p.fallback_commits:
        return ", ".join(f"`{_short(c)}`" for c in p.fallback_commits) + " (at group creation)"
    return "not recorded"


def _outcome_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v or k == "converged")


# ---------------------------------------------------------------------------- one run


def _run_section(run: Run, report: Report, out_dir: Path, fmt: str) -> list[str]:
    groups = ", ".join(f"`{n}`" for n in report.experiments)
    lines = [
        f"## {run.title}",
        "",
        f"Cube `{run.store}`, groups {groups}. Full report:"
        f" [{_rel(report.path, out_dir)}]({_rel(report.path, out_dir)}).",
        "",
    ]
    if run.note:
        lines += [run.note.strip(), ""]
    perceptrons = {}
    for name, er in report.experiments.items():
        if is_perceptron(er.data):
            perceptrons[name] = er
            continue
        lines += [f"### `{name}`", ""]
        reading = experiment_reading(er)
        lines += reading[:2] + _figures(er.figures, out_dir, fmt) + reading[2:]
    if perceptrons:
        lines += ["### Perceptron: P-exponents across chi", ""]
        for er in perceptrons.values():
            lines += _figures(er.figures, out_dir, fmt)
        lines += _figures(report.summary_figures, out_dir, fmt)
        lines += perceptron_reading(perceptrons)
    return lines


def _figures(paths: Sequence[Path], out_dir: Path, fmt: str) -> list[str]:
    """Image links (relative to ``out_dir``) of the key figures among ``paths``."""
    lines = []
    for p in paths:
        if p.suffix == f".{fmt}" and KEY_FIGURES.search(p.stem):
            lines += [f"![{p.stem.replace('_', ' ')}]({_rel(p, out_dir)})", ""]
    return lines


def experiment_reading(er: ExperimentReport) -> list[str]:
    """The reading of a non-perceptron group: phase diagram and/or T-sweep."""
    ds = er.data
    n = {d: ds.sizes.get(d, 1) for d in ("alpha", "T", "P", "seed")}
    lines = [f"Grid: {n['alpha']} alpha x {n['T']} T x {n['P']} P x {n['seed']} seeds.", ""]
    if n["alpha"] >= 2 and n["T"] >= 2:
        lines += phase_reading(ds)
        lines += ntk_reading(er)
        lines += optimal_T_reading(er)
    if n["T"] >= 2 and n["P"] >= 2:
        lines += tsweep_reading(er)
    if len(lines) == 2:
        lines += ["No phase diagram or T-sweep applies to this grid.", ""]
    return lines


# ---------------------------------------------------------------------------- phase diagram


@dataclass(frozen=True)
class Trend:
    """The seed-mean test error against T at one alpha.

    first, best, last : (T, mean, stderr) at the smallest T, the minimum and the largest
                        T among the temperatures with a converged mean
    kind              : "helps" (falls with T), "optimum" (falls, then rises), "hurts"
                        (rises with T), "peak" (rises, then falls back) or "flat" (no
                        change that passes its t test)
    text              : the change in words, with its paired t statistic and threshold
    """

    first: tuple[float, float, float]
    best: tuple[float, float, float]
    last: tuple[float, float, float]
    kind: str
    text: str


_TREND_ENDS = (
    "smallest and largest T are the extreme temperatures where at least half as many seeds"
    " converged as at the best-covered T (2 or more)"
)
"""What a trend table's smallest and largest T are (`analysis.aggregate.compared_T`)."""


def _trend_cells(trend: Trend) -> list[str]:
    """The table cells "mean ± stderr (T = ...)" at a trend's smallest T, lowest mean and
    largest T."""
    return [
        f"{_pm(*pt[1:])} (T = {pow2_text(pt[0])})" for pt in (trend.first, trend.best, trend.last)
    ]


def error_trend(T: np.ndarray, values: np.ndarray) -> Trend | None:
    """Classify the test error ``values[T, seed]`` (NaN where a cell did not converge)
    against T; None when fewer than 2 T have a mean.

    The smallest T, the largest and the lowest mean are taken among the m temperatures
    of `analysis.aggregate.compared_T` (where at least half as many seeds converged as at
    the best-covered T): near an edge of stability the few seeds that still train pair
    with little. Changes are paired by seed (`paired_change`): smallest T -> largest T
    at 5 %; smallest T -> lowest and lowest -> largest T are corrected for the m - 1
    other T the lowest was picked among. "optimum" needs both of those, "helps" the first
    (or a significant fall to the largest T), "hurts" a significant rise to the largest
    T. Where the ends do not differ, "peak" needs a significant rise from the smallest T to
    the highest mean strictly between the ends and a significant fall from it to the
    largest T (both corrected for the m - 2 inner T it was picked among). With fewer than
    2 seeds converged at both ends of a change it does not count."""
    values = np.asarray(values, dtype=float)
    stats = mean_stderr(xr.DataArray(values, dims=("T", "seed")))
    mean, stderr = stats["mean"].values, stats["stderr"].values
    compared = compared_T(values)  # every T with a mean where fewer qualify
    if len(compared) < 2:
        return None
    i0, il = int(compared[0]), int(compared[-1])
    ib = int(compared[np.argmin(mean[compared])])
    point = {i: (float(T[i]), float(mean[i]), float(stderr[i])) for i in (i0, ib, il)}
    picked = max(len(compared) - 1, 1)

    def change(i: int, j: int, comparisons: int = 1) -> tuple[Change, str]:
        """The paired change from T[i] to T[j], and in words."""
        c = paired_change(values, i, j, comparisons)
        if c.n == 0:
            return c, f"no seed converged at both T = {pow2_text(T[i])} and {pow2_text(T[j])}"
        size = c.text() if c.n >= 2 else "1 seed at both: not judged"
        words = f"{'rises' if c.diff > 0 else 'falls'} by {abs(c.diff):.3f} ({size})"
        return c, f"{words} from T = {pow2_text(T[i])} to {pow2_text(T[j])}"

    fall, fall_text = change(i0, ib, picked)
    rise, rise_text = change(ib, il, picked)
    fell = ib != i0 and fall.diff < 0 and fall.counts
    if fell and il != ib and rise.diff > 0 and rise.counts:
        best = pow2_text(T[ib])
        kind, text = "optimum", f"{fall_text}, then {rise_text}: lowest on the grid at T = {best}"
    elif fell:
        kind, text = "helps", f"{fall_text}: noise helps"
    else:
        c, words = change(i0, il)
        if c.diff > 0 and c.counts:
            kind, text = "hurts", f"{words}: noise hurts"
        elif c.counts:  # a fall to the largest T, where the lowest mean is noisy
            kind, text = "helps", f"{words}: noise helps"
        else:
            kind, text = "flat", f"{words}: no significant change"
            inner = compared[1:-1]
            if len(inner):
                ih = int(inner[np.argmax(mean[inner])])
                up, up_text = change(i0, ih, len(inner))
                down, down_text = change(ih, il, len(inner))
                if up.diff > 0 and up.counts and down.diff < 0 and down.counts:
                    top = pow2_text(T[ih])
                    kind = "peak"
                    text = f"{up_text}, then {down_text}: highest on the grid at T = {top}"
    return Trend(point[i0], point[ib], point[il], kind, text)


def phase_reading(ds: xr.Dataset) -> list[str]:
    """Per P: a table over alpha (trend of the test error with T, weight change,
    diverged cells), the best cell, and smallest against largest alpha."""
    per_seed = masked(ds, "test_error").compute()
    err = mean_stderr(per_seed)
    rel = seed_mean(ds, "rel_change").compute()
    flag = effective_outcome(ds).compute()
    T = ds["T"].values
    lines = []
    for P in ds["P"].values:
        e, r, f = err.sel(P=P), rel.sel(P=P), flag.sel(P=P)
        v = per_seed.sel(P=P)
        rows, trends = [], {}
        for alpha in ds["alpha"].values:
            trend = error_trend(T, v.sel(alpha=alpha).transpose("T", "seed").values)
            trends[float(alpha)] = trend
            rows.append(_phase_row(float(alpha), trend, r.sel(alpha=alpha), f.sel(alpha=alpha)))
        lines += [
            f"Phase diagram at P = {int(P)}: seed means ± stderr; {_TREND_ENDS}; the relative"
            " weight change ||w - w0|| / ||w0|| is at the smallest.",
            "",
        ]
        lines += _table(
            ["alpha", "rel. change", "test error at smallest T", "lowest"]
            + ["at largest T", "test error against T", "diverged / unfinished"],
            rows,
        )
        lines += _phase_summary(e, r, trends, v)
    return lines


def ntk_reading(er: ExperimentReport) -> list[str]:
    """Where the NTK change is 1 (the lazy / feature-learning boundary alpha*) at the
    smallest and the largest T where it is found, the boundary's slope alpha* ~ T^s and
    its P exponent alpha* ~ P^k where fitted, from the report's results; nothing where
    the sweep did not measure the NTK change."""
    lines = []
    for P, table in er.results.get("ntk_boundary", {}).items():
        ok = np.flatnonzero(np.isfinite(table["alpha_star"].values))
        if not len(ok):
            lines.append(
                f"- NTK change at P = {P}: does not cross {table.attrs['level']:g} inside the"
                f" alpha grid at any T{_ntk_span(er, P)}."
            )
            continue
        parts = []
        for j in dict.fromkeys((int(ok[0]), int(ok[-1]))):
            T, a = table["T"].values[j], table["alpha_star"].values[j]
            lo, hi = table["alpha_star_low"].values[j], table["alpha_star_high"].values[j]
            interval = _log2_interval(lo, hi, table.attrs["ci"])
            parts.append(f"alpha* = 2^{math.log2(a):.1f}{interval} at T = {pow2_text(T)}")
        slope = er.results.get("ntk_boundary_T_fits", {}).get(P)
        if slope is not None:
            parts.append(f"alpha* ~ T^s with s = {slope['s']} ({slope.n_points} T)")
        lines.append(
            f"- Lazy / feature-learning boundary at P = {P} (seed-mean NTK change ="
            f" {table.attrs['level']:g}; found at {len(ok)} of {table.sizes['T']} T):"
            f" {'; '.join(parts)}."
        )
    fits = er.results.get("ntk_boundary_fits", {})
    if fits:
        parts = [
            f"k = {fit['k']} at T = {pow2_text(T)} ({fit.n_points} P)" for T, fit in fits.items()
        ]
        lines.append(f"- The boundary against P, alpha* ~ P^k: {'; '.join(parts)}.")
    return lines + [""] * bool(lines)


def _log2_interval(lo: float, hi: float, ci: float) -> str:
    """ " (95 %: 2^a - 2^b)" for an interval in octaves; empty where it is not found."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    return f" ({ci * 100:g} %: 2^{math.log2(lo):.1f} - 2^{math.log2(hi):.1f})"


def _ntk_span(er: ExperimentReport, P: int) -> str:
    """The smallest and the largest seed-mean NTK change at P, and where (empty where
    the report has no data)."""
    data = getattr(er, "data", None)
    if data is None or "ntk_change" not in data:
        return ""
    mean = seed_mean(data, "ntk_change")["mean"].sel(P=P).compute()
    if not np.isfinite(mean.values).any():
        return ""

    def at(i: dict) -> str:
        cell = mean.isel(i)
        return (
            f"{float(cell):.3g} (alpha = {pow2_text(float(cell['alpha']))},"
            f" T = {pow2_text(float(cell['T']))})"
        )

    low, high = mean.argmin(...), mean.argmax(...)
    return f" (its seed mean runs from {at(low)} to {at(high)})"


def optimal_T_reading(er: ExperimentReport) -> list[str]:
    """Where the optimal temperature lies per alpha (interior or at an edge; "within
    noise" where its paired t tests do not resolve it) and the fit T_opt ~ alpha^k on the
    feature side, from the report's results."""
    table = er.results.get("optimal_T")
    if table is None:
        return []
    fits = er.results.get("optimal_T_fits", {})
    lines = []
    for P in table["P"].values:
        tab = table.sel(P=P)
        by_class: dict[str, list[str]] = {}
        for a, code, t, ok in zip(
            tab["alpha"].values,
            tab["where"].values,
            tab["T_opt"].values,
            tab["resolved"].values,
            strict=True,
        ):
            if code >= 0:
                noise = "" if ok else ", within noise"
                text = f"{pow2_text(a)} (T_opt = 2^{math.log2(t):.1f}{noise})"
                by_class.setdefault(CLASSES[int(code)], []).append(text)
        parts = [f"{name} at alpha = {', '.join(v)}" for name, v in by_class.items()]
        texts = []
        for key, classes in OPTIMUM_FITS.items():
            fit = fits.get(int(P), {}).get(key)
            texts.append(
                optimum_fit_text(key, fit, tab)
                if fit is not None
                else f"T_opt ~ alpha^k ({key}) not fitted: fewer than 3 alphas <="
                f" {FEATURE_SIDE:g} with {' or '.join(classes)} optima"
            )
        fit_text = "; ".join(texts)
        lines.append(f"- Optimal temperature at P = {int(P)}: {'; '.join(parts)}. {fit_text}.")
        edges = er.results.get("T_div")
        if edges is not None and P in edges["P"].values:
            fit = er.results.get("T_div_fits", {}).get(int(P))
            edge_fit = (
                f" {divergence_fit_text(fit)}."
                if fit is not None
                else " T_div ~ alpha^k not"
                f" fitted: fewer than 3 alphas <= {FEATURE_SIDE:g} with a T_div."
            )
            lines.append(f"- {divergence_text(edges.sel(P=P))}{edge_fit}")
    return lines + [""]


def _phase_row(alpha: float, trend: Trend | None, rel: xr.Dataset, flag: xr.DataArray) -> list:
    rel_means = rel["mean"].values[np.isfinite(rel["mean"].values)]
    rel_text = f"{rel_means[0]:.3g}" if rel_means.size else "n/a"
    bad = []
    for T in flag["T"].values:
        seeds = flag.sel(T=T).values
        parts = [
            f"{int((seeds == code).sum())}/{seeds.size} {name}"
            for code, name in ((DIVERGED, "diverged"), (UNFINISHED, "unfinished"))
            if (seeds == code).any()
        ]
        if parts:
            bad.append(f"T = {pow2_text(T)}: {', '.join(parts)}")
    bad_text = "; ".join(bad) or "none"
    if trend is None:
        return [pow2_text(alpha), rel_text, "n/a", "n/a", "n/a", "under 2 T converged", bad_text]
    return [
        pow2_text(alpha),
        rel_text,
        *_trend_cells(trend),
        trend.text,
        bad_text,
    ]


def _phase_summary(
    err: xr.Dataset,
    rel: xr.Dataset,
    trends: Mapping[float, Trend | None],
    values: xr.DataArray,
) -> list:
    """Best cell, where noise helps / hurts, and smallest against largest alpha
    (``values``: the per-seed test error over alpha, T and seed at this P). The best cell
    is the lowest mean among each alpha's compared temperatures (`compared_T`, as its
    trend): a T where 1 of 12 seeds still trains is not ranked against the others."""
    mean = err["mean"]
    if not np.isfinite(mean.values).any():
        return ["No cell converged at this P.", ""]
    ranked = xr.zeros_like(mean, dtype=bool)
    for alpha in mean["alpha"].values:  # each row's compared T, as its trend reads them
        row = values.sel(alpha=alpha).transpose("T", "seed").values
        ranked.loc[{"alpha": alpha}] = np.isin(np.arange(row.shape[0]), compared_T(row))
    several = bool(ranked.sum() < np.isfinite(mean.values).sum())  # thin cells left out
    best = mean.where(ranked, np.inf).argmin(...)
    cell = {d: float(mean[d].values[i]) for d, i in best.items()}
    at = err.isel(best)
    n = int(at["n"])
    lines = [
        f"- Lowest test error {_pm(float(at['mean']), float(at['stderr']))}"
        f" ({n} seed{'s' if n > 1 else ''}) at alpha = {pow2_text(cell['alpha'])},"
        f" T = {pow2_text(cell['T'])}"
        + (" (among the T each alpha's trend compares)." if several else ".")
    ]
    for kind, words in (
        ("helps", "Noise helps (error falls with T)"),
        ("optimum", "The error has an optimum T"),
        ("hurts", "Noise hurts (error rises with T)"),
        ("peak", "The error peaks at an inner T and falls back"),
        ("flat", "No significant change with T"),
    ):
        where = [pow2_text(a) for a, t in trends.items() if t is not None and t.kind == kind]
        if where:
            lines.append(f"- {words} at alpha = {', '.join(where)}.")
    lines += _feature_vs_lazy(trends, rel, values)
    return lines + [""]


def _feature_vs_lazy(
    trends: Mapping[float, Trend | None], rel: xr.Dataset, values: xr.DataArray
) -> list[str]:
    """Smallest alpha (feature side) against largest (lazy side): best error, the
    relative weight change at the smallest T, and the difference of the best errors
    paired by seed (``values``: per-seed test error over alpha, T, seed at this P)."""
    known = {a: t for a, t in trends.items() if t is not None}
    if len(known) < 2:
        return []
    lo, hi = min(known), max(known)
    (T_lo, e_lo, s_lo), (T_hi, e_hi, s_hi) = known[lo].best, known[hi].best
    pair = np.stack([values.sel(alpha=a, T=T).values for a, T in ((lo, T_lo), (hi, T_hi))])
    c = paired_change(pair, 0, 1)
    diff = e_hi - e_lo
    size = ""
    if c.n >= 2:
        size = f", {c.text()}" if math.isinf(c.t) else f", paired t = {c.t:.1f} over {c.n} seeds"
    # feature side and lazy side only where the alphas straddle 1 (science.md: feature
    # learning for alpha << 1, lazy for alpha >> 1)
    if lo < 1 < hi:
        side = ("feature side", "lazy side")
        first = f"Feature side (smallest alpha = {pow2_text(lo)}, rel. change"
        second = f"lazy side (largest alpha = {pow2_text(hi)}, rel. change"
    else:
        side = ("smallest alpha", "largest alpha")
        first = f"Smallest alpha = {pow2_text(lo)} (rel. change"
        second = f"largest alpha = {pow2_text(hi)} (rel. change"
    better = f"{side[0]} lower" if diff > 0 else f"{side[1]} lower" if diff < 0 else "equal"

    def rel_at(a: float) -> str:
        v = rel["mean"].sel(alpha=a).values
        v = v[np.isfinite(v)]
        return f"{v[0]:.3g}" if v.size else "n/a"

    return [
        f"- {first} {rel_at(lo)} at its smallest T): best {_pm(e_lo, s_lo)} at T ="
        f" {pow2_text(T_lo)}; {second} {rel_at(hi)}): best {_pm(e_hi, s_hi)} at T ="
        f" {pow2_text(T_hi)}; {better} by {abs(diff):.3f}{size}."
    ]


# ---------------------------------------------------------------------------- T-sweep

_LAWS = {"delta": "rel. change ~ T^delta P^gamma", "gamma": "rel. change ~ T^delta P^gamma"}
_LAWS |= {"c": "t* ~ T^c P^b", "b": "t* ~ T^c P^b"}


def tsweep_reading(er: ExperimentReport) -> list[str]:
    """Table of delta, gamma, c, b, a (both T_c definitions) from the report's fits, and
    the check a = gamma/delta."""
    res = er.results
    fits, crossover_fits = res.get("fits", {}), res.get("crossover_fits", {})
    tables, checks = res.get("crossover_tables", {}), res.get("ratio_checks", {})
    alpha = float(er.data["alpha"].max()) if "alpha" in er.data.coords else math.nan
    rows = []
    for var, symbols in (("rel_change", ("delta", "gamma")), ("t_star", ("c", "b"))):
        fit = fits.get(var)
        for sym in symbols:
            if fit is None:
                rows.append([sym, _LAWS[sym], "not fitted (see the report)", "", ""])
            else:
                rows.append([sym, _LAWS[sym], _est(fit[sym]), fit.n_points, f"{fit.chi2_red:.2f}"])
    for key, table in tables.items():
        cf = crossover_fits.get(key)
        found = int(np.isfinite(table["T_c"].values).sum())
        law = f"T_c ~ P^-a, T_c {table.attrs.get('short_name', key)}"
        value = _est(cf.a) if cf else f"not fitted (T_c found for {found} of {table.sizes['P']} P)"
        rows.append([f"a ({key})", law, value, cf.fit.n_points if cf else found, ""])
    for key, why in res.get("crossover_skipped", {}).items():
        rows.append([f"a ({key})", "T_c ~ P^-a", f"not measured: {why}", 0, ""])
    if "rel_change" in fits:
        gd = ratio(fits["rel_change"], "gamma", "delta")
        rows.append(["gamma/delta", "from the rel. change fit", _est(gd), "", ""])
    lazy = res.get("lazy", "taken as the lazy regime")  # the report's `_lazy_text`
    lines = [f"T-sweep at the largest alpha = {pow2_text(alpha)}, {lazy}:", ""]
    lines += _table(["exponent", "law", "value ± error", "points", "chi2_red"], rows)
    for key, check in checks.items():
        word = "consistent" if check.consistent else "inconsistent"
        lines.append(
            f"- a ({key}) = {_est(check.a)} against gamma/delta = {_est(check.ratio)}:"
            f" z = {check.z:.2f} with the {'paired' if check.paired else 'independent'}"
            f" error {check.error:.3f}, {word} (|z| < {check.threshold:.2f})."
        )
    if not checks:
        lines.append("- a = gamma/delta not checked: a fit it needs is missing (see the report).")
    return lines + [""] + _tsweep_error_table(er.data, tables.get("b"))


def _tsweep_error_table(ds: xr.Dataset, crossover: xr.Dataset | None) -> list[str]:
    """Per P at the largest alpha: the test error against T (`error_trend`, paired by
    seed) and T_c (b) with the direction the error takes past it."""
    sel = at_alpha(ds)
    values = masked(sel, "test_error").transpose("P", "T", "seed").compute()
    T = values["T"].values
    rows = []
    for j, P in enumerate(values["P"].values):
        trend = error_trend(T, values.values[j])
        if trend is None:
            rows.append([int(P), "n/a", "n/a", "n/a", "under 2 T converged", "n/a"])
            continue
        tc = "not measured"
        if crossover is not None:
            T_c, lo, hi = (float(crossover[v].sel(P=P)) for v in ("T_c", "T_c_low", "T_c_high"))
            if bool(crossover["below_grid"].sel(P=P)):
                tc = "below the grid"
            elif math.isfinite(T_c):
                span = _log2_interval(lo, hi, crossover.attrs["ci"])
                word = DIRECTION[int(crossover["direction"].sel(P=P))]
                tc = f"2^{math.log2(T_c):.1f}{span}, {word} past it"
            else:
                tc = "not reached on the grid"
        rows.append([int(P), *_trend_cells(trend), trend.text, tc])
    lines = [
        f"Test error against T at alpha = {pow2_text(float(sel['alpha']))}: seed means ±"
        f" stderr; {_TREND_ENDS}; T_c (b) where the seed mean departs from its plateau.",
        "",
    ]
    return lines + _table(
        ["P", "test error at smallest T", "lowest", "at largest T", "test error against T"]
        + ["T_c (b)"],
        rows,
    )


# ---------------------------------------------------------------------------- perceptron


def verdict(fitted: float, error: float, predicted: float, tolerance: float = TOLERANCE) -> str:
    """ "agrees within 0.05" when |fitted - predicted| <= tolerance, else "agrees within 1
    sigma" when it is <= error, else "differs by X sigma" (error = standard error)."""
    if not math.isfinite(fitted):
        return "no estimate"
    diff = abs(fitted - predicted)
    if diff <= tolerance:
        return f"agrees within {tolerance:g}"
    if not (math.isfinite(error) and error > 0):
        return f"differs by {diff:.3f} (no error estimate)"
    if diff <= error:
        return "agrees within 1 sigma"
    return f"differs by {diff / error:.1f} sigma"


def perceptron_rows(reports: Mapping[str, ExperimentReport]) -> tuple[list[str], list[list]]:
    """One row per perceptron group, sorted by (chi, d): the signal's P-exponent (global
    fit and local, between successive P) and the local exponent of s / n at the largest P
    pair against 1/(1+chi), the noise's against 0."""
    pairs = sorted(
        {pair for er in reports.values() for pair in _local(er)}, key=lambda p: (p[0], p[1])
    )
    header = ["group", "chi", "d", "seeds", "1/(1+chi)", "signal P-exp. (fit)", "verdict"]
    header += [f"local {lo}-{hi}" for lo, hi in pairs]
    header += ["verdict (largest P pair)", "s / n, largest P pair", "verdict"]
    header += ["noise P-exp. (pred. 0)", "verdict"]
    rows = []
    for name, er in sorted(
        reports.items(), key=lambda kv: (kv[1].data.attrs.get("chi"), kv[1].data.attrs.get("d"))
    ):
        chi = float(er.data.attrs.get("chi", math.nan))
        predicted = 1.0 / (1.0 + chi)
        fit = _exponent(er, "signal")
        noise = _exponent(er, "noise")
        local = _local(er)
        last = local[max(local)] if local else (math.nan, math.nan)
        snr = _local(er, "snr")
        snr_last = snr[max(snr)] if snr else (math.nan, math.nan)
        rows.append(
            [f"`{name}`", f"{chi:g}", er.data.attrs.get("d"), er.data.sizes.get("seed")]
            + [f"{predicted:.4f}", _pm(*fit, 3), verdict(*fit, predicted)]
            + [_pm(*local[pair], 3) if pair in local else "—" for pair in pairs]
            + [verdict(*last, predicted), _pm(*snr_last, 3), verdict(*snr_last, predicted)]
            + [_pm(*noise, 3), verdict(*noise, 0.0)]
        )
    return header, rows


def _exponent(er: ExperimentReport, quantity: str) -> tuple[float, float]:
    """(fitted, error) of the P-exponent of ``quantity`` from the report's exponent table."""
    for row in er.results.get("exponent_table", []):
        if row["quantity"] == quantity and row["variable"] == "P":
            return float(row["fitted"]), float(row["stderr"])
    return math.nan, math.nan


def _local(
    er: ExperimentReport, quantity: str = "signal"
) -> dict[tuple[int, int], tuple[float, float]]:
    """{(P_lo, P_hi): (exponent, stderr)} of the local P-exponents of ``quantity``
    ("signal" or "snr")."""
    local = er.results.get(f"local_{quantity}")
    return {} if local is None else local_exponent_map(local)


def perceptron_reading(reports: Mapping[str, ExperimentReport]) -> list[str]:
    header, rows = perceptron_rows(reports)
    return [
        "Signal (w - w0) . e1 ~ T P^gamma with predicted gamma = 1/(1+chi); noise"
        " ||(w - w0)_perp|| / sqrt(d - 1) predicted independent of P. Fits over every T and P"
        " at the largest alpha; local exponents: slopes between successive P, weighted mean"
        " over T. The scaling argument balances the signal against the noise, so it"
        " predicts s / n ~ P^(1/(1+chi)) directly; the signal follows only where the noise"
        " is flat in P.",
        "",
        *_table(header, rows),
    ]


# ---------------------------------------------------------------------------- formatting


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
        "",
    ]


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _pm(value: float, error: float, digits: int = 4) -> str:
    if not math.isfinite(value):
        return "n/a"
    text = f"{value:.{digits}f}"
    return text + (f" ± {error:.{digits}f}" if math.isfinite(error) else "")


def _est(e: Estimate) -> str:
    return _pm(e.value, e.error, 3)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s} s"
    return f"{minutes // 60} h {minutes % 60} min"
