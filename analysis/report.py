"""``report.md`` and figures for every experiment of a cube.

What applies to an experiment follows from its grid:

- several alpha and several T: phase diagrams (test error, rel_change, t*, and the NTK
  change where the sweep measured it) for each P;
  with 3 T or more, the optimal temperature T_opt(alpha) (`analysis.optimal`) and the fit
  T_opt ~ alpha^k over the interior optima on the feature side (alpha <= 1);
- several T and several P: temperature sweeps, the fits of rel_change ~ T^delta P^gamma
  and t* ~ T^c P^b (default "lazy" range, see `analysis.fits`), T_c(P) by both
  definitions of `analysis.crossover`, the fits T_c ~ P^-a and the check a = gamma/delta;
- perceptron groups: signal, noise and t* figures, fitted against predicted exponents,
  local P-exponents, and a summary across chi;
- checkpoints with values: the dynamics at the largest alpha for each P.

A step that cannot be done (one P, every cell diverged, ...) is skipped and the reason
is written in report.md; the report never stops at one experiment's failure.
"""

from __future__ import annotations

import functools
import math
import re
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from analysis import plots
from analysis.aggregate import at_alpha, masked, outcome_counts
from analysis.crossover import (
    DIRECTION,
    check_ratio,
    crossover_rel_change,
    crossover_test_error,
    fit_crossover,
)
from analysis.fits import InsufficientData, PowerLawFit, fit_rel_change, fit_t_star
from analysis.load import CubeError, Store, open_cube
from analysis.optimal import CLASSES, fit_optimal_temperature, optimal_temperature
from analysis.perceptron import (
    exponent_table,
    fit_perceptron,
    is_perceptron,
    local_exponent_map,
    local_exponent_pairs,
    local_P_exponents,
)
from analysis.regimes import fit_ntk_boundary, lazy_side, ntk_boundary
from analysis.stability import divergence_temperature, fit_divergence_temperature
from ensemble.provenance import git_commit
from ensemble.schema import CHECKPOINT_VARS, LAUNCHES_ATTR, OUTCOME_FLAGS, launch_end
from ensemble.spec import setting_applies


@functools.cache
def analysis_commit() -> str:
    """The git commit of the ``analysis`` package writing a report ("+dirty" when its
    files differ from it), named in every report's and reproduction page's header so
    that a page written before an analysis fix can be told apart."""
    return git_commit(Path(__file__).parent)


class _Section:
    """Markdown lines of one experiment, and the figures written for it."""

    def __init__(self, out_dir: Path, name: str, formats: Sequence[str]) -> None:
        self.out_dir = out_dir
        self.formats = tuple(formats)
        self.stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        self.lines: list[str] = []
        self.figures: list[Path] = []
        self.results: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}  # what -> why, for the steps `attempt` skipped

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def figure(self, fig, suffix: str, caption: str) -> None:
        paths = plots.save_figure(
            fig, self.out_dir / "figures", f"{self.stem}_{suffix}", self.formats
        )
        self.figures += paths
        rel = [p.relative_to(self.out_dir).as_posix() for p in paths]
        others = ", ".join(
            f"[{p.suffix[1:].upper()}]({r})" for p, r in zip(paths[1:], rel[1:], strict=True)
        )
        self.add(
            f"![{caption}]({rel[0]})", "", f"*{caption}*" + (f" ({others})" if others else ""), ""
        )

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        """A markdown table followed by a blank line."""
        self.add("| " + " | ".join(header) + " |", "|---" * len(header) + "|")
        self.add(*("| " + " | ".join(str(c) for c in row) + " |" for row in rows), "")

    def attempt(self, what: str, step: Callable[[], Any]) -> Any:
        """Run ``step``; on failure write why ``what`` was skipped and return None."""
        try:
            return step()
        except InsufficientData as err:
            self.skipped[what] = str(err)
            self.add(f"- {what} skipped: {err}", "")
        except Exception as err:  # noqa: BLE001 -- one failed step must not stop the report
            warnings.warn(f"{what} failed: {traceback.format_exc()}", RuntimeWarning, stacklevel=2)
            self.add(f"- {what} failed: {type(err).__name__}: {err}", "")
        return None


@dataclass
class ExperimentReport:
    """What the report computed for one experiment group.

    data    : the group, loaded in memory
    figures : every figure file written for it (all formats)
    results : the numbers behind its tables, by key: ``fits`` ({"rel_change", "t_star"}:
              PowerLawFit), ``crossover_tables`` / ``crossover_fits`` / ``ratio_checks``
              (by T_c definition "a", "b"), ``crossover_skipped`` (by T_c definition:
              why it was not measured), ``perceptron_fits``, ``exponent_table``
              (`analysis.perceptron.exponent_table` rows), ``local_signal``
              (`analysis.perceptron.local_P_exponents`), ``ntk_boundary`` (by P: the
              `analysis.regimes.ntk_boundary` table over T), ``ntk_boundary_T_fits`` (by
              P: alpha* ~ T^s), ``ntk_boundary_fits`` (by T: alpha* ~ P^k); a key is
              absent when its step was skipped
    """

    data: xr.Dataset
    figures: list[Path] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """A written report: report.md, its experiments and the cross-experiment figures."""

    path: Path
    experiments: dict[str, ExperimentReport]
    summary_figures: list[Path] = field(default_factory=list)


