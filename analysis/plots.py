r"""Figures of a cube: phase diagrams, temperature sweeps, crossovers, perceptron, dynamics.

Every function takes lazy Datasets, computes the few seed means it draws, and returns a
`matplotlib.figure.Figure` built without pyplot (no global state; saved with the Agg
canvas). Conventions: seed means over converged cells with standard-error bars;
log axes (base 2 on the grid axes alpha and T of the phase diagrams); every axis label
gives the quantity, its symbol and its units from `ensemble.schema`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib import colormaps, patheffects
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from analysis.aggregate import Include, at_alpha, outcome_counts, seed_mean
from analysis.crossover import CrossoverFit
from analysis.fits import PowerLawFit
from analysis.perceptron import (
    QUANTITIES,
    local_P_exponents,
    observables,
    predicted_exponents,
)
from analysis.regimes import ntk_boundary
from ensemble.schema import CELL_VARS, CHECKPOINT_VARS, COORDS, N_CKPT_TEST, NTK_VARS

CMAP = "viridis"
"""Perceptually uniform colormap of the phase diagrams and of the curve families."""

SYMBOLS: dict[str, str] = {
    "alpha": r"output scale $\alpha$",
    "T": r"temperature $T = dt/(hB)$",
    "P": r"training set size $P$",
    "dt": r"step size $dt$",
    "test_error": r"test error $\epsilon_{\mathrm{test}}$",
    "train_loss": r"training loss $\mathcal{L}$",
    "rel_change": r"relative weight change $\Vert w-w_0\Vert/\Vert w_0\Vert$",
    "t_star": r"training time $t^*$",
    "steps": r"SGD steps $n$",
    "signal": r"signal $(w-w_0)\cdot e_1$",
    "noise": r"noise $\Vert(w-w_0)_\perp\Vert/\sqrt{d-1}$",
    "T_c": r"crossover temperature $T_c$",
    "alpha_star": r"lazy / feature boundary $\alpha^*$",
    "ckpt_t": r"time $t = dt \times \mathrm{steps}$",
    "ckpt_train_loss": r"training loss $\mathcal{L}(t)$",
    "ckpt_test_error": r"test error $\epsilon_{\mathrm{test}}(t)$"
    + f", first {N_CKPT_TEST} test points",
    "local_P_exponent": r"local exponent $d\ln s/d\ln P$",
    "ntk_change": r"NTK change $\langle(K-K_0)^2\rangle/\langle K_0^2\rangle$",
}
UNITS: dict[str, str] = (
    {k: v["units"] for k, v in COORDS.items()}
    | {k: v[1] for k, v in CELL_VARS.items()}
    | {k: v[1] for k, v in CHECKPOINT_VARS.items()}
    | {k: v[1] for k, v in NTK_VARS.items()}
    | {k: v[1] for k, v in QUANTITIES.items()}
    | {"T_c": "1", "alpha_star": "1", "local_P_exponent": "1"}
)
OUTCOME_STYLE: dict[str, dict] = {
    "diverged": {"facecolor": "#f2d0d0", "edgecolor": "#8b0000", "hatch": "xxx"},
    "unfinished": {"facecolor": "#d6e2f0", "edgecolor": "#1f3f6f", "hatch": "///"},
    "missing": {"facecolor": "#e6e6e6", "edgecolor": "#707070", "hatch": "..."},
}
LOG_Y = {
    "rel_change",
    "t_star",
    "steps",
    "signal",
    "noise",
    "T_c",
    "train_loss",
    "ntk_change",
    "alpha_star",
}


def label(name: str) -> str:
    """Axis label of a quantity: description, symbol and units, e.g.
    ``temperature $T = dt/(hB)$ (dimensionless)``."""
    units = UNITS.get(name, "1")
    shown = "dimensionless" if units == "1" else units
    return f"{SYMBOLS.get(name, name)} ({shown})"


def new_figure(
    n_rows: int = 1, n_cols: int = 1, size: tuple[float, float] = (4.8, 3.8)
) -> tuple[Figure, np.ndarray]:
    """A constrained-layout Figure with an (n_rows, n_cols) array of Axes."""
    fig = Figure(figsize=(size[0] * n_cols, size[1] * n_rows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    return fig, axes


def _edges(x: np.ndarray) -> np.ndarray:
    """Cell edges in log space around sorted positive centres (geometric midpoints)."""
    lx = np.log2(np.asarray(x, float))
    if len(lx) == 1:
        return 2.0 ** np.array([lx[0] - 0.5, lx[0] + 0.5])
    mid = (lx[1:] + lx[:-1]) / 2
    return 2.0 ** np.concatenate([[2 * lx[0] - mid[0]], mid, [2 * lx[-1] - mid[-1]]])


GRID_TICKS_MAX = 10
"""A phase diagram's axis gets one tick per grid value when its labels have room: no
closer than 1 / GRID_TICKS_MAX of the axis (in log space)."""


def _grid_ticks(axis, values: np.ndarray) -> None:
    """Ticks at the grid values (the cell centres) of a sparse grid axis; a dense one
    keeps matplotlib's base-2 ticks."""
    edges = np.log2(_edges(values))
    gaps = np.diff(np.log2(values))
    if len(values) == 1 or gaps.min() >= (edges[-1] - edges[0]) / GRID_TICKS_MAX:
        texts = [pow2_text(v) for v in values]
        axis.set_ticks(values, [re.sub(r"^2\^(.+)$", r"$2^{\1}$", t) for t in texts])
        axis.set_ticks([], minor=True)


