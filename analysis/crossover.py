r"""Crossover temperature :math:`T_c(P)` and its scaling :math:`T_c \sim P^{-a}`.

Two definitions, both at one alpha (default: the largest of the grid, the lazy regime)
and both interpolated in log T between grid points (`analysis.interpolate`):

(a) ``crossover_rel_change``: the smallest T at which the seed-mean relative weight change
    :math:`\|w - w_0\| / \|w_0\|` reaches ``level`` (interpolated in log-log). Default
    level: the geometric mean of all seed means at that alpha, so that the crossing lies
    inside the grid for most P. If :math:`\|w - w_0\|/\|w_0\| = A T^\delta P^\gamma`,
    :math:`T_c = (\mathrm{level}/A)^{1/\delta} P^{-\gamma/\delta}`: the exponent a does
    not depend on the level, its prefactor does.
(b) ``crossover_test_error``: the smallest T at which the seed-mean test error departs
    from its small-T plateau (mean of the ``n_plateau`` = 3 smallest T) by
    ``rel_departure`` = 10 % of the plateau (or by ``abs_departure``), in either
    direction (on the power law through the first two departed points, see
    `analysis.interpolate.plateau_departure`).

Uncertainty: the definition is re-applied to ``n_boot`` bootstrap resamples of the seeds
(`analysis.crossing.crossing_table`: the bootstrap standard error of log T_c and the t
interval built on it). `fit_crossover` fits :math:`T_c \sim P^{-a}` weighted by that
error and refits every bootstrap replicate (`analysis.crossing.fit_crossing`);
`check_ratio` compares a with :math:`\gamma/\delta` of the weight-change fit (the
paper's a = gamma / delta). Definition (a) agrees with gamma / delta by construction
wherever the weight change is the power law above, so its check tests that form; (b),
from the test error, is the independent test of the paper's claim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import xarray as xr

from analysis.aggregate import (
    Include,
    at_alpha,
    bootstrap_std,
    masked,
    mean_stderr,
    t_quantile,
)
from analysis.crossing import Curve, crossing_table, fit_crossing
from analysis.fits import Estimate, InsufficientData, PowerLawFit, Range, ratio
from analysis.interpolate import first_crossing, plateau_departure


def crossover_rel_change(
    ds: xr.Dataset,
    level: float | None = None,
    *,
    alpha: float | None = None,
    include: Include = ("converged",),
    n_boot: int = 200,
    seed: int = 0,
    ci: float = 0.95,
) -> xr.Dataset:
    """T_c(P), definition (a): where ||w - w0|| / ||w0|| reaches ``level``.

    Returns the Dataset described in `crossover_table`; ``attrs["level"]`` holds the level.
    """
    sel = at_alpha(ds, alpha)
    values = masked(sel, "rel_change", include).compute()  # one read; the rest in memory
    means = mean_stderr(values)["mean"].transpose("T", "P")
    if level is None:
        positive = means.values[np.isfinite(means.values) & (means.values > 0)]
        if positive.size == 0:
            raise InsufficientData("rel_change: no converged cell with a positive value")
        level = float(np.exp(np.mean(np.log(positive))))

    def curve(T: np.ndarray, y: np.ndarray) -> float:
        return first_crossing(T, y, level)

    table = _table(values, curve, n_boot=n_boot, seed=seed, ci=ci, means=means)
    table.attrs.update(
        definition=f"(a) T where ||w - w0|| / ||w0|| reaches {level:.4g}",
        short_name=f"(a) rel. change = {level:.3g}",
        level=level,
        alpha=float(sel["alpha"]) if "alpha" in sel.coords else float("nan"),
    )
    return table


def crossover_test_error(
    ds: xr.Dataset,
    rel_departure: float = 0.1,
    abs_departure: float | None = None,
    n_plateau: int = 3,
    *,
    alpha: float | None = None,
    include: Include = ("converged",),
    n_boot: int = 200,
    seed: int = 0,
    ci: float = 0.95,
) -> xr.Dataset:
    """T_c(P), definition (b): where the test error departs from its small-T plateau.

    Returns the Dataset described in `crossover_table`, plus ``plateau`` (over P, the
    seed-mean test error on the plateau) and ``below_grid`` (over P: the seed-mean test
    error departs on the plateau points already, so T_c is below the grid and NaN) and
    ``direction`` (over P: +1 where the seed-mean test error rises past T_c, -1 where it
    falls, 0 where there is no T_c). InsufficientData where the grid has fewer than
    ``n_plateau`` + 1 T.
    """
    n_T = ds.sizes.get("T", 1)
    if n_T < n_plateau + 1:
        raise InsufficientData(
            f"definition (b) needs at least {n_plateau + 1} T ({n_plateau} on the small-T"
            f" plateau and one to depart from it), the grid has {n_T}"
        )
    sel = at_alpha(ds, alpha)
    values = masked(sel, "test_error", include).compute()  # one read; the rest in memory
    means = mean_stderr(values)["mean"].transpose("T", "P")

    def curve(T: np.ndarray, y: np.ndarray) -> float:
        return plateau_departure(T, y, rel_departure, abs_departure, n_plateau)[0]

    table = _table(values, curve, n_boot=n_boot, seed=seed, ci=ci, means=means)
    T = means["T"].values
    departures = [
        plateau_departure(T, means.values[:, j], rel_departure, abs_departure, n_plateau, 0.0)
        for j in range(means.sizes["P"])
    ]
    plateau = [d.plateau for d in departures]
    table["plateau"] = (
        "P",
        list(plateau),
        {"long_name": "test error on the small-T plateau", "units": "1"},
    )
    table["below_grid"] = (
        "P",
        [d.T == 0.0 for d in departures],
        {"long_name": "test error departs on the plateau points (T_c below the grid)"},
    )
    # the sign of the first point past the threshold (T_c, clipped to the grid, can fall
    # on the point below it, which has not departed)
    table["direction"] = (
        "P",
        [
            d.sign if math.isfinite(T_c) else 0
            for d, T_c in zip(departures, table["T_c"].values, strict=True)
        ],
        {"long_name": "the test error rises (+1) or falls (-1) past T_c; 0 where no T_c"},
    )
    amount = (
        f"{abs_departure:g} (absolute)" if abs_departure is not None else f"{rel_departure:.0%}"
    )
    table.attrs.update(
        definition=f"(b) T where the test error departs by {amount} from its plateau"
        f" (mean of the {n_plateau} smallest T)",
        short_name=f"(b) test error {amount} off plateau",
        rel_departure=rel_departure,
        abs_departure=float("nan") if abs_departure is None else abs_departure,
        n_plateau=n_plateau,
        alpha=float(sel["alpha"]) if "alpha" in sel.coords else float("nan"),
    )
    return table


DIRECTION = {1: "rises", -1: "falls", 0: "n/a"}
"""Words for the ``direction`` of `crossover_test_error` (the test error past T_c)."""


@dataclass(frozen=True)
class CrossoverFit:
    """T_c ~ A P^(-a): the exponent a (Estimate) and the underlying log-space fit."""

    a: Estimate
    fit: PowerLawFit
    definition: str


def _table(values: xr.DataArray, curve: Curve, **kwargs) -> xr.Dataset:
    """T_c over P (`analysis.crossing.crossing_table` along T)."""
    return crossing_table(values, curve, "T", "T_c", "crossover temperature T_c", **kwargs)


def fit_crossover(table: xr.Dataset, P_range: Range = None) -> CrossoverFit:
    """Fit T_c ~ P^(-a) to a crossover table (`analysis.crossing.fit_crossing`).

    Raises InsufficientData with fewer than 3 P with a crossover.
    """
    definition = str(table.attrs.get("definition", ""))
    fit = fit_crossing(table, "T_c", "-a", "P", P_range, note=definition)
    slope = fit.exponents["P"]
    a = Estimate(-slope.value, slope.stderr, slope.stderr_boot)
    return CrossoverFit(a=a, fit=fit, definition=definition)


@dataclass(frozen=True)
class RatioCheck:
    """Comparison of the crossover exponent a with gamma / delta.

    difference : a - gamma/delta
    error      : its standard error, sqrt(seed^2 + misfit_a^2 + misfit_ratio^2). seed:
                 where the two fits bootstrapped the same seed resamples
                 (`analysis.aggregate.resample_key`; ``paired`` True), the bootstrap
                 standard error of the paired differences, as a and gamma/delta come from
                 the same seeds and their seed errors are correlated (strongly for
                 definition (a)); misfit: the part of each least-squares error beyond the
                 seed noise its weights state, `misfit_error`, which the bootstrap cannot
                 see (each replicate has the same departure from a power law). Without
                 paired replicates: sqrt(err_a^2 + err_ratio^2) with `Estimate.error`,
                 which assumes the two independent.
    z          : difference / error
    threshold  : the two-sided 95 % quantile of Student's t with n_seeds - 1 degrees of
                 freedom (1.96 without a seed count); |z| < threshold is "consistent".
    """

    a: Estimate
    ratio: Estimate
    difference: float
    error: float
    z: float
    threshold: float
    paired: bool

    @property
    def consistent(self) -> bool:
        return math.isfinite(self.z) and abs(self.z) < self.threshold


def misfit_error(estimate: Estimate, fit: PowerLawFit) -> float:
    """The part of ``estimate``'s least-squares error (from ``fit``) beyond the noise that
    the fit's weights state: stderr * sqrt(1 - 1 / chi2_red) for a weighted fit with
    chi2_red > 1 (its covariance was scaled by chi2_red), else 0; an unweighted fit has
    no stated noise, so all of its stderr."""
    if not fit.weighted:
        return estimate.stderr
    chi2 = fit.chi2_red
    return estimate.stderr * math.sqrt(1 - 1 / chi2) if math.isfinite(chi2) and chi2 > 1 else 0.0


def check_ratio(crossover: CrossoverFit, rel_change_fit: PowerLawFit) -> RatioCheck:
    """Check a (from T_c ~ P^-a) against gamma / delta of ||w - w0||/||w0|| ~ T^delta P^gamma.

    On synthetic T-sweeps where a = gamma/delta holds (definition (a), power laws times
    seed noise, 200 sweeps each of 3, 5 and 10 seeds), |z| fell under the threshold in
    98.5, 96.5 and 95 % of them; the independent-error formula did in 100 %, with a median |z| of
    0.35, so it could not see a disagreement of a few errors.
    """
    r = ratio(rel_change_fit, "gamma", "delta")
    diff = crossover.a.value - r.value
    fa, fr = crossover.fit, rel_change_fit
    paired = (
        fa.resamples is not None
        and fa.resamples == fr.resamples
        and fa.boot is not None
        and fr.boot is not None
    )
    n_seeds = fr.n_seeds or fa.n_seeds
    if paired:
        i, j = (fr.variables.index(fr.variable(k)) + 1 for k in ("gamma", "delta"))
        a_boot = -fa.boot[:, fa.variables.index("P") + 1]
        seed = float(bootstrap_std(a_boot - fr.boot[:, i] / fr.boot[:, j], n_seeds))
        paired = math.isfinite(seed)
    if paired:
        err = math.hypot(seed, misfit_error(crossover.a, fa), misfit_error(r, fr))
    else:
        err = math.hypot(crossover.a.error, r.error)
    z = diff / err if err > 0 else float("nan")
    threshold = t_quantile(n_seeds, 0.975) if n_seeds and n_seeds >= 2 else 1.96
    return RatioCheck(
        a=crossover.a,
        ratio=r,
        difference=diff,
        error=err,
        z=z,
        threshold=threshold,
        paired=paired,
    )