def write_report(
    store: Store,
    out_dir: str | Path,
    *,
    experiments: Sequence[str] | None = None,
    n_boot: int = 200,
    seed: int = 0,
    formats: Sequence[str] = ("png", "svg"),
) -> Path:
    """Write figures (under ``out_dir/figures``) and ``out_dir/report.md``.

    experiments : the groups to report, in this order (default: every group)
    n_boot      : bootstrap resamples of the seeds for the uncertainties of fits and T_c
    seed        : seed of the bootstrap Generator
    formats     : figure file formats (matplotlib names); report.md shows the first
    Returns the path of report.md (`build_report` also returns the computed numbers).
    """
    return build_report(
        store, out_dir, experiments=experiments, n_boot=n_boot, seed=seed, formats=formats
    ).path


def check_formats(formats: Sequence[str]) -> None:
    """Raise ValueError unless ``formats`` is a non-empty list of matplotlib file formats."""
    from matplotlib.backend_bases import FigureCanvasBase

    supported = FigureCanvasBase.get_supported_filetypes()
    bad = [f for f in formats if f not in supported]
    if bad or not formats:
        raise ValueError(
            f"formats must be matplotlib file formats ({', '.join(sorted(supported))}),"
            f" got {list(formats)}"
        )


def select_experiments(
    cube: dict[str, xr.Dataset], experiments: Sequence[str] | None, store: Store
) -> dict[str, xr.Dataset]:
    """The groups named in ``experiments`` (in that order; all when None); raises
    CubeError naming the unknown ones and the groups the store has."""
    if experiments is None:
        return cube
    unknown = [name for name in experiments if name not in cube]
    if unknown or not experiments:
        raise CubeError(
            f"experiments {unknown or list(experiments)} are not groups of the cube {store!s};"
            f" it has {list(cube)}"
        )
    return {name: cube[name] for name in experiments}


def build_report(
    store: Store,
    out_dir: str | Path,
    *,
    experiments: Sequence[str] | None = None,
    n_boot: int = 200,
    seed: int = 0,
    formats: Sequence[str] = ("png", "svg"),
) -> Report:
    """`write_report`, returning the `Report` (the numbers and figures of each group)."""
    check_formats(formats)
    cube = select_experiments(open_cube(store), experiments, store)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Analysis report: `{store}`",
        "",
        f"Written {datetime.now(timezone.utc).isoformat(timespec='seconds')} by `python -m"
        f" analysis report` (analysis code {analysis_commit()}); {len(cube)} experiment(s):"
        f" {', '.join(f'`{n}`' for n in cube)}.",
        "",
        "Conventions: seed means over converged cells only (missing, diverged and"
        " unfinished cells never enter); errors are standard errors of the seed mean;"
        " fits are least squares in log space, each point weighted by one relative seed"
        " spread pooled over the fit's points (s / sqrt(n) for n seeds), with the lstsq"
        f" error and a bootstrap over seeds ({n_boot} resamples, seed {seed}); `±` gives the"
        " larger. T-sweep exponent fits use the lazy range (largest alpha; for each P the T"
        " up to the test-error crossover T_c^(b)(P)); the perceptron's use every T and P."
        " T_c: (a) T where ||w - w0||/||w0|| reaches a"
        " level (geometric mean of the data), (b) T where the test error departs by 10 % from"
        " its small-T plateau; both interpolated in log T, with 95 % t intervals (bootstrap"
        " errors over seeds).",
        "",
    ]
    perceptron_rows: list[dict[str, object]] = []
    report = Report(out_dir / "report.md", {})
    for name, lazy in cube.items():
        # A group is a few MB at most: read it once, then every fit and figure works in
        # memory instead of re-reading the store through dask.
        ds = lazy.load()
        section = _Section(out_dir, name, formats)
        section.add(f"## {name}", "")
        _experiment(section, ds, n_boot, seed, perceptron_rows)
        lines += section.lines
        report.experiments[name] = ExperimentReport(ds, section.figures, section.results)
    n_perceptron = sum(is_perceptron(ds) for ds in cube.values())
    if perceptron_rows and n_perceptron >= 2:
        section = _Section(out_dir, "perceptron", formats)
        section.add("## Perceptron across chi", "")
        section.attempt(
            "perceptron summary figure",
            lambda: section.figure(
                plots.perceptron_summary(perceptron_rows),
                "summary",
                "fitted P-exponents of the signal and of t* against chi, with the predictions",
            ),
        )
        finite_d = _finite_d_rows(report)
        if len({(r["chi"], r["d"]) for r in finite_d}) > len({r["chi"] for r in finite_d}):
            section.attempt(
                "finite-d figure",
                lambda: section.figure(
                    plots.perceptron_finite_d(finite_d),
                    "finite_d",
                    "local P-exponents of s and s / n at the largest P pair against d",
                ),
            )
        lines += section.lines
        report.summary_figures = section.figures
    report.path.write_text("\n".join(lines) + "\n")
    return report