def phase_diagram(
    ds: xr.Dataset,
    var: str = "test_error",
    P: int | None = None,
    *,
    include: Include = ("converged",),
    ax=None,
    boundary: xr.Dataset | None = None,
) -> Figure:
    """Seed mean of ``var`` over the (alpha, T) grid at one P (default: the smallest).

    Colour: the seed mean over the cells in ``include`` (log colour scale for positive
    scale-free quantities such as rel_change and t*). Cells where no seed entered are
    hatched by their most frequent outcome (diverged, unfinished, missing); a white dot
    marks cells where only some seeds entered. Axes: alpha (x) and T (y), base-2 log.
    boundary: an `analysis.regimes.ntk_boundary` table of this P, drawn as the line
    alpha*(T) between the lazy (right) and the feature-learning regime.
    """
    if ax is None:
        fig, axes = new_figure()
        ax = axes[0, 0]
    fig = ax.figure
    P = int(ds["P"].values.min()) if P is None else P
    sel = ds.sel(P=P)
    mean = seed_mean(sel, var, include)["mean"].transpose("alpha", "T").values
    counts = outcome_counts(sel).transpose("outcome", "alpha", "T").compute()
    alpha, T = sel["alpha"].values, sel["T"].values
    finite = mean[np.isfinite(mean)]
    if var in LOG_Y and finite.size and (finite > 0).all():
        norm = LogNorm(vmin=finite.min(), vmax=max(finite.max(), finite.min() * 1.0001))
    elif finite.size:
        norm = Normalize(vmin=finite.min(), vmax=max(finite.max(), finite.min() + 1e-12))
    else:
        norm = Normalize(0, 1)
    mesh = ax.pcolormesh(
        _edges(alpha), _edges(T), np.ma.masked_invalid(mean.T), cmap=CMAP, norm=norm
    )
    colorbar = fig.colorbar(mesh, ax=ax)
    colorbar.set_label(label(var) + "\nmean over " + "/".join(include) + " seeds")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    _grid_ticks(ax.xaxis, alpha)
    _grid_ticks(ax.yaxis, T)
    ax.set_xlabel(label("alpha"))
    ax.set_ylabel(label("T"))
    ax.set_title(f"{ds.attrs.get('experiment', '')}: {var} at P = {P}", fontsize=9)
    present = _mark_outcomes(ax, alpha, T, counts, include)
    drawn = boundary is not None and _boundary_line(ax, boundary)
    entered = "/".join(include)
    legend_text = {
        "diverged": f"diverged (no {entered} seed)",
        "unfinished": f"unfinished (no {entered} seed)",
        "missing": "missing (not computed)",
    }
    handles = [
        Patch(label=legend_text[name], **OUTCOME_STYLE[name])
        for name in present
        if name in OUTCOME_STYLE
    ]
    if drawn:
        line = Line2D([], [], **BOUNDARY_STYLE, path_effects=BOUNDARY_EDGE)
        handles.append(line)
        line.set_label("NTK change = 1")
    if "partial" in present:
        handles.append(
            ax.scatter(
                [],
                [],
                marker="o",
                s=18,
                facecolor="white",
                edgecolor="black",
                label="some seeds not " + "/".join(include),
            )
        )
    if handles:
        ax.legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.16),
            fontsize=7,
            ncol=2,
            frameon=False,
        )
    return fig


