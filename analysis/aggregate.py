"""Seed statistics of a cube, counting only cells of the chosen outcomes.

Conventions
-----------
- A cell enters a statistic only if it is ``done`` and its ``outcome`` is one of the
  ``include`` names (default: converged only). Missing, diverged and unfinished cells are
  never averaged in unless named; non-finite values of included cells are skipped too.
- ``n`` is the number of seeds that entered; the standard error is
  ``std(ddof=1) / sqrt(n)`` and is NaN when ``n < 2``.
- The bootstrap resamples seeds with replacement, jointly for every (alpha, T, P): one
  seed index is one member (its init, training set and batch draws), so resampling the
  same draw everywhere keeps the correlations between cells of the same seed.
- Bootstrap errors from n seeds (`bootstrap_std`): the replicates' standard deviation
  times sqrt(n / (n - 1)), since the bootstrap variance of a mean of n seeds is
  (n - 1) / n times s^2 / n. Intervals (`seed_interval`): estimate +- Student's t quantile
  with n - 1 degrees of freedom times that error (a percentile interval of a 3-5 seed
  bootstrap covered 68-84 % where it claimed 95 %: README, "Conventions").

Every function returns lazy (dask-backed) xarray objects when given datasets from
``xarray.open_zarr``; nothing is computed here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr
from scipy import stats

from ensemble.schema import DIMS, MISSING, OUTCOME_FLAGS

OUTCOME_CODES: dict[str, int] = {name: code for code, name in OUTCOME_FLAGS.items()}
"""Outcome name -> flag value (``missing``, ``converged``, ``diverged``, ``unfinished``)."""

INCLUDABLE: tuple[str, ...] = tuple(name for code, name in OUTCOME_FLAGS.items() if code)
"""Outcomes that may be averaged (``missing`` cells have no values)."""

Include = Sequence[str]

MIN_VALID_SHARE = 0.9
"""A bootstrap error or interval is given only where at least this share of the replicates
has a finite estimate (e.g. a crossing inside the grid); elsewhere it would describe a
minority of resamples."""


def outcome_codes(include: Include) -> list[int]:
    """Flag values of the outcome names in ``include``; raise naming any unknown one."""
    if isinstance(include, str):
        include = (include,)
    bad = [name for name in include if name not in INCLUDABLE]
    if bad or not include:
        raise ValueError(
            f"include must name one or more of {INCLUDABLE}, got {tuple(include)!r}"
            f" (unknown: {bad})"
        )
    return [OUTCOME_CODES[name] for name in include]


def effective_outcome(ds: xr.Dataset) -> xr.DataArray:
    """``outcome`` with cells that are not ``done`` counted as missing (int8, lazy)."""
    return ds["outcome"].where(ds["done"].astype(bool), MISSING).astype(np.int8)


def included(ds: xr.Dataset, include: Include = ("converged",)) -> xr.DataArray:
    """Boolean mask over the cells that are done and whose outcome is in ``include``."""
    return effective_outcome(ds).isin(outcome_codes(include))


def masked(
    ds: xr.Dataset, var: str | xr.DataArray, include: Include = ("converged",)
) -> xr.DataArray:
    """Values of ``var`` (a name, or a DataArray derived from ``ds``) with every cell
    outside ``include`` and every non-finite value set to NaN."""
    values = ds[var] if isinstance(var, str) else var
    keep = included(ds, include) & np.isfinite(values)
    out = values.where(keep)
    out.attrs = dict(values.attrs)
    return out


def mean_stderr(values: xr.DataArray, dim: str = "seed") -> xr.Dataset:
    """Mean, standard error and count of the non-NaN ``values`` along ``dim``.

    Returns a Dataset with ``mean`` (NaN where n = 0), ``stderr`` (NaN where n < 2) and
    ``n`` (int); ``mean`` and ``stderr`` keep the units of ``values``.
    """
    valid = values.notnull()
    n = valid.sum(dim)
    total = values.fillna(0.0).sum(dim)
    # Dividing by NaN (not 0) where no seed entered keeps dask free of 0/0 warnings.
    mean = total / n.where(n > 0)
    square_dev = ((values - mean) ** 2).fillna(0.0).sum(dim)
    stderr = np.sqrt(square_dev / ((n - 1) * n).where(n >= 2))
    attrs = dict(values.attrs)
    mean.attrs = attrs
    stderr.attrs = {**attrs, "long_name": f"standard error of the seed mean of {values.name}"}
    n.attrs = {"long_name": "seeds that entered the mean", "units": "1"}
    return xr.Dataset({"mean": mean, "stderr": stderr, "n": n})


def seed_mean(
    ds: xr.Dataset,
    var: str | xr.DataArray,
    include: Include = ("converged",),
    dim: str = "seed",
) -> xr.Dataset:
    """Seed mean of ``var`` over the cells in ``include``, with stderr and count.

    See `mean_stderr` for the returned Dataset (``mean``, ``stderr``, ``n``).
    """
    return mean_stderr(masked(ds, var, include), dim)


def outcome_counts(ds: xr.Dataset, dims: Sequence[str] | None = ("seed",)) -> xr.DataArray:
    """Number of cells of each outcome, summed over ``dims`` (None: over every cell dim).

    Returns an int DataArray with a new leading dimension ``outcome`` labelled by the
    outcome names (missing, converged, diverged, unfinished). Cells not ``done`` count
    as missing.
    """
    dims = list(DIMS) if dims is None else list(dims)
    flag = effective_outcome(ds)
    names = list(OUTCOME_FLAGS.values())
    counts = xr.concat(
        [(flag == code).sum(dims) for code in OUTCOME_FLAGS],
        dim=xr.DataArray(names, dims="outcome", name="outcome"),
    )
    counts.name = "count"
    counts.attrs = {"long_name": "cells per outcome", "units": "cells"}
    return counts


def at_alpha(ds: xr.Dataset, alpha: float | None = None) -> xr.Dataset:
    """The cells at one output scale: ``alpha`` (nearest grid value) or, when None, the
    largest alpha of the grid (the lazy regime, where the T-sweep scaling laws hold)."""
    if "alpha" not in ds.dims:
        return ds
    if alpha is None:
        alpha = float(ds["alpha"].max())
    return ds.sel(alpha=alpha, method="nearest")


def resample_counts(n_seed: int, n_boot: int, rng: np.random.Generator | int | None) -> np.ndarray:
    """(n_boot, n_seed) int array: how often each seed is drawn in each bootstrap
    resample (multinomial, n_seed draws with replacement)."""
    rng = np.random.default_rng(rng)
    return rng.multinomial(n_seed, np.full(n_seed, 1.0 / n_seed), size=n_boot)


def bootstrap_mean(
    values: xr.DataArray,
    n_boot: int,
    rng: np.random.Generator | int | None = 0,
    dim: str = "seed",
) -> xr.DataArray:
    """Seed means of ``values`` (NaN = excluded) for ``n_boot`` bootstrap resamples.

    The same resample of seed indices is used for every cell. Returns a lazy DataArray
    with a new dimension ``bootstrap``; a replicate is NaN where none of its drawn
    seeds has a value.
    """
    counts = xr.DataArray(resample_counts(values.sizes[dim], n_boot, rng), dims=("bootstrap", dim))
    weight = values.notnull() * counts
    total = (values.fillna(0.0) * counts).sum(dim)
    n = weight.sum(dim)
    out = total / n.where(n > 0)
    out.attrs = dict(values.attrs)
    return out


def resample_key(values: xr.DataArray, n_boot: int, seed: int, dim: str = "seed") -> tuple:
    """What `bootstrap_mean` (``values``, ``n_boot``, Generator seeded with ``seed``) draws:
    the labels of ``dim``, n_boot and the seed. Two estimates bootstrapped with equal keys
    drew the same seeds in each replicate, so their replicates are paired and the spread
    of a difference of replicates is the standard error of the difference."""
    return (tuple(values[dim].values.tolist()), n_boot, seed)


def seeds_with_values(values: xr.DataArray, keep: Sequence[str] = ()) -> xr.DataArray:
    """How many seeds have at least one value (not NaN) in ``values``, for each point of
    the dimensions ``keep`` (every other dimension but ``seed`` is reduced): the n of
    `bootstrap_std` and `seed_interval`."""
    reduce = [d for d in values.dims if d not in (*keep, "seed")]
    return values.notnull().any(reduce).sum("seed")


def compared_T(values: np.ndarray) -> np.ndarray:
    """Indices of the temperatures between which changes of ``values[T, seed]`` (NaN where
    a cell is left out) are read: those where at least half as many seeds have a value as
    at the best-covered T, and 2 or more. Near an edge of stability the few seeds that
    still train are a selected few that pair with little. Where fewer than 2 T qualify,
    those with 2 seeds or more, else every T with a value."""
    counts = np.isfinite(np.asarray(values, dtype=float)).sum(-1)
    for need in (max(2, math.ceil(counts.max(initial=0) / 2)), 2):
        idx = np.flatnonzero(counts >= need)
        if len(idx) >= 2:
            return idx
    return np.flatnonzero(counts >= 1)


def bootstrap_std(reps: np.ndarray, n_seeds: int, axis: int = 0) -> np.ndarray:
    """Standard error from bootstrap replicates of an estimate over ``n_seeds`` seeds:
    their standard deviation along ``axis`` (non-finite replicates skipped) times
    sqrt(n / (n - 1)). NaN where fewer than 2 replicates are finite or ``n_seeds`` < 2."""
    reps = np.asarray(reps, dtype=float)
    finite = np.isfinite(reps)
    ok = finite.sum(axis=axis) >= 2
    if n_seeds < 2:
        return np.full(ok.shape, np.nan)[()]
    with warnings.catch_warnings():  # slices of < 2 finite replicates: NaN, set below
        warnings.simplefilter("ignore", RuntimeWarning)
        sd = np.nanstd(np.where(finite, reps, np.nan), axis=axis, ddof=1)
    return np.where(ok, sd * math.sqrt(n_seeds / (n_seeds - 1)), np.nan)[()]


def t_quantile(n_seeds: int, q: float) -> float:
    """Student's t quantile ``q`` with ``n_seeds`` - 1 degrees of freedom (NaN below 2)."""
    return float(stats.t.ppf(q, n_seeds - 1)) if n_seeds >= 2 else math.nan