FEATURE_SIDE = 1.0
"""T_opt ~ alpha^k is fitted over alpha <= FEATURE_SIDE (the feature-learning side; lazy
when alpha >> 1)."""
OPTIMUM_FITS = {
    "interior": ("interior",),
    "best trainable T": ("interior", "stability edge"),
}
"""The fits of T_opt ~ alpha^k: over the true optima, and over the optima together with
the stability edges (where the error falls with T until training diverges)."""


def _ntk_table(section: _Section, P: int, boundary: xr.Dataset) -> None:
    """The `ntk_boundary` table at one P, with the fit alpha* ~ T^s where 3 T or more
    have alpha*; results ``ntk_boundary`` and ``ntk_boundary_T_fits`` (by P)."""
    table = boundary.sel(P=P)
    section.results.setdefault("ntk_boundary", {})[P] = table
    level = table.attrs["level"]
    section.add(
        f"Lazy / feature-learning boundary at P = {P}: alpha* where the seed-mean NTK change"
        f" is {level:g} (from the largest alpha down, interpolated in log-log;"
        f" {table.attrs['ci'] * 100:g} % t interval from a bootstrap over seeds; n/a where the"
        " change is on one side of the level across the grid).",
        "",
    )
    rows = []
    for j, T in enumerate(table["T"].values):
        a, lo, hi = (
            table[k].values[j] for k in ("alpha_star", "alpha_star_low", "alpha_star_high")
        )
        rows.append(
            [plots.pow2_text(T), f"{a:.3g} (2^{np.log2(a):.2f})" if np.isfinite(a) else "n/a"]
            + [f"{lo:.3g} - {hi:.3g}" if np.isfinite(lo) else "n/a"]
        )
    section.table(["T", "alpha*", f"{table.attrs['ci'] * 100:g} % interval"], rows)
    if table.sizes["T"] < 3:
        return
    fit = section.attempt(f"fit alpha* ~ T^s at P = {P}", lambda: fit_ntk_boundary(boundary, P=P))
    if fit is not None:
        section.results.setdefault("ntk_boundary_T_fits", {})[P] = fit
        section.add(
            f"The boundary line at P = {P}: alpha* ~ T^s with s = {fit['s']} over the"
            f" {fit.n_points} T with alpha* (weighted by its bootstrap error;"
            f" chi2_red {fit.chi2_red:.2f}).",
            "",
        )


def _ntk_scaling(section: _Section, table: xr.Dataset) -> None:
    """alpha*(P) ~ P^k at each T of an `ntk_boundary` table over several P: a table, the
    fits (results ``ntk_boundary_fits``, by T) and a figure."""
    fits: dict[float, PowerLawFit | None] = {}
    for T in table["T"].values:
        fits[float(T)] = section.attempt(
            f"fit alpha* ~ P^k at T = {plots.pow2_text(T)}",
            lambda T=T: fit_ntk_boundary(table, T=float(T)),
        )
    section.results["ntk_boundary_fits"] = {T: f for T, f in fits.items() if f is not None}
    P = table["P"].values
    section.add(
        f"Lazy / feature-learning boundary against P: alpha* (NTK change ="
        f" {table.attrs['level']:g}) at each P and the fit alpha* ~ P^k weighted by its"
        " bootstrap error (n/a: fewer than 3 P with alpha*).",
        "",
    )
    rows = []
    for T, fit in fits.items():
        stars = table["alpha_star"].sel(T=T).values
        row = [plots.pow2_text(T)] + [
            f"2^{np.log2(a):.2f}" if np.isfinite(a) else "n/a" for a in stars
        ]
        if fit is None:
            row += ["n/a"] * 4
        else:
            k = fit["k"]
            row += [
                _num(k.value),
                _num(k.stderr),
                _num(k.stderr_boot),
                _num(fit.chi2_red, "{:.2f}"),
            ]
        rows.append(row)
    section.table(
        ["T"]
        + [f"alpha* at P = {int(p)}" for p in P]
        + ["k", "stderr (lstsq)", "stderr (bootstrap)", "chi2_red"],
        rows,
    )
    section.attempt(
        "NTK boundary against P figure",
        lambda: section.figure(
            plots.ntk_scaling_plot(table, fits),
            "ntk_scaling",
            f"alpha* where the NTK change is {table.attrs['level']:g} against P, one series"
            f" per T, with {table.attrs['ci'] * 100:g} % t intervals and the fits alpha* ~ P^k",
        ),
    )


