"""The divergence temperature of a phase diagram: T_div(alpha, P), the T at which half
of the seeds diverge (science.md: training that blows up is "diverged", an outcome of
its own).

SGD with a step dt too large for the loss landscape's curvature diverges; with T =
dt / (h B) that edge of stability is a temperature, and in the feature regime the
lowest test error can sit just below it (`analysis.optimal`, class "stability edge").
T_div locates the edge from the outcomes alone: the fraction of diverged seeds among
the cells that finished (converged, diverged or out of budget; missing cells do not
count) against T, and the first T where it reaches one half, interpolated between that
grid T and the one below by `analysis.interpolate.first_crossing` (in log T, and in the
log of the fraction where both fractions are > 0). The fit T_div ~ alpha^k compares the
edge's scaling with that of T_opt.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from analysis.aggregate import outcome_counts
from analysis.fits import InsufficientData, PowerLawFit, fit_power_law
from analysis.interpolate import first_crossing

HALF = 0.5
"""The diverged fraction that defines T_div."""


def divergence_temperature(ds: xr.Dataset) -> xr.Dataset:
    """T_div over (alpha, P) of a group with several T.

    Returns a computed Dataset with dims (alpha, P): ``T_div`` (NaN where the fraction
    never reaches one half on the grid, or already does at the smallest T with cells),
    ``above_grid`` (no T of the grid has half its seeds diverged), ``below_grid`` (the
    smallest T already has), and ``diverged_fraction`` over (alpha, T, P).
    """
    counts = outcome_counts(ds).transpose("outcome", "alpha", "T", "P")
    finished = counts.sum("outcome") - counts.sel(outcome="missing")
    frac = (counts.sel(outcome="diverged") / finished.where(finished > 0)).compute()
    T = frac["T"].values.astype(float)
    shape = (frac.sizes["alpha"], frac.sizes["P"])
    T_div = np.full(shape, np.nan)
    above, below = np.zeros(shape, bool), np.zeros(shape, bool)
    for a in range(shape[0]):
        for p in range(shape[1]):
            f = frac.values[a, :, p]
            ok = np.isfinite(f)
            if not ok.any():
                continue
            above[a, p] = bool(f[ok].max() < HALF)
            below[a, p] = bool(f[ok][0] >= HALF)
            if not (above[a, p] or below[a, p]):
                T_div[a, p] = first_crossing(T, f, HALF)
    dims = ("alpha", "P")
    coords = {"alpha": frac["alpha"].values, "P": frac["P"].values}
    return xr.Dataset(
        {
            "T_div": (dims, T_div, {"long_name": "T where half the seeds diverge", "units": "1"}),
            "above_grid": (dims, above, {"long_name": "fewer than half diverge at every T"}),
            "below_grid": (dims, below, {"long_name": "half diverge at the smallest T"}),
            "diverged_fraction": (("alpha", "T", "P"), frac.values, {"units": "1"}),
        },
        coords=coords | {"T": T},
        attrs={"level": HALF},
    )


def fit_divergence_temperature(
    table: xr.Dataset, P: int | None = None, alpha_max: float = math.inf
) -> PowerLawFit:
    """Fit T_div ~ A alpha^k at one P (default: the largest) over the alphas <=
    ``alpha_max`` with a T_div, unweighted (T_div carries no seed error of its own).
    Raises `InsufficientData` with fewer than 3 such alphas."""
    sel = table.sel(P=P if P is not None else int(table["P"].max()))
    use = np.isfinite(sel["T_div"]) & (sel["alpha"] <= alpha_max)
    n = int(use.sum())
    if n < 3:
        raise InsufficientData(
            f"T_div ~ alpha^k needs at least 3 alphas <= {alpha_max:g} where half the seeds"
            f" diverge inside the grid, got {n}"
        )
    return fit_power_law(
        sel["T_div"].rename("T_div"),
        None,
        where=use,
        symbols={"alpha": "k"},
        quantity="T_div",
        range_note=f"alpha <= {alpha_max:g}" if math.isfinite(alpha_max) else "",
    )