def seed_interval(
    estimate: np.ndarray, error: np.ndarray, n_seeds: int, level: float
) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided ``level`` interval estimate +- t_(n-1) error (see the conventions)."""
    half = t_quantile(n_seeds, (1 + level) / 2) * np.asarray(error, dtype=float)
    return estimate - half, estimate + half


@dataclass(frozen=True)
class Change:
    """A paired change of the test error between two temperatures i -> j.

    diff      : mean over the seeds converged at both of err[j, seed] - err[i, seed]
    t         : |diff| / its standard error (NaN with fewer than 2 such seeds; inf where
                every seed changed by the same nonzero amount)
    threshold : the two-sided t quantile it must exceed (NaN with fewer than 2 seeds)
    n         : seeds converged at both temperatures
    level     : the two-sided level, 0.05 / the comparisons it was picked among
    """

    diff: float
    t: float
    threshold: float
    n: int
    level: float = 0.05

    @property
    def sign_p(self) -> float:
        """Where every seed changed by the same nonzero amount (t = inf: the t test has no
        spread to judge by; test errors are multiples of 1 / the test set's size, so few
        seeds can agree exactly), the exact two-sided sign test's p = 2 / 2^n; else NaN."""
        return 2.0 ** (1 - self.n) if math.isinf(self.t) else math.nan

    @property
    def counts(self) -> bool:
        """Whether the change passes: t > threshold, or the sign test where t = inf."""
        if math.isinf(self.t):
            return self.sign_p <= self.level
        return bool(self.t > self.threshold)  # False where either is NaN

    def text(self) -> str:
        """'t = 5.2 > 2.57, 6 seeds', or where every seed changed alike 'the same in all
        2 seeds, sign test p = 0.5 > 0.05'."""
        if math.isinf(self.t):
            return (
                f"the same in all {self.n} seeds, sign test p = {self.sign_p:.2g}"
                f" {'<=' if self.counts else '>'} {self.level:.2g}"
            )
        return (
            f"t = {self.t:.1f} {'>' if self.counts else '<='} {self.threshold:.2f}, {self.n} seeds"
        )