def _optimal_T(section: _Section, ds: xr.Dataset, n_boot: int, seed: int) -> None:
    section.add("### Optimal temperature against alpha", "")
    table = section.attempt(
        "optimal temperature", lambda: optimal_temperature(ds, n_boot=n_boot, seed=seed)
    )
    if table is None:
        return
    section.results["optimal_T"] = table
    section.add(
        "T_opt: lowest seed-mean test error along T, refined by a parabola in log T through"
        " the grid minimum and its neighbours; interval: 68 % t interval of ln T_opt from a"
        " bootstrap over seeds (at a stability edge at least the grid step's spread). Class:"
        " interior (a true optimum), stability edge (the largest T that"
        " trains, the next one diverged), small-T edge (the smallest T: an upper bound),"
        " large-T edge (the largest T of the grid, or next to missing or unfinished cells:"
        " a lower bound). Paired t: the fall of the error from the smallest T to the minimum"
        " and its rise from there to the largest T, paired by seed, against Student's t at"
        " two-sided 5 % corrected for the T the minimum was picked among; a class is"
        " resolved where the changes that make it pass (interior: both); a fit through"
        " optima none of which is resolved is a guide only.",
        "",
    )
    edges = section.attempt("divergence temperature", lambda: divergence_temperature(ds))
    if edges is not None:
        section.results["T_div"] = edges
        section.results["T_div_fits"] = {}
    fits = {}
    for P in table["P"].values:
        tab = table.sel(P=P)
        rows = []
        for i, a in enumerate(tab["alpha"].values):
            code = int(tab["where"].values[i])
            if code < 0:
                rows.append([plots.pow2_text(a), "n/a", "", "no T trained", "", ""])
                continue
            lo, hi = tab["T_lo"].values[i], tab["T_hi"].values[i]
            t_opt = tab["T_opt"].values[i]
            resolved = "resolved" if tab["resolved"].values[i] else "within noise"
            rows.append(
                [plots.pow2_text(a), f"{t_opt:.3g} (2^{np.log2(t_opt):.2f})"]
                + [f"{lo:.3g} - {hi:.3g}" if np.isfinite(lo) else "n/a"]
                + [f"{CLASSES[code]}, {resolved}", _optimum_t_text(tab.isel(alpha=i))]
                + [
                    _num(tab["error_min"].values[i])
                    + " ± "
                    + _num(tab["error_min_stderr"].values[i])
                ]
            )
        section.add(f"P = {int(P)}:", "")
        head = ["alpha", "T_opt", "68 % interval", "class", "paired t: fall, rise"]
        section.table([*head, "lowest test error"], rows)
        fits[int(P)] = {}
        for key, classes in OPTIMUM_FITS.items():
            fit = section.attempt(
                f"T_opt ~ alpha^k ({key}) at P = {int(P)}",
                lambda P=P, c=classes: fit_optimal_temperature(
                    table, int(P), (None, FEATURE_SIDE), c
                ),
            )
            if fit is not None:
                fits[int(P)][key] = fit
                section.add(f"- {optimum_fit_text(key, fit, tab)}.", "")
        if edges is not None:
            section.add(f"- {divergence_text(edges.sel(P=P))}", "")
            fit = section.attempt(
                f"T_div ~ alpha^k at P = {int(P)}",
                lambda P=P: fit_divergence_temperature(edges, int(P), FEATURE_SIDE),
            )
            if fit is not None:
                section.results["T_div_fits"][int(P)] = fit
                section.add(f"- {divergence_fit_text(fit)}.", "")
        section.attempt(
            f"optimal-T figure at P = {int(P)}",
            lambda P=P: section.figure(
                plots.optimal_temperature_figure(
                    ds,
                    table,
                    fits[int(P)],
                    int(P),
                    edges=edges,
                    edge_fit=section.results.get("T_div_fits", {}).get(int(P)),
                ),
                f"optimal_T_P{int(P)}",
                f"test error along T and the optimal temperature against alpha at P = {P}",
            ),
        )
    section.results["optimal_T_fits"] = fits


def divergence_text(edges: xr.Dataset) -> str:
    """'Divergence temperature T_div (...): 2^-9.3 at alpha = 2^-8, ...' at one P."""
    parts = []
    for i, a in enumerate(edges["alpha"].values):
        T_div = float(edges["T_div"].values[i])
        if math.isfinite(T_div):
            parts.append(f"2^{np.log2(T_div):.2f} at alpha = {plots.pow2_text(a)}")
        elif edges["above_grid"].values[i]:
            parts.append(f"above the grid at alpha = {plots.pow2_text(a)}")
        elif edges["below_grid"].values[i]:
            parts.append(f"below the grid at alpha = {plots.pow2_text(a)}")
    return (
        "Divergence temperature T_div (where half the finished seeds diverged,"
        f" interpolated in log T): {'; '.join(parts) or 'no T with finished cells'}."
    )