BOUNDARY_STYLE = {"color": "white", "linestyle": "--", "linewidth": 1.5}
BOUNDARY_EDGE = [patheffects.withStroke(linewidth=3.0, foreground="black")]
"""A black edge, so that the white line shows on light cells and in the legend."""


def _boundary_line(ax, line: xr.Dataset) -> bool:
    """Draw alpha*(T) of an `analysis.regimes.ntk_boundary` table; whether there was a
    point to draw."""
    ok = np.isfinite(line["alpha_star"].values)
    if not ok.any():
        return False
    ax.plot(
        line["alpha_star"].values[ok],
        line["T"].values[ok],
        marker="o" if ok.sum() == 1 else None,
        path_effects=BOUNDARY_EDGE,
        **BOUNDARY_STYLE,
    )
    return True


def _mark_outcomes(
    ax, alpha: np.ndarray, T: np.ndarray, counts: xr.DataArray, include: Include
) -> list[str]:
    ea, eT = _edges(alpha), _edges(T)
    names = list(counts["outcome"].values)
    c = counts.values  # (outcome, alpha, T)
    entered = sum(c[names.index(n)] for n in include)
    total = c.sum(axis=0)
    others = [n for n in ("diverged", "unfinished", "missing") if n not in include]
    present: list[str] = []
    partial_x, partial_y = [], []
    for i in range(len(alpha)):
        for j in range(len(T)):
            if entered[i, j] == 0:
                name = max(others, key=lambda n: c[names.index(n), i, j]) if others else "missing"
                style = OUTCOME_STYLE[name]
                ax.add_patch(
                    Rectangle(
                        (ea[i], eT[j]), ea[i + 1] - ea[i], eT[j + 1] - eT[j], linewidth=0.5, **style
                    )
                )
                present.append(name)
            elif entered[i, j] < total[i, j]:
                partial_x.append(alpha[i])
                partial_y.append(T[j])
                present.append("partial")
    if partial_x:
        ax.scatter(
            partial_x, partial_y, marker="o", s=18, facecolor="white", edgecolor="black", zorder=3
        )
    return [n for n in ("diverged", "unfinished", "missing", "partial") if n in present]


def phase_diagrams(
    ds: xr.Dataset,
    P: int | None = None,
    *,
    include: Include = ("converged",),
    boundary: xr.Dataset | None = None,
) -> Figure:
    """Test error, relative weight change, t* and, where measured, the NTK change over
    (alpha, T) at one P, side by side; with the NTK change, each panel shows where it is
    1 (the lazy / feature-learning boundary): ``boundary``, the `ntk_boundary` table of
    this P, or computed here (without a bootstrap) when not given."""
    ntk = "ntk_change" in ds
    names = ("test_error", "rel_change", "t_star") + (("ntk_change",) * ntk)
    if boundary is None and ntk and ds.sizes.get("alpha", 1) >= 2:
        at = int(ds["P"].values.min()) if P is None else P
        boundary = ntk_boundary(ds.sel(P=[at]), include=include, n_boot=0).sel(P=at)
    fig, axes = new_figure(1, len(names), size=(5.0, 4.6))
    for ax, var in zip(axes[0], names, strict=True):
        phase_diagram(ds, var, P, include=include, ax=ax, boundary=boundary)
    return fig


def _P_colours(P: Sequence) -> list:
    cmap = colormaps[CMAP]
    n = len(P)
    return [cmap(0.85 * k / max(n - 1, 1)) for k in range(n)]


