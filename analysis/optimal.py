r"""The optimal temperature of a phase diagram: T_opt(alpha, P), where the seed-mean test
error is lowest along T, and its scaling T_opt ~ alpha^k (science.md, "Feature regime:
an optimal temperature that scales with alpha").

For each (alpha, P) the minimum of the seed-mean test error over the T grid is refined by
the vertex of the parabola through it and its two neighbours in log2 T (kept within
them). The minimum is classed by where it lies among the T with a finite mean:

- ``interior``: both neighbours exist, a true optimum;
- ``stability edge``: at the largest T that still trains, the next grid T having diverged
  (no seed converged, one or more diverged): noise helps up to the edge of stability;
- ``small-T edge``: at the smallest T with a converged seed: T_opt is an upper bound;
- ``large-T edge``: at the largest T of the grid, or next to a T with nothing but missing
  or unfinished cells: T_opt is a lower bound.

Whether the minimum stands out of the noise is a paired t test by seed (one seed fixes
init, data and batch order at every T; `analysis.aggregate.paired_change`), as the
trends of the reproduction page: the fall of the error from the smallest T to the
minimum (t_fall > 0 when it falls) and its rise from the minimum to the largest T (t_rise
> 0 when it rises), each against Student's t at two-sided 5 %, Bonferroni-corrected for
the m - 1 other temperatures the minimum was picked among where it lies inside (at either
end the change is the smallest T against the largest, chosen in advance). ``resolved``:
the changes that make the class hold pass (interior: fall and rise; stability and large-T
edges: the fall; small-T edge: the rise). The smallest and the largest T are those of
`analysis.aggregate.compared_T` (where at least half as many seeds converged as
at the best-covered T): near an edge of stability the few seeds that still train pair
with little. Fewer than 2 seeds at both ends of a change: not resolved; the same change
in every seed: the exact sign test decides.

Errors come from a bootstrap over seeds that draws the same seeds in every cell (one seed
fixes init and data at every T): the standard error of ln T_opt
(`analysis.aggregate.bootstrap_std`), and the 68 % t interval of ln T_opt built on it
(`analysis.aggregate.seed_interval`), both only where at least MIN_VALID_SHARE of the
replicates have an optimum. At a stability edge the true edge lies anywhere between the
last T that trains and the next grid T, so ln T_opt gets at least the standard deviation
of a uniform spread over that step, ln(step) / sqrt(12).

The fit T_opt ~ alpha^k uses the interior optima of the alphas in ``alpha_range``; with
``classes=("interior", "stability edge")`` it also takes the stability edges, i.e. it fits
the best T that still trains where the error falls all the way to the edge of stability.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from analysis.aggregate import (
    MIN_VALID_SHARE,
    Include,
    bootstrap_mean,
    bootstrap_std,
    compared_T,
    effective_outcome,
    masked,
    mean_stderr,
    paired_change,
    seed_interval,
    seeds_with_values,
)
from analysis.fits import InsufficientData, PowerLawFit, Range, fit_power_law
from ensemble.schema import CONVERGED, DIVERGED

CLASSES = ("interior", "stability edge", "small-T edge", "large-T edge")
"""Codes 0, 1, 2, 3 of ``where`` in `optimal_temperature`."""


def _argmin_refined(T: np.ndarray, err: np.ndarray, diverged: np.ndarray) -> tuple[float, int, int]:
    """(T_opt, index of the grid minimum, class code) of one curve err(T); ``diverged``
    marks the T where no seed converged and one or more diverged. (nan, -1, -1) when no T
    has a finite error."""
    ok = np.flatnonzero(np.isfinite(err))
    if ok.size == 0:
        return math.nan, -1, -1
    i = int(ok[np.argmin(err[ok])])
    x = np.log2(T)
    if i == ok[0]:
        return float(T[i]), i, 2
    if i == len(T) - 1 or not np.isfinite(err[i + 1]):
        return float(T[i]), i, 1 if i + 1 < len(T) and diverged[i + 1] else 3
    if not np.isfinite(err[i - 1]):
        return float(T[i]), i, 2
    (x0, x1, x2), (y0, y1, y2) = x[i - 1 : i + 2], err[i - 1 : i + 2]
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2**2 * (y0 - y1) + x1**2 * (y2 - y0) + x0**2 * (y1 - y2)) / denom
    vertex = -b / (2 * a) if a > 0 else x1
    return float(2.0 ** np.clip(vertex, x0, x2)), i, 0


def _paired_t(values: np.ndarray, i: int, j: int, comparisons: int) -> tuple[float, float]:
    """(t of values[j] - values[i], signed as the change, and its threshold; it passes
    where t > threshold): (NaN, NaN) where i == j, (NaN, inf) where fewer than 2 seeds are
    paired (a change not judged), (+-inf, inf) where every seed changed by the same amount
    and the sign test does not pass (`analysis.aggregate.Change.sign_p`)."""
    if i == j:
        return math.nan, math.nan
    c = paired_change(values, i, j, comparisons)
    if c.n < 2:
        return math.nan, math.inf
    return math.copysign(c.t, c.diff), c.threshold if c.counts or c.t < math.inf else math.inf


def _resolved(code: int, fall: tuple[float, float], rise: tuple[float, float]) -> bool:
    """Whether the changes that make class ``code`` hold pass their t tests ((t, threshold)
    of the fall to the minimum and of the rise after it, each positive in its direction)."""
    falls, rises = fall[0] > fall[1], rise[0] > rise[1]  # False where either is NaN
    return {0: falls and rises, 1: falls, 2: rises, 3: falls}.get(code, False)


def optimal_temperature(
    ds: xr.Dataset,
    *,
    include: Include = ("converged",),
    n_boot: int = 200,
    seed: int = 0,
) -> xr.Dataset:
    """T_opt over (alpha, P) of a group with several T (see the module docstring).

    Returns a computed Dataset with dims (alpha, P): ``T_opt``, ``T_lo`` / ``T_hi`` (68 %
    interval), ``log_T_err`` (standard error of ln T_opt), ``error_min`` and
    ``error_min_stderr`` (seed-mean test error at the grid minimum), ``where`` (class code,
    `CLASSES`; -1 where no T trained), ``t_fall`` / ``t_fall_crit`` and ``t_rise`` /
    ``t_rise_crit`` (paired t of the fall from the smallest T to the minimum and of the
    rise from it to the largest T, with their thresholds: NaN where there is no such
    change, inf where fewer than 2 seeds are paired or where t = +-inf, every seed having
    changed alike, and the sign test does not pass), ``resolved``, and attrs ``classes``.
    """
    if ds.sizes.get("T", 1) < 3:
        raise InsufficientData(f"the optimal T needs at least 3 T, got {ds.sizes.get('T', 1)}")
    values = masked(ds, "test_error", include)
    stats = mean_stderr(values).transpose("alpha", "P", "T").compute()
    boot = bootstrap_mean(values, n_boot, seed).transpose("bootstrap", "alpha", "P", "T").values
    T = stats["T"].values.astype(float)
    outcome = effective_outcome(ds).transpose("alpha", "P", "T", "seed").values
    diverged = ~(outcome == CONVERGED).any(-1) & (outcome == DIVERGED).any(-1)
    n_a, n_P = stats.sizes["alpha"], stats.sizes["P"]
    out = {k: np.full((n_a, n_P), np.nan) for k in ("T_opt", "T_lo", "T_hi", "log_T_err")}
    out["error_min"] = np.full((n_a, n_P), np.nan)
    out["error_min_stderr"] = np.full((n_a, n_P), np.nan)
    for k in ("t_fall", "t_fall_crit", "t_rise", "t_rise_crit"):
        out[k] = np.full((n_a, n_P), np.nan)
    where = np.full((n_a, n_P), -1, dtype=np.int8)
    resolved = np.zeros((n_a, n_P), dtype=bool)
    per_seed = values.transpose("alpha", "P", "T", "seed").values
    mean, se = stats["mean"].values, stats["stderr"].values
    n_seeds = seeds_with_values(values, ["alpha", "P"]).transpose("alpha", "P").values
    for a in range(n_a):
        for p in range(n_P):
            t_opt, i, code = _argmin_refined(T, mean[a, p], diverged[a, p])
            if i < 0:
                continue
            reps = np.array([_argmin_refined(T, b, diverged[a, p])[0] for b in boot[:, a, p]])
            out["T_opt"][a, p], where[a, p] = t_opt, code
            compared = compared_T(per_seed[a, p])
            i0, il = int(compared[0]), int(compared[-1])
            # smallest -> largest T is a change chosen in advance; one to or from the
            # minimum picks it among the m temperatures
            ok = np.flatnonzero(np.isfinite(mean[a, p]))  # the T the minimum was picked among
            picked = 1 if i in (i0, il) else max(len(ok) - 1, 1)
            # a minimum outside [T_0, T_l] (where few seeds trained) has no change to test
            outside = (math.nan, math.inf)
            fall = _paired_t(per_seed[a, p], i, i0, picked) if i >= i0 else outside
            rise = _paired_t(per_seed[a, p], i, il, picked) if i <= il else outside
            out["t_fall"][a, p], out["t_fall_crit"][a, p] = fall
            out["t_rise"][a, p], out["t_rise_crit"][a, p] = rise
            resolved[a, p] = _resolved(code, fall, rise)
            out["error_min"][a, p], out["error_min_stderr"][a, p] = mean[a, p, i], se[a, p, i]
            if n_boot and np.isfinite(reps).sum() >= MIN_VALID_SHARE * n_boot:
                out["log_T_err"][a, p] = bootstrap_std(np.log(reps), int(n_seeds[a, p]))
            if code == 1 and i + 1 < len(T):
                spread = math.log(T[i + 1] / T[i]) / math.sqrt(12)
                out["log_T_err"][a, p] = max(np.nan_to_num(out["log_T_err"][a, p]), spread)
            err, n = out["log_T_err"][a, p], max(int(n_seeds[a, p]), 2)
            if np.isfinite(err):
                lo, hi = seed_interval(math.log(t_opt), err, n, 0.68)
                out["T_lo"][a, p], out["T_hi"][a, p] = math.exp(lo), math.exp(hi)
    dims = ("alpha", "P")
    coords = {"alpha": stats["alpha"].values, "P": stats["P"].values}
    units = {"long_name": "", "units": "1"}
    return xr.Dataset(
        {
            "T_opt": (dims, out["T_opt"], units | {"long_name": "optimal temperature"}),
            "T_lo": (dims, out["T_lo"], units | {"long_name": "lower end, 68 % interval"}),
            "T_hi": (dims, out["T_hi"], units | {"long_name": "upper end, 68 % interval"}),
            "log_T_err": (dims, out["log_T_err"], units | {"long_name": "std error of ln T_opt"}),
            "error_min": (dims, out["error_min"], units | {"long_name": "lowest test error"}),
            "error_min_stderr": (dims, out["error_min_stderr"], units),
            "where": (dims, where, {"long_name": "class of the minimum, see attrs classes"}),
            "t_fall": (dims, out["t_fall"], units | {"long_name": "paired t, fall to T_opt"}),
            "t_fall_crit": (dims, out["t_fall_crit"], units),
            "t_rise": (dims, out["t_rise"], units | {"long_name": "paired t, rise from T_opt"}),
            "t_rise_crit": (dims, out["t_rise_crit"], units),
            "resolved": (dims, resolved, {"long_name": "the class's changes pass their t tests"}),
        },
        coords=coords,
        attrs={"classes": list(CLASSES), "n_boot": n_boot},
    )


def fit_optimal_temperature(
    table: xr.Dataset,
    P: int | None = None,
    alpha_range: Range = None,
    classes: tuple[str, ...] = ("interior",),
) -> PowerLawFit:
    """Fit T_opt ~ A alpha^k at one P (default: the largest) over the alphas in
    ``alpha_range`` (inclusive; None = all) whose optimum is of one of ``classes``
    (`CLASSES`), weighted by ``log_T_err``, resolved or not (``table["resolved"]`` says
    which: a power law through optima none of which is resolved is a guide only).

    Raises `InsufficientData` with fewer than 3 such alphas."""
    unknown = set(classes) - set(CLASSES)
    if unknown:
        raise ValueError(f"classes must be among {CLASSES}, got {sorted(unknown)}")
    sel = table.sel(P=P if P is not None else int(table["P"].max()))
    use = sel["where"].isin([CLASSES.index(c) for c in classes])
    if alpha_range is not None:
        lo, hi = alpha_range
        if lo is not None:
            use &= sel["alpha"] >= lo
        if hi is not None:
            use &= sel["alpha"] <= hi
    n = int(use.sum())
    if n < 3:
        raise InsufficientData(
            f"T_opt ~ alpha^k needs at least 3 alphas with an optimum of class"
            f" {' or '.join(classes)}, got {n} (classes: {_class_counts(sel)})"
        )
    T_opt = sel["T_opt"].rename("T_opt")
    stderr = (sel["log_T_err"] * T_opt).where(sel["log_T_err"] > 0)
    return fit_power_law(
        T_opt,
        stderr if bool(stderr.where(use).notnull().sum() == n) else None,
        where=use,
        symbols={"alpha": "k"},
        quantity="T_opt",
        range_note=" + ".join(classes) + (f", alpha in {alpha_range}" if alpha_range else ""),
    )


def _class_counts(sel: xr.Dataset) -> str:
    """'interior 4 (2 resolved), ...' over the alphas of one P."""
    codes, resolved = sel["where"].values.ravel(), sel["resolved"].values.ravel()
    return ", ".join(
        f"{name} {int((codes == i).sum())} ({int((resolved & (codes == i)).sum())} resolved)"
        for i, name in enumerate(CLASSES)
    )