def divergence_fit_text(fit: PowerLawFit) -> str:
    """The fit T_div ~ alpha^k in words."""
    return (
        f"T_div ~ alpha^k over the {fit.n_points} alphas <= {FEATURE_SIDE:g} with a T_div:"
        f" k = {fit['k']} (unweighted least squares in log-log, its error from the scatter"
        " about the line)"
    )


def optimum_fit_text(key: str, fit: PowerLawFit, tab: xr.Dataset) -> str:
    """The fit T_opt ~ alpha^k of `OPTIMUM_FITS` ``key`` in words, with how many of its
    optima are resolved (``tab``: the `optimal_temperature` table at the fit's P)."""
    classes = " or ".join(OPTIMUM_FITS[key])
    used = fit.used.values
    resolved = int((tab["resolved"].sel(alpha=fit.used["alpha"]).values & used).sum())
    return (
        f"T_opt ~ alpha^k over the {fit.n_points} alphas <= {FEATURE_SIDE:g} with {classes}"
        f" optima ({key}): k = {fit['k']} (chi2_red {fit.chi2_red:.2f}; {resolved} of the"
        f" {fit.n_points} optima resolved by their paired t tests)"
    )


def _optimum_t_text(cell: xr.Dataset) -> str:
    """'9.1 > 7.94, 5.2 > 7.94': the paired t of the fall to T_opt and of the rise after
    it against their thresholds ('-' where there is no such change, 'n < 2' where fewer
    than 2 seeds are paired, 'alike, sign test passes' or 'fails' where every seed
    changed by the same amount)."""

    def one(t: float, crit: float) -> str:
        if np.isnan(crit):
            return "-"
        if np.isinf(t):
            return f"alike, sign test {'passes' if t > crit else 'fails'}"
        if np.isinf(crit):
            return "n < 2"
        return f"{t:.1f} {'>' if t > crit else '<='} {crit:.2f}"

    fall = one(float(cell["t_fall"]), float(cell["t_fall_crit"]))
    rise = one(float(cell["t_rise"]), float(cell["t_rise_crit"]))
    return f"{fall}, {rise}"


def _finite_d_rows(report: Report) -> list[dict[str, object]]:
    """Largest-pair local P-exponents of the signal and of s / n of each perceptron group
    (rows for `plots.perceptron_finite_d`): the largest P pair with a finite mean; of groups
    with the same (chi, d), the one reaching the largest P."""
    best: dict[tuple, dict[str, object]] = {}
    for er in report.experiments.values():
        for q in ("signal", "snr"):
            local = er.results.get(f"local_{q}")
            if local is None or not is_perceptron(er.data):
                continue
            finite = [(p, v) for p, v in local_exponent_map(local).items() if math.isfinite(v[0])]
            if not finite:
                continue
            (lo, hi), (m, e) = max(finite)
            attrs = er.data.attrs
            key = (attrs.get("chi"), attrs.get("d"), q)
            if key not in best or hi > best[key]["P_hi"]:
                best[key] = {"chi": key[0], "d": key[1], "quantity": q}
                best[key] |= {"P_lo": lo, "P_hi": hi, "fitted": m, "stderr": e}
    return list(best.values())


def _experiment(
    section: _Section, ds: xr.Dataset, n_boot: int, seed: int, perceptron_rows: list
) -> None:
    section.add("### Settings", "")
    arch = str(ds.attrs.get("arch"))
    section.table(
        ["setting", "value"],
        [
            [k, _md(v)]
            for k, v in ds.attrs.items()
            if k != LAUNCHES_ATTR and setting_applies(k, arch)  # no FC d, no perceptron L
        ],
    )
    _launches(section, ds.attrs.get(LAUNCHES_ATTR))
    grid = {d: ds[d].values for d in ("alpha", "T", "P", "seed") if d in ds.dims}
    section.add("Grid: " + ", ".join(f"{d}: {len(v)} ({_span(v)})" for d, v in grid.items()), "")
    n_converged = section.attempt("outcome counts", lambda: _outcomes(section, ds))
    if n_converged == 0:
        section.add("- figures and fits skipped: no cell converged", "")
        return
    n = {d: len(v) for d, v in grid.items()}
    done_any = False
    if n.get("alpha", 1) >= 2 and n.get("T", 1) >= 2:
        done_any = True
        section.add("### Phase diagrams", "")
        boundary = (
            section.attempt("NTK boundary", lambda: ntk_boundary(ds, n_boot=n_boot, seed=seed))
            if "ntk_change" in ds
            else None
        )
        for P in grid["P"]:
            section.attempt(
                f"phase diagrams at P = {P}",
                lambda P=P: section.figure(
                    plots.phase_diagrams(
                        ds, int(P), boundary=None if boundary is None else boundary.sel(P=P)
                    ),
                    f"phase_P{int(P)}",
                    f"test error, relative weight change, t*"
                    f"{' and NTK change' if 'ntk_change' in ds else ''}"
                    f" over (alpha, T) at P = {P}",
                ),
            )
        for P in grid["P"] if boundary is not None else []:
            _ntk_table(section, int(P), boundary)
        if boundary is not None and n.get("P", 1) >= 3:
            _ntk_scaling(section, boundary)
        if n.get("T", 1) >= 3:
            _optimal_T(section, ds, n_boot, seed)
    if is_perceptron(ds):
        done_any = True
        _perceptron(section, ds, n_boot, seed, perceptron_rows)
    elif n.get("T", 1) >= 2 and n.get("P", 1) >= 2:
        done_any = True
        _tsweep(section, ds, n_boot, seed)
    elif n.get("T", 1) >= 2:
        P_grid = grid["P"].tolist()
        section.add(
            f"- T-sweep figure, fits and T_c(P) skipped: they need at least 2 P, P = {P_grid}", ""
        )
    if set(CHECKPOINT_VARS) <= set(ds.data_vars):
        section.attempt("dynamics", lambda: _dynamics(section, ds))
    if not done_any:
        section.add(f"- no phase diagram, T-sweep or perceptron figure applies to the grid {n}", "")