def temperature_sweep(
    ds: xr.Dataset,
    var: str,
    *,
    alpha: float | None = None,
    a: float | None = None,
    fit: PowerLawFit | None = None,
    crossover: xr.Dataset | None = None,
    include: Include = ("converged",),
    legend: bool = True,
    ax=None,
) -> Figure:
    """``var`` against T, one curve per P (seed means with standard-error bars).

    a         : if given, the x axis is rescaled to T P^a (curves collapse when T_c ~ P^-a)
    fit       : a `PowerLawFit` over (T, P) drawn as dashed lines on its fitted points
    crossover : a crossover table (over P) whose T_c are marked by triangles on the x axis
    Log x; log y for positive scale-free quantities (rel_change, t*), linear otherwise.
    """
    if ax is None:
        fig, axes = new_figure()
        ax = axes[0, 0]
    fig = ax.figure
    sel = at_alpha(ds, alpha)
    stats = seed_mean(sel, var, include).transpose("T", "P").compute()
    T = stats["T"].values
    P = stats["P"].values
    for j, (p, colour) in enumerate(zip(P, _P_colours(P), strict=True)):
        scale = float(p) ** a if a is not None else 1.0
        m, e = stats["mean"].values[:, j], stats["stderr"].values[:, j]
        ok = np.isfinite(m)
        if var in LOG_Y:
            ok &= m > 0
        if not ok.any():
            continue
        ax.errorbar(
            T[ok] * scale,
            m[ok],
            yerr=np.nan_to_num(e[ok]),
            color=colour,
            marker="o",
            ms=3,
            lw=1,
            capsize=2,
            label=f"P = {p}",
        )
        if fit is not None and "P" in fit.used.dims and p in fit.used["P"].values:
            used = fit.used.sel(P=p).values
            if used.any():
                Tu = T[used]
                ax.plot(Tu * scale, fit.predict(T=Tu, P=float(p)), color=colour, ls="--", lw=1)
        if crossover is not None and p in crossover["P"].values:
            T_c = float(crossover["T_c"].sel(P=p))
            if np.isfinite(T_c):
                ax.plot(
                    [T_c * scale],
                    [0.0],
                    marker="^",
                    color=colour,
                    ms=7,
                    transform=ax.get_xaxis_transform(),
                    clip_on=False,
                )
    ax.set_xscale("log", base=2)
    if var in LOG_Y:
        ax.set_yscale("log")
    ax.set_xlabel(
        label("T")
        if a is None
        else rf"rescaled temperature $T P^{{{a:.2f}}}$ (images$^{{{a:.2f}}}$)"
    )
    ax.set_ylabel(label(var))
    alpha_value = float(sel["alpha"]) if "alpha" in sel.coords and sel["alpha"].ndim == 0 else None
    where = f", alpha = {alpha_value:g}" if alpha_value is not None else ""
    ax.set_title(f"{ds.attrs.get('experiment', '')}: {var}{where}", fontsize=9)
    if legend:
        _legend(ax, fontsize=7)
    return fig


def temperature_sweeps(
    ds: xr.Dataset,
    *,
    alpha: float | None = None,
    a: float | None = None,
    fits: Mapping[str, PowerLawFit] | None = None,
    crossover: xr.Dataset | None = None,
    include: Include = ("converged",),
) -> Figure:
    """Test error, rel_change and t* against T (one curve per P); a second row with
    x = T P^a when ``a`` is given. ``fits`` maps a variable to its `PowerLawFit`."""
    variables = ("test_error", "rel_change", "t_star")
    fits = fits or {}
    fig, axes = new_figure(2 if a is not None else 1, 3)
    for k, var in enumerate(variables):
        temperature_sweep(
            ds,
            var,
            alpha=alpha,
            fit=fits.get(var),
            crossover=crossover,
            include=include,
            ax=axes[0, k],
        )
        if a is not None:
            temperature_sweep(
                ds, var, alpha=alpha, a=a, include=include, legend=False, ax=axes[1, k]
            )
    return fig


def crossover_plot(
    tables: Sequence[xr.Dataset], fits: Sequence[CrossoverFit | None] = (), ax=None
) -> Figure:
    """T_c against P for each crossover table (bootstrap interval as error bars), with
    the fitted T_c ~ P^-a when given."""
    series = []
    for k, table in enumerate(tables):
        name = str(table.attrs.get("short_name", table.attrs.get("definition", f"definition {k}")))
        fit = fits[k] if k < len(fits) else None
        if fit is not None:
            name += f": a = {fit.a}"
        series.append((name, table, fit.fit if fit is not None else None))
    return _crossings_against_P(series, "T_c", ax)


def ntk_scaling_plot(
    table: xr.Dataset, fits: Mapping[float, PowerLawFit | None], ax=None
) -> Figure:
    """alpha* (where the NTK change is its level) against P, one series per T of an
    `analysis.regimes.ntk_boundary` table, with the fitted alpha* ~ P^k where given."""
    series = []
    for T in table["T"].values:
        fit = fits.get(float(T))
        name = f"T = {pow2_text(T)}" + (f": k = {fit['k']}" if fit is not None else "")
        series.append((name, table.sel(T=T), fit))
    return _crossings_against_P(series, "alpha_star", ax)