def paired_change(values: np.ndarray, i: int, j: int, comparisons: int = 1) -> Change:
    """The change of ``values[T, seed]`` (NaN where a cell is left out) from T index i to
    j, paired by seed: a seed fixes the initial weights, the training set and the batch
    sequence at every T, so the per-seed differences carry none of the seed-to-seed
    spread. It counts beyond Student's t_(n-1) at 1 - 0.025 / ``comparisons`` (two-sided
    5 %, Bonferroni-corrected where i or j was picked among ``comparisons`` candidates);
    where every seed changed by the same nonzero amount, by the exact sign test at that
    level (`Change.sign_p`: 2 seeds never pass, 6 do at 5 %)."""
    ends = np.stack([values[i], values[j]]).astype(float)
    ends = ends[:, np.isfinite(ends).all(0)]
    d = ends[1] - ends[0]
    n = int(d.size)
    level = 0.05 / comparisons
    if n == 0:
        return Change(math.nan, math.nan, math.nan, 0, level)
    diff = float(d.mean())
    if n < 2:
        return Change(diff, math.nan, math.nan, n, level)
    # the same change in every seed, up to the float32 rounding of the stored values
    # (about 6e-8 of each; distinct test errors differ by 1 / pte >= 1e-5 or so)
    if np.ptp(d) <= 1e-6 * np.abs(ends).max():
        t = math.inf if diff else 0.0
    else:
        t = abs(diff) / (float(d.std(ddof=1)) / math.sqrt(n))
    return Change(diff, t, t_quantile(n, 1 - 0.025 / comparisons), n, level)