def _launches(section: _Section, records: Sequence[dict] | None) -> None:
    """Table of the launches that trained the group or had cells of it fail
    (``ensemble.schema.LAUNCHES_ATTR``)."""
    if not records:
        section.add(
            "Launches: none recorded (the cube predates launch records, or no launch has"
            " trained or lost a cell of it).",
            "",
        )
        return
    section.add("### Launches", "")
    section.table(
        ["started (UTC)", "command", "device", "workers", "cells trained", "cells failed"]
        + ["ended", "wall time (s)"],
        [
            [r.get("started", "?"), f"`{_md(r.get('command', '?'))}`", _md(r.get("device", "?"))]
            + [
                r.get("n_workers", "?"),
                r.get("cells_trained", "?"),
                r.get("cells_failed", "?"),
                launch_end(r),
                _num(r.get("wall_s"), "{:.1f}"),
            ]
            for r in records
        ],
    )


def _outcomes(section: _Section, ds: xr.Dataset) -> int:
    """Table of cells per outcome and P; returns the number of converged cells."""
    counts = outcome_counts(ds, dims=[d for d in ("alpha", "T", "seed") if d in ds.dims])
    counts = counts.transpose("P", "outcome").compute()
    names = list(OUTCOME_FLAGS.values())
    rows = [
        [P, *row, sum(row)]
        for P, row in zip(counts["P"].values, counts.values.tolist(), strict=True)
    ]
    total = counts.values.sum(axis=0).tolist()
    section.add("### Cells per outcome", "")
    section.table(["P", *names, "total"], [*rows, ["all", *total, sum(total)]])
    return int(total[names.index("converged")])


LAWS = {"rel_change": "T^delta P^gamma", "t_star": "T^c P^b"}


def _lazy_text(ds: xr.Dataset) -> str:
    """Whether the largest alpha is lazy, measured by its NTK change where the sweep has
    one (`analysis.regimes.lazy_side`), else taken as lazy (the laws' assumption)."""
    try:
        side = lazy_side(ds)
    except InsufficientData:
        return "taken as the lazy regime (no NTK change measured)"
    where = f"T = {plots.pow2_text(side.T)}, P = {side.P}"
    if side.lazy:
        return (
            f"lazy by the NTK change, below {side.level:g} in all {side.cells} (T, P) cells"
            f" (at most {side.largest:.3g}, at {where})"
        )
    return (
        f"not lazy at every T: its NTK change reaches {side.largest:.3g} at {where}"
        f" (the boundary's level is {side.level:g}), so the fits mix regimes"
    )


