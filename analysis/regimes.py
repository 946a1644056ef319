r"""The lazy / feature-learning boundary of a phase diagram from the NTK change.

The change of the empirical NTK, mean((K - K0)^2) / mean(K0^2) (``ntk_change``, measured
where a sweep sets ``ntk_points``; see `ensemble.ntk`), falls with alpha: near 0 in the
lazy regime, of order 1 and beyond where features are learned. ``ntk_boundary`` gives,
for each (T, P), the alpha* where the seed-mean change is ``level`` (1 by default):
scanning from the largest alpha down, the first grid alpha whose mean reaches the level,
interpolated with its right neighbour linearly in (log alpha, log change).

Errors (`analysis.crossing.crossing_table`): the definition re-applied to bootstrap
resamples of the seeds (the same seeds in every cell): the standard error of ln alpha*
and its t interval, only where alpha* is found and enough replicates find one.
``fit_ntk_boundary`` fits alpha* ~ P^k at one T over the P of the sweep, or alpha* ~ T^s
at one P over its T: the slope of the boundary line in the (alpha, T) phase diagram.

``lazy_side`` says whether one alpha (the grid's largest, where the T-sweep laws are
fitted) is lazy by the same measure: its seed-mean change below ``level`` at every T and P.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from analysis.aggregate import Include, at_alpha, masked, seed_mean
from analysis.crossing import crossing_table, fit_crossing
from analysis.fits import InsufficientData, PowerLawFit, Range
from analysis.interpolate import first_crossing


def ntk_boundary(
    ds: xr.Dataset,
    level: float = 1.0,
    *,
    include: Include = ("converged",),
    n_boot: int = 200,
    seed: int = 0,
    ci: float = 0.95,
) -> xr.Dataset:
    """alpha*(T, P) where the seed-mean NTK change is ``level``.

    Returns the `analysis.crossing.crossing_table` over (T, P) named ``alpha_star``
    (NaN where the change is on one side of the level at every alpha of the grid, or
    where its largest alpha already reaches it), with ``alpha_star_low`` /
    ``alpha_star_high`` and ``log_alpha_star_stderr``; attrs add ``level``. Raises
    InsufficientData without an ``ntk_change`` variable or with fewer than 2 alpha.
    """
    if "ntk_change" not in ds:
        raise InsufficientData("no ntk_change in this experiment: its sweep did not set ntk_points")
    if ds.sizes.get("alpha", 1) < 2:
        raise InsufficientData("the NTK boundary needs at least 2 alpha")
    values = masked(ds, "ntk_change", include).transpose("T", "P", "alpha", "seed").compute()

    def star(alpha: np.ndarray, change: np.ndarray) -> float:
        # scanned in 1 / alpha, increasing from the lazy end (log-log interpolation alike)
        return 1.0 / first_crossing(1.0 / alpha[::-1], change[::-1], level)

    table = crossing_table(
        values,
        star,
        "alpha",
        "alpha_star",
        f"alpha where the NTK change is {level:g}",
        n_boot=n_boot,
        seed=seed,
        ci=ci,
    )
    table.attrs["level"] = level
    return table


def fit_ntk_boundary(
    table: xr.Dataset, *, T: float | None = None, P: int | None = None, fit_range: Range = None
) -> PowerLawFit:
    """The power law of an `ntk_boundary` table along one dimension, weighted by its
    bootstrap error: at one ``T``, alpha* ~ A P^k over the P (symbol ``k``); at one ``P``,
    alpha* ~ A T^s over the T (symbol ``s``). Give exactly one of them. Raises
    InsufficientData with fewer than 3 points where alpha* is found."""
    if (T is None) == (P is None):
        raise ValueError("fit_ntk_boundary: give exactly one of T (fit over P) or P (fit over T)")
    level = f"NTK change = {table.attrs['level']:g}"
    if P is None:
        line, over, symbol, note = table.sel(T=T), "P", "k", f"{level} at T = {T:g}"
    else:
        line, over, symbol, note = table.sel(P=P), "T", "s", f"{level} at P = {P:g}"
    return fit_crossing(line, "alpha_star", symbol, over, fit_range, note=note)


@dataclass(frozen=True)
class LazySide:
    """The NTK change at one alpha: its largest seed mean over the (T, P) cells with one,
    where it is, and whether it stays below ``level`` (lazy by the boundary's measure)."""

    alpha: float
    level: float
    largest: float
    T: float
    P: int
    cells: int

    @property
    def lazy(self) -> bool:
        return self.largest < self.level


def lazy_side(
    ds: xr.Dataset,
    alpha: float | None = None,
    level: float = 1.0,
    *,
    include: Include = ("converged",),
) -> LazySide:
    """Whether ``alpha`` (default: the grid's largest) is on the lazy side of the NTK
    boundary at every T and P. Raises InsufficientData without an ``ntk_change`` variable
    or where no cell at that alpha has a seed mean."""
    if "ntk_change" not in ds:
        raise InsufficientData("no ntk_change in this experiment: its sweep did not set ntk_points")
    cells = at_alpha(ds, alpha)
    mean = seed_mean(cells, "ntk_change", include)["mean"].compute()
    n = int(np.isfinite(mean.values).sum())
    if not n:
        raise InsufficientData(f"no NTK change converged at alpha = {float(cells['alpha']):g}")
    top = mean.fillna(-np.inf).argmax(...)
    at = mean.isel(top)
    return LazySide(float(cells["alpha"]), level, float(at), float(at["T"]), int(at["P"]), n)