def _crossings_against_P(
    series: Sequence[tuple[str, xr.Dataset, PowerLawFit | None]], name: str, ax=None
) -> Figure:
    """``name`` of each (label, `analysis.crossing.crossing_table` over P, fit) against P,
    with its bootstrap interval as error bars and the fitted power law dashed."""
    if ax is None:
        fig, axes = new_figure()
        ax = axes[0, 0]
    fig = ax.figure
    markers = ["o", "s", "D", "^"]
    colours = _P_colours(range(max(len(series), 2)))
    for k, (text, table, fit) in enumerate(series):
        P = table["P"].values.astype(float)
        y = table[name].values
        low = np.nan_to_num(y - table[f"{name}_low"].values, nan=0.0).clip(0)
        high = np.nan_to_num(table[f"{name}_high"].values - y, nan=0.0).clip(0)
        ok = np.isfinite(y)
        ax.errorbar(
            P[ok],
            y[ok],
            yerr=[low[ok], high[ok]],
            marker=markers[k % 4],
            color=colours[k],
            ls="none",
            capsize=3,
            label=text,
        )
        if fit is not None:
            grid = np.geomspace(P.min(), P.max(), 50)
            ax.plot(grid, fit.predict(P=grid), color=colours[k], ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel(label("P"))
    ax.set_ylabel(label(name))
    _legend(ax, fontsize=7)
    return fig


def perceptron_figure(
    ds: xr.Dataset,
    fits: Mapping[str, PowerLawFit] | None = None,
    *,
    alpha: float | None = None,
    include: Include = ("converged",),
    local: Mapping[str, xr.Dataset | None] | None = None,
) -> Figure:
    """Signal, noise and t* against T (one curve per P) with the predicted laws, and the
    local P-exponents of the signal (per T and weighted mean) and of the ratio s / n
    (weighted mean) against P with the prediction 1/(1 + chi).

    Predicted lines (grey dashed) use the predicted exponents and the prefactor that
    best matches the data in log space; each panel's title gives the fitted exponents
    next to the predicted ones. ``local``: `local_P_exponents` of "signal" and "snr"
    already computed with the same alpha and include (computed here where missing).
    """
    chi = float(ds.attrs.get("chi", np.nan))
    predicted = predicted_exponents(chi)
    obs = observables(ds, alpha, include).transpose("T", "P").compute()
    fig, axes = new_figure(2, 2)
    T, P = obs["T"].values, obs["P"].values
    for ax, q in zip(axes.flat[:3], QUANTITIES, strict=True):
        m, e = obs[q].values, obs[f"{q}_stderr"].values
        pred = predicted[q]
        shape = T[:, None] ** pred["T"] * P[None, :].astype(float) ** pred["P"]
        ok_all = np.isfinite(m) & (m > 0)
        log_A = np.mean(np.log(m[ok_all] / shape[ok_all])) if ok_all.any() else np.nan
        for j, (p, colour) in enumerate(zip(P, _P_colours(P), strict=True)):
            ok = ok_all[:, j]
            if ok.any():
                ax.errorbar(
                    T[ok],
                    m[ok, j],
                    yerr=np.nan_to_num(e[ok, j]),
                    color=colour,
                    marker="o",
                    ms=3,
                    lw=1,
                    capsize=2,
                    label=f"P = {p}",
                )
            if np.isfinite(log_A):
                ax.plot(T, np.exp(log_A) * shape[:, j], color="0.4", ls="--", lw=0.8)
        title = f"{q}: predicted T^{pred['T']:g} P^{pred['P']:.3g}"
        if fits and q in fits:
            f = fits[q]
            title += f"\nfitted T^({f.exponents['T']}) P^({f.exponents['P']})"
        ax.set_title(title, fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label("T"))
        ax.set_ylabel(label(q))
        _legend(ax, fontsize=6)
    ax = axes[1, 1]
    if len(P) >= 2:
        given = dict(local or {})
        for q in ("signal", "snr"):
            if given.get(q) is None:
                given[q] = local_P_exponents(ds, q, alpha=alpha, include=include)
        local, snr = given["signal"], given["snr"]
        colours = _P_colours(T)
        for i in range(len(T)):
            ax.plot(
                local["P_mid"].values,
                local["slope"].values[i],
                ".",
                color=colours[i],
                alpha=0.5,
                ms=4,
            )
        for loc, name, colour, shift in (
            (local, "signal s", "black", 1.0),
            (snr, "ratio s / n", "tab:red", 1.04),
        ):
            ax.errorbar(
                loc["P_mid"].values * shift,
                loc["slope_mean"].values,
                yerr=np.nan_to_num(loc["slope_mean_stderr"].values),
                color=colour,
                marker="o",
                ms=4,
                capsize=3,
                label=f"{name}, weighted mean over T",
            )
    ax.axhline(
        predicted["signal"]["P"],
        color="0.4",
        ls="--",
        label=rf"predicted $1/(1+\chi)$ = {predicted['signal']['P']:.3g}",
    )
    ax.set_xscale("log", base=2)
    ax.set_xlabel(label("P"))
    ax.set_ylabel(label("local_P_exponent"))
    ax.set_title(f"local P-exponents of s and s / n (chi = {chi:g})", fontsize=8)
    _legend(ax, fontsize=6)
    fig.suptitle(
        f"{ds.attrs.get('experiment', '')}: perceptron chi = {chi:g}, d = {ds.attrs.get('d')}",
        fontsize=9,
    )
    return fig


def perceptron_summary(rows: Sequence[Mapping[str, object]]) -> Figure:
    """Fitted P-exponents of the signal and of t* against chi, with the predictions.

    rows : dicts with keys chi, d, quantity ("signal" / "t_star"), fitted, stderr
    """
    fig, axes = new_figure(1, 2)
    chi_grid = np.linspace(0, max([float(r["chi"]) for r in rows] + [1.0]) * 1.1, 100)
    curves = {"signal": 1 / (1 + chi_grid), "t_star": (3 + chi_grid) / (1 + chi_grid)}
    names = {"signal": r"P-exponent $\gamma$ of the signal", "t_star": r"P-exponent $b$ of $t^*$"}
    for ax, q in zip(axes[0], ("signal", "t_star"), strict=True):
        sel = [r for r in rows if r["quantity"] == q]
        ax.errorbar(
            [r["chi"] for r in sel],
            [r["fitted"] for r in sel],
            yerr=[r["stderr"] for r in sel],
            marker="o",
            ls="none",
            capsize=3,
            color=colormaps[CMAP](0.3),
            label="fitted",
        )
        ax.plot(chi_grid, curves[q], "--", color="0.4", label="predicted")
        ax.set_xlabel(r"depletion exponent $\chi$ (dimensionless)")
        ax.set_ylabel(names[q] + " (dimensionless)")
        _legend(ax, fontsize=7)
    return fig


def perceptron_finite_d(rows: Sequence[Mapping[str, object]]) -> Figure:
    """Local P-exponent at the largest P pair against d, one colour per chi, for the
    signal (filled) and the ratio s / n (open), with 1/(1+chi) dashed.

    rows : dicts with keys chi, d, quantity ("signal" / "snr"), P_lo, P_hi, fitted, stderr
    """
    fig, axes = new_figure(1, 1)
    ax = axes[0, 0]
    chis = sorted({float(r["chi"]) for r in rows})
    colours = dict(zip(chis, _P_colours(chis), strict=True))
    for chi in chis:
        for q, fill, shift in (("signal", True, 1.0), ("snr", False, 1.06)):
            sel = sorted(
                (r for r in rows if float(r["chi"]) == chi and r["quantity"] == q),
                key=lambda r: float(r["d"]),
            )
            if not sel:
                continue
            pairs = sorted({f"{r['P_lo']}-{r['P_hi']}" for r in sel})
            name = "s" if q == "signal" else "s / n"
            ax.errorbar(
                [float(r["d"]) * shift for r in sel],
                [r["fitted"] for r in sel],
                yerr=[r["stderr"] for r in sel],
                marker="o",
                mfc=colours[chi] if fill else "white",
                color=colours[chi],
                capsize=3,
                label=rf"$\chi$ = {chi:g}, {name} (P {', '.join(pairs)})",
            )
        ax.axhline(1 / (1 + chi), color=colours[chi], ls="--", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(r"input dimension $d$ (dimensionless)")
    ax.set_ylabel(r"local $P$-exponent, largest $P$ pair (dimensionless)")
    ax.set_title(r"finite $d$: dashed lines are the predictions $1/(1+\chi)$", fontsize=8)
    _legend(ax, fontsize=6)
    return fig


def optimal_temperature_figure(
    ds: xr.Dataset,
    table: xr.Dataset,
    fits: Mapping[str, PowerLawFit] | None = None,
    P: int | None = None,
    include: Include = ("converged",),
    edges: xr.Dataset | None = None,
    edge_fit: PowerLawFit | None = None,
) -> Figure:
    """Left: seed-mean test error against T for each alpha, with T_opt (star) and its 68 %
    bootstrap interval. Right: T_opt against alpha; filled circles are interior optima,
    triangles edges (up: stability edge; down: small-T edge, an upper bound; right:
    large-T edge, a lower bound), grey where the paired t tests do not resolve them
    (``resolved``); the fits T_opt ~ alpha^k given in ``fits`` (name -> fit) as lines;
    the divergence temperature T_div (crosses, red) and its fit ``edge_fit``.

    table : `analysis.optimal.optimal_temperature` of ``ds``
    edges : `analysis.stability.divergence_temperature` of ``ds`` (all P or this P)
    """
    P = int(table["P"].max()) if P is None else int(P)
    tab = table.sel(P=P)
    err = seed_mean(ds.sel(P=P), "test_error", include).transpose("alpha", "T").compute()
    fig, axes = new_figure(1, 2)
    ax, ax_opt = axes[0]
    alpha, T = err["alpha"].values, err["T"].values
    colours = _P_colours(alpha)
    for i, (a, colour) in enumerate(zip(alpha, colours, strict=True)):
        m, e = err["mean"].values[i], err["stderr"].values[i]
        ok = np.isfinite(m)
        if not ok.any():
            continue
        ax.errorbar(T[ok], m[ok], yerr=np.nan_to_num(e[ok]), color=colour, marker="o", ms=3,
                    lw=1, capsize=2, label=rf"$\alpha$ = {pow2_text(a)}")  # fmt: skip
        t_opt = float(tab["T_opt"].values[i])
        if np.isfinite(t_opt):
            lo, hi = float(tab["T_lo"].values[i]), float(tab["T_hi"].values[i])
            xerr = None
            if np.isfinite(lo) and np.isfinite(hi):
                xerr = [[max(t_opt - lo, 0.0)], [max(hi - t_opt, 0.0)]]
            y = float(tab["error_min"].values[i])
            ax.errorbar([t_opt], [y], xerr=xerr, color=colour, marker="*", ms=10, capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(label("T"))
    ax.set_ylabel(label("test_error"))
    ax.set_title(f"test error along T at P = {P}; stars: T_opt", fontsize=8)
    _legend(ax, fontsize=6)
    markers = {
        0: ("o", "interior optimum"),
        1: ("^", "stability edge"),
        2: ("v", "small-T edge (upper bound)"),
        3: (">", "large-T edge (lower bound)"),
    }
    resolved = tab["resolved"].values
    shades = ((True, colormaps[CMAP](0.3), ""), (False, "0.7", ", within noise"))
    for code, (marker, name) in markers.items():
        for ok, colour, suffix in shades:
            sel = (tab["where"].values == code) & (resolved == ok)
            if not sel.any():
                continue
            t_opt = tab["T_opt"].values[sel]
            lo, hi = tab["T_lo"].values[sel], tab["T_hi"].values[sel]
            yerr = np.nan_to_num([np.maximum(t_opt - lo, 0), np.maximum(hi - t_opt, 0)])
            ax_opt.errorbar(tab["alpha"].values[sel], t_opt, yerr=yerr, marker=marker, ls="none",
                            capsize=3, color=colour, mfc="white" if code else None,
                            label=name + suffix)  # fmt: skip
    for (name, fit), style in zip((fits or {}).items(), ("--", ":", "-."), strict=False):
        a_fit = fit.used["alpha"].values[fit.used.values]
        grid = np.geomspace(a_fit.min(), a_fit.max(), 50)
        ax_opt.plot(grid, fit.predict(alpha=grid), style, color="0.4",
                    label=f"fit ({name}): T_opt ~ alpha^({fit['k']})")  # fmt: skip
    if edges is not None:
        t_div = edges.sel(P=P)["T_div"] if "P" in edges.dims else edges["T_div"]
        ok = np.isfinite(t_div.values)
        if ok.any():
            ax_opt.plot(t_div["alpha"].values[ok], t_div.values[ok], "x", color="tab:red",
                        ms=7, label="T_div: half the seeds diverge")  # fmt: skip
    if edge_fit is not None:
        a_fit = edge_fit.used["alpha"].values[edge_fit.used.values]
        grid = np.geomspace(a_fit.min(), a_fit.max(), 50)
        ax_opt.plot(grid, edge_fit.predict(alpha=grid), "-", color="tab:red", lw=0.8,
                    label=f"fit: T_div ~ alpha^({edge_fit['k']})")  # fmt: skip
    ax_opt.set_xscale("log", base=2)
    ax_opt.set_yscale("log", base=2)
    ax_opt.set_xlabel(label("alpha"))
    ax_opt.set_ylabel(r"optimal temperature $T_{\mathrm{opt}}$ (dimensionless)")
    ax_opt.set_title(f"optimal T against alpha at P = {P} (68 % bootstrap intervals)", fontsize=8)
    _legend(ax_opt, fontsize=6)
    fig.suptitle(f"{ds.attrs.get('experiment', '')}: optimal temperature", fontsize=9)
    return fig


def pow2_text(x: float) -> str:
    """2^k for exact powers of two (k != 0), 2^k.5 for half octaves (as sweeps write
    2 ** (k + 0.5), to 1e-9 in k), else 4 significant digits."""
    x = float(x)
    k = np.log2(x) if x > 0 else np.nan
    if np.isfinite(k) and k == round(k) and k:
        return f"2^{int(k)}"
    if np.isfinite(k) and abs(2 * k - round(2 * k)) < 1e-9 and round(2 * k) % 2:
        return f"2^{round(2 * k) / 2:g}"
    return f"{x:.4g}"


def dynamics(
    ds: xr.Dataset,
    *,
    alpha: float | None = None,
    P: Sequence[int] | None = None,
    include: Include = ("converged",),
) -> Figure:
    """Training loss and test error at the checkpoints against t, one curve per T.

    One row per P (default: the smallest, middle and largest P of the grid), at one
    alpha (default: the largest); seed means over ``include`` (no error bars: many
    curves per panel); log t axis, log training loss.
    """
    sel = at_alpha(ds, alpha)
    if P is None:
        grid = sel["P"].values
        P = sorted({grid[0], grid[len(grid) // 2], grid[-1]})
    P_values = [int(p) for p in P]
    t_all = seed_mean(sel, "ckpt_t", include)["mean"].transpose("P", "T", "checkpoint").compute()
    stats = {
        var: seed_mean(sel, var, include)["mean"].transpose("P", "T", "checkpoint").compute()
        for var in ("ckpt_train_loss", "ckpt_test_error")
    }
    fig, axes = new_figure(len(P_values), 2, size=(4.8, 3.0))
    T = sel["T"].values
    colours = _P_colours(T)
    for row, p in enumerate(P_values):
        t = t_all.sel(P=p).values
        for ax, (var, st) in zip(axes[row], stats.items(), strict=True):
            m_all = st.sel(P=p).values
            for i, colour in enumerate(colours):
                m = m_all[i]
                ok = np.isfinite(m) & np.isfinite(t[i]) & (t[i] > 0)
                if var == "ckpt_train_loss":
                    ok &= m > 0
                if ok.any():
                    label_T = f"T = 2^{np.log2(T[i]):.1f}"
                    ax.plot(t[i][ok], m[ok], color=colour, marker=".", lw=1, label=label_T)
            ax.set_xscale("log")
            if var == "ckpt_train_loss":
                ax.set_yscale("log")
            ax.set_xlabel(label("ckpt_t"))
            ax.set_ylabel(label(var))
            ax.set_title(f"P = {p}", fontsize=8)
    _legend(axes[0, 0], fontsize=6, ncol=2)
    alpha_value = (
        float(sel["alpha"]) if "alpha" in sel.coords and sel["alpha"].ndim == 0 else float("nan")
    )
    fig.suptitle(
        f"{ds.attrs.get('experiment', '')}: dynamics at alpha = {alpha_value:g}", fontsize=9
    )
    return fig


def _legend(ax, **kwargs) -> None:
    """A legend only when something is labelled (no warning on empty panels)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def save_figure(
    fig: Figure, out_dir: Path, stem: str, formats: Sequence[str] = ("png", "svg")
) -> list[Path]:
    """Write ``stem.<format>`` into ``out_dir`` for each format (PNG at 150 dpi); return
    the paths. The layout is computed once, for the first format."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.{fmt}" for fmt in formats]
    engine = fig.get_layout_engine()
    for k, path in enumerate(paths):
        fig.savefig(path, dpi=150)
        if k == 0:
            fig.set_layout_engine("none")  # keep the positions found by the first draw
    fig.set_layout_engine(engine)
    return paths