def _tsweep(section: _Section, ds: xr.Dataset, n_boot: int, seed: int) -> None:
    section.add("### Temperature sweeps and scaling laws", "")
    section.results["lazy"] = lazy = _lazy_text(ds)
    if "alpha" in ds.dims and ds.sizes["alpha"] > 1:
        alpha = float(at_alpha(ds)["alpha"])
        section.add(f"Fits and T-sweeps at the largest alpha = {alpha:g}: {lazy}.", "")
    fits: dict[str, PowerLawFit] = {}
    for var, fitter in (("rel_change", fit_rel_change), ("t_star", fit_t_star)):
        fit = section.attempt(f"fit of {var}", lambda f=fitter: f(ds, n_boot=n_boot, seed=seed))
        if fit is not None:
            fits[var] = fit
    section.results["fits"] = fits
    if fits:
        section.table(
            ["quantity", "law", "exponent", "value", "stderr (lstsq)", "stderr (bootstrap)"]
            + ["points", "chi2_red", "range"],
            [
                [var, LAWS[var], fit.symbols[v], _num(fit.exponents[v].value)]
                + [_num(fit.exponents[v].stderr), _num(fit.exponents[v].stderr_boot)]
                + [fit.n_points, _num(fit.chi2_red, "{:.2f}"), fit.range_note]
                for var, fit in fits.items()
                for v in fit.variables
            ],
        )
    tables, skipped = {}, {}
    for key, fn in (
        ("a", lambda: crossover_rel_change(ds, n_boot=n_boot, seed=seed)),
        ("b", lambda: crossover_test_error(ds, n_boot=n_boot, seed=seed)),
    ):
        table = section.attempt(what := f"T_c definition ({key})", fn)
        if table is not None:
            tables[key] = table
        elif what in section.skipped:
            skipped[key] = section.skipped[what]
    section.results["crossover_skipped"] = skipped
    crossover_fits = {}
    for key, table in tables.items():
        fit = section.attempt(
            f"fit T_c ~ P^-a, definition ({key})", lambda t=table: fit_crossover(t)
        )
        if fit is not None:
            crossover_fits[key] = fit
    section.results.update(crossover_tables=tables, crossover_fits=crossover_fits)
    if tables:
        _tc_table(section, tables)
    if crossover_fits:
        _a_table(section, crossover_fits, fits.get("rel_change"))
    a = _rescaling_exponent(crossover_fits, fits)
    crossover = tables.get("b", tables.get("a"))
    marks = {"b": "; triangles: T_c (b) of the test error", "a": "; triangles: T_c (a)"}
    caption = (
        "test error, rel_change and t* against T, one curve per P"
        f" (dashed: fits{marks['b' if 'b' in tables else 'a'] if tables else ''})"
    )
    if a is not None:
        caption += f"; second row: against T P^a with a = {a:.3f}"
    section.attempt(
        "temperature sweep figure",
        lambda: section.figure(
            plots.temperature_sweeps(ds, a=a, fits=fits, crossover=crossover), "tsweep", caption
        ),
    )
    if tables:
        section.attempt(
            "crossover figure",
            lambda: section.figure(
                plots.crossover_plot(
                    list(tables.values()), [crossover_fits.get(k) for k in tables]
                ),
                "crossover",
                "T_c against P with 95 % t intervals and the fits T_c ~ P^-a",
            ),
        )


def _a_table(section: _Section, crossover_fits: dict, rel_fit: PowerLawFit | None) -> None:
    rows = []
    section.results["ratio_checks"] = checks = {}
    for key, fit in crossover_fits.items():
        check = check_ratio(fit, rel_fit) if rel_fit is not None else None
        if check is not None:
            checks[key] = check
        row = [f"({key})", _num(fit.a.value), _num(fit.a.stderr), _num(fit.a.stderr_boot)]
        if check is None:
            row += ["n/a (no rel_change fit)", "n/a", "n/a", "n/a"]
        else:
            row += [str(check.ratio), _num(check.error), _num(check.z, "{:.2f}")]
            row += [f"{'yes' if check.consistent else 'no'} (abs z < {check.threshold:.2f})"]
        rows.append(row)
    section.table(
        ["T_c definition", "a", "stderr (lstsq)", "stderr (bootstrap)", "gamma/delta"]
        + ["err of a - gamma/delta", "z = (a - gamma/delta)/err", "consistent"],
        rows,
    )
    section.add(
        "err: the bootstrap spread of a - gamma/delta over the same seed resamples (both"
        " come from the same seeds) combined with each fit's misfit (its least-squares"
        " error beyond the seed noise, where chi2_red > 1), or the two errors combined as"
        " independent where the fits drew different resamples. Consistent: |z| under the"
        " two-sided 95 % quantile of Student's t with (seeds - 1) degrees of freedom."
    )
    if "a" in checks:
        section.add(
            "Definition (a) agrees with gamma/delta by construction wherever the weight"
            " change is a power law in T and P, so its row tests that form; (b), from the"
            " test error, is the independent test of a = gamma/delta."
        )


def _rescaling_exponent(crossover_fits: dict, fits: dict) -> float | None:
    """The a of the collapse T P^a: T_c (b)'s, else T_c (a)'s, the first that is resolved
    (|a| over twice its error), else gamma / delta; None where none is fitted."""
    for key in ("b", "a"):
        a = crossover_fits[key].a if key in crossover_fits else None
        if a is not None and math.isfinite(a.value) and abs(a.value) > 2 * a.error:
            return a.value
    if "rel_change" in fits:
        return fits["rel_change"]["gamma"].value / fits["rel_change"]["delta"].value
    return None


def _tc_table(section: _Section, tables: dict[str, xr.Dataset]) -> None:
    for key, table in tables.items():
        section.add(f"- T_c {table.attrs.get('definition', f'({key})')}.")
    section.add("")
    header = ["P"]
    for key, table in tables.items():
        header += [f"T_c ({key})", f"95 % interval ({key})"]
        header += [f"past T_c ({key}), the test error"] if "direction" in table else []
    rows = []
    for P in next(iter(tables.values()))["P"].values:
        row = [P]
        for table in tables.values():
            T_c, low, high = (float(table[v].sel(P=P)) for v in ("T_c", "T_c_low", "T_c_high"))
            below = "below_grid" in table and bool(table["below_grid"].sel(P=P))
            if math.isfinite(low) and math.isfinite(high):
                interval = f"[{low:.4g}, {high:.4g}]"
            elif math.isfinite(T_c) and table.attrs.get("n_boot"):
                found = int(table["n_boot_valid"].sel(P=P))
                interval = f"n/a (crossing in {found} of {table.attrs['n_boot']} resamples)"
            else:
                interval = "n/a"
            row += ["below the grid" if below else _num(T_c, "{:.4g}"), interval]
            if "direction" in table:
                row += [DIRECTION[int(table["direction"].sel(P=P))]]
        rows.append(row)
    section.table(header, rows)
    for key, table in tables.items():
        if "below_grid" in table and bool(table["below_grid"].any()):
            P = table["P"].values[table["below_grid"].values].tolist()
            section.add(
                f"T_c ({key}) is below the grid at P = {P}: the test error departs on the"
                " plateau points already, so these P are left out of the fit T_c ~ P^-a"
                " and of the lazy fit range; a grid reaching smaller T would place them."
            )


def _perceptron(section: _Section, ds: xr.Dataset, n_boot: int, seed: int, rows: list) -> None:
    chi = float(ds.attrs.get("chi", float("nan")))
    section.add(f"### Perceptron (chi = {chi:g}, d = {ds.attrs.get('d')})", "")
    fits = section.attempt("perceptron fits", lambda: fit_perceptron(ds, n_boot=n_boot, seed=seed))
    if fits:
        table = exponent_table(fits, chi)
        section.results.update(perceptron_fits=fits, exponent_table=table)
        section.table(
            ["quantity", "exponent of", "fitted", "±", "predicted", "z"],
            [
                [r["quantity"], r["variable"], _num(r["fitted"]), _num(r["stderr"])]
                + [_num(r["predicted"]), _num(r["z"], "{:.2f}")]
                for r in table
            ],
        )
        rows += [
            {"chi": chi, "d": ds.attrs.get("d"), **r}
            for r in table
            if r["variable"] == "P" and r["quantity"] in ("signal", "t_star")
        ]
    local = {
        q: section.attempt(
            f"local P-exponents of {q}",
            lambda q=q: local_P_exponents(ds, q, n_boot=max(n_boot, 100), seed=seed),
        )
        for q in ("signal", "snr")
    }
    if local["signal"] is not None:
        section.results["local_signal"] = local["signal"]
        section.results["local_snr"] = local["snr"]
        section.add(
            "Local P-exponents of the signal s and of the signal-to-noise ratio s / n"
            " (weighted mean over T; both predicted 1/(1+chi) ="
            f" {1 / (1 + chi):.4f}, s / n because the scaling argument balances s against n):",
            "",
        )
        snr = {} if local["snr"] is None else local_exponent_map(local["snr"])
        section.table(
            ["P pair", "signal", "±", "s / n", "±"],
            [
                [f"{lo}-{hi}", _num(m), _num(e)]
                + [_num(x) for x in snr.get((lo, hi), (math.nan, math.nan))]
                for lo, hi, m, e in local_exponent_pairs(local["signal"])
            ],
        )
    section.attempt(
        "perceptron figure",
        lambda: section.figure(
            plots.perceptron_figure(ds, fits, local=local),
            "perceptron",
            f"signal, noise, t* and local P-exponents at chi = {chi:g}",
        ),
    )


def _dynamics(section: _Section, ds: xr.Dataset) -> None:
    sel = at_alpha(ds)
    if not bool(masked(sel, "ckpt_train_loss").notnull().any()):
        section.add("- dynamics skipped: no converged cell has checkpoint values", "")
        return
    section.add("### Dynamics", "")
    section.figure(
        plots.dynamics(ds),
        "dynamics",
        "training loss and test error along t at the largest alpha, one curve per T",
    )


def _num(x: float | None, fmt: str = "{:.4f}") -> str:
    return fmt.format(x) if x is not None and math.isfinite(x) else "n/a"


def _md(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _span(values: np.ndarray) -> str:
    values = np.asarray(values)
    positive = values.dtype.kind in "fc" and len(values) and (values > 0).all()
    if positive and values.max() != values.min():
        return f"{values.min():.4g} .. {values.max():.4g}"
    return ", ".join(str(v) for v in values[:6]) + (" ..." if len(values) > 6 else "")
