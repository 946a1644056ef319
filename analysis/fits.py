r"""Power-law fits of seed means, by least squares in log space.

Model: :math:`\log y = \log A + \sum_k e_k \log x_k` over the grid variables ``x_k``
(``T``, ``P``), fitted to the seed means of the converged cells.

Conventions
-----------
- Weights: each point has the log-space error ``sigma = stderr / mean`` of its seed mean.
  `fit_scaling` pools the seeds' relative spread over the fit points (`pooled_stderr`):
  ``sigma_i = s / sqrt(n_i)`` for a point of n_i seeds, rather than each point's own
  estimate from its few seeds. In `fit_power_law`, points without a standard error get
  the largest sigma of the others; if no point has one, the fit is unweighted.
- Parameter covariance: ``(A^T W A)^{-1}`` of the weighted least squares, multiplied by
  the reduced chi^2 when it exceeds 1 (the scatter around the power law is then larger
  than the seed noise, e.g. curvature; never shrunk below the seed errors). Unweighted
  fits scale by the residual variance.
- Optional bootstrap over seeds (`analysis.aggregate.bootstrap_mean`): refits with the
  same points and weights; ``stderr_boot`` is the standard deviation of the refitted
  parameters times sqrt(n / (n - 1)) for n seeds (`analysis.aggregate.bootstrap_std`).
  `Estimate.error` is the larger of the two.
- Default range ("lazy"): at the largest alpha of the grid, for each P the temperatures
  up to the test-error crossover :math:`T_c^{(b)}(P)` (see `lazy_mask`, the definition (b)
  of `analysis.crossover`): the lazy, small-T part where the paper's
  :math:`\|w - w_0\| / \|w_0\| \sim T^\delta P^\gamma` and :math:`t^* \sim T^c P^b` are
  stated. Where no crossover is found for a P, all its T are kept. ``fit_range="all"``
  uses every point; ``T_range`` / ``P_range`` restrict further (inclusive bounds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from analysis.aggregate import (
    Include,
    at_alpha,
    bootstrap_mean,
    bootstrap_std,
    masked,
    mean_stderr,
    resample_key,
    seed_mean,
    seeds_with_values,
)
from analysis.interpolate import plateau_departure

Range = tuple[float | None, float | None] | None


class InsufficientData(ValueError):
    """Too few usable points for a fit or a crossover; the message says why."""


@dataclass(frozen=True)
class Estimate:
    """A fitted number with its standard error (lstsq) and bootstrap standard error."""

    value: float
    stderr: float
    stderr_boot: float = float("nan")

    @property
    def error(self) -> float:
        """The larger of the two standard errors (the lstsq one if no bootstrap)."""
        if math.isfinite(self.stderr_boot):
            return max(self.stderr, self.stderr_boot)
        return self.stderr

    def __str__(self) -> str:
        return f"{self.value:.3f} ± {self.error:.3f}"


@dataclass(frozen=True)
class PowerLawFit:
    r"""Result of :math:`y = A \prod_k x_k^{e_k}` fitted in log space.

    quantity      : name of y (a cube variable or a derived quantity)
    variables     : grid variables x_k, e.g. ("T", "P")
    symbols       : variable -> exponent symbol, e.g. {"T": "delta", "P": "gamma"}
    exponents     : variable -> Estimate of e_k
    log_prefactor : Estimate of ln A
    covariance    : lstsq covariance of (ln A, e_1, ..., e_k)
    boot          : (n_boot, 1 + k) bootstrap refits of (ln A, e_k), one row per replicate
                    (NaN where a replicate has too few points to refit), or None
    used          : bool DataArray over the variables, True where a point entered
    n_seeds       : seeds the bootstrap resampled (None without a bootstrap)
    resamples     : `analysis.aggregate.resample_key` of those resamples (None without);
                    fits with equal keys have paired replicates (same seeds drawn in row i)
    """

    quantity: str
    variables: tuple[str, ...]
    symbols: dict[str, str]
    exponents: dict[str, Estimate]
    log_prefactor: Estimate
    covariance: np.ndarray
    n_points: int
    chi2_red: float
    weighted: bool
    used: xr.DataArray
    range_note: str = ""
    boot: np.ndarray | None = field(default=None, repr=False)
    n_seeds: int | None = None
    resamples: tuple | None = None

    def variable(self, key: str) -> str:
        """The variable named by ``key``, a variable (``"T"``) or a symbol (``"delta"``)."""
        if key in self.variables:
            return key
        for var, symbol in self.symbols.items():
            if symbol == key:
                return var
        raise KeyError(
            f"{key!r} is neither a variable {self.variables} nor a symbol {self.symbols}"
        )

    def __getitem__(self, key: str) -> Estimate:
        """Exponent by variable (``"T"``) or by symbol (``"delta"``)."""
        return self.exponents[self.variable(key)]

    def predict(self, **coords: np.ndarray | float) -> np.ndarray:
        """A prod_k x_k^e_k at the given coordinates (numpy broadcasting)."""
        log_y = self.log_prefactor.value
        for var in self.variables:
            log_y = log_y + self.exponents[var].value * np.log(np.asarray(coords[var], float))
        return np.exp(log_y)


def fit_power_law(
    mean: xr.DataArray,
    stderr: xr.DataArray | None = None,
    *,
    where: xr.DataArray | None = None,
    symbols: Mapping[str, str] | None = None,
    quantity: str | None = None,
    boot_means: xr.DataArray | None = None,
    n_seeds: int | None = None,
    resamples: tuple | None = None,
    range_note: str = "",
) -> PowerLawFit:
    """Fit ``mean ~ A prod_k x_k^e_k`` over the dimensions of ``mean`` (the variables).

    mean       : seed means, dims = the fit variables (e.g. T, P); only points with a
                 finite mean > 0 (and ``where`` True) enter
    stderr     : standard errors of ``mean`` (same dims), or None for an unweighted fit
    boot_means : bootstrap replicates of ``mean`` with an extra ``bootstrap`` dim; each
                 replicate is refitted with the same points and weights
    n_seeds    : the seeds ``boot_means`` resampled (required with it)
    resamples  : `analysis.aggregate.resample_key` of those resamples (for pairing fits)
    Raises InsufficientData when fewer than (number of variables + 2) points remain or a
    variable takes fewer than 2 distinct values among them.
    """
    if boot_means is not None and n_seeds is None:
        raise ValueError("boot_means needs n_seeds, the seeds its replicates resampled")
    variables = tuple(str(d) for d in mean.dims)
    symbols = dict(symbols or {v: f"e_{v}" for v in variables})
    quantity = quantity or str(mean.name)
    y = np.asarray(mean.values, dtype=float)
    grids = np.meshgrid(*[np.asarray(mean[v].values, float) for v in variables], indexing="ij")
    use = np.isfinite(y) & (y > 0)
    if where is not None:
        use &= np.asarray(where.transpose(*variables).values, dtype=bool)
    _check_points(use, grids, variables, quantity)
    design = np.column_stack([np.ones(use.sum())] + [np.log(g[use]) for g in grids])
    log_y = np.log(y[use])
    sigma, weighted = _log_sigma(y, stderr, use, variables)

    theta, cov, chi2_red = _lstsq(design, log_y, sigma, weighted)
    boot = None
    if boot_means is not None:
        yb_all = np.asarray(boot_means.transpose("bootstrap", *variables).values, dtype=float)
        boot = np.full((len(yb_all), design.shape[1]), np.nan)
        for b, yb in enumerate(yb_all):
            yb = yb[use]
            ok = np.isfinite(yb) & (yb > 0)
            if (
                ok.sum() >= design.shape[1] + 1
                and np.linalg.matrix_rank(design[ok]) == design.shape[1]
            ):
                boot[b] = _lstsq(design[ok], np.log(yb[ok]), sigma[ok], weighted)[0]
    boot_std = (
        bootstrap_std(boot, n_seeds) if boot is not None else np.full(design.shape[1], np.nan)
    )
    err = np.sqrt(np.diag(cov))
    exponents = {
        v: Estimate(float(theta[i + 1]), float(err[i + 1]), float(boot_std[i + 1]))
        for i, v in enumerate(variables)
    }
    used = xr.DataArray(use, dims=variables, coords={v: mean[v].values for v in variables})
    return PowerLawFit(
        quantity=quantity,
        variables=variables,
        symbols=symbols,
        exponents=exponents,
        log_prefactor=Estimate(float(theta[0]), float(err[0]), float(boot_std[0])),
        covariance=cov,
        n_points=int(use.sum()),
        chi2_red=chi2_red,
        weighted=weighted,
        used=used,
        range_note=range_note,
        boot=boot,
        n_seeds=n_seeds,
        resamples=resamples if boot is not None else None,
    )


def _check_points(
    use: np.ndarray, grids: list[np.ndarray], variables: tuple, quantity: str
) -> None:
    n_need = len(variables) + 2
    if use.sum() < n_need:
        raise InsufficientData(
            f"{quantity}: {int(use.sum())} usable points (finite seed mean > 0 in the fit"
            f" range), a fit of {len(variables)} exponent(s) needs at least {n_need}"
        )
    for var, g in zip(variables, grids, strict=True):
        values = np.unique(g[use])
        if len(values) < 2:
            raise InsufficientData(
                f"{quantity}: the fit range has a single {var} = {values[0]:g},"
                f" the {var} exponent needs at least 2 distinct values"
            )


def _log_sigma(
    y: np.ndarray, stderr: xr.DataArray | None, use: np.ndarray, variables: tuple
) -> tuple[np.ndarray, bool]:
    if stderr is None:
        return np.ones(use.sum()), False
    sigma = np.asarray(stderr.transpose(*variables).values, dtype=float)[use] / y[use]
    good = np.isfinite(sigma) & (sigma > 0)
    if not good.any():
        return np.ones(use.sum()), False
    return np.where(good, sigma, sigma[good].max()), True


def _lstsq(
    design: np.ndarray, log_y: np.ndarray, sigma: np.ndarray, weighted: bool
) -> tuple[np.ndarray, np.ndarray, float]:
    a = design / sigma[:, None]
    b = log_y / sigma
    theta, *_ = np.linalg.lstsq(a, b, rcond=None)
    dof = len(log_y) - design.shape[1]
    chi2 = float(np.sum((b - a @ theta) ** 2))
    chi2_red = chi2 / dof if dof > 0 else float("nan")
    cov = np.linalg.pinv(a.T @ a)
    if weighted:
        cov = cov * max(1.0, chi2_red if math.isfinite(chi2_red) else 1.0)
    else:
        cov = cov * (chi2_red if math.isfinite(chi2_red) else float("nan"))
    return theta, cov, chi2_red


def lazy_mask(
    ds: xr.Dataset,
    alpha: float | None = None,
    include: Include = ("converged",),
    rel_departure: float = 0.1,
    n_plateau: int = 3,
) -> xr.DataArray:
    """Default fit range: for each P, the T up to the test-error crossover.

    Uses the seed-mean test error at ``alpha`` (default: the largest) and the departure
    from its small-T plateau by ``rel_departure`` (definition (b) of
    `analysis.crossover`). Returns a bool DataArray over (T, P); a P whose test error
    never departs keeps all its T, one whose test error departs already on the plateau
    points (the crossover is below the grid) keeps none. Computes the test-error seed
    means.
    """
    sel = at_alpha(ds, alpha)
    err = seed_mean(sel, "test_error", include)["mean"].transpose("T", "P").compute()
    T = err["T"].values
    keep = np.ones(err.shape, dtype=bool)
    for j in range(err.sizes["P"]):
        T_c = plateau_departure(T, err.values[:, j], rel_departure, n_plateau=n_plateau, below=0).T
        if math.isfinite(T_c):  # T_c clipped onto a grid T can come back 1 ulp under it
            keep[:, j] = T <= T_c * (1 + 1e-12)
    return xr.DataArray(keep, dims=("T", "P"), coords={"T": T, "P": err["P"].values})


def range_mask(ds: xr.Dataset, T_range: Range = None, P_range: Range = None) -> xr.DataArray:
    """Bool DataArray over (T, P): True inside the inclusive ranges (None: unbounded)."""
    T = ds["T"]
    P = ds["P"]
    keep = _inside(T, T_range) & _inside(P, P_range)
    return keep.transpose("T", "P")


def _inside(x: xr.DataArray, bounds: Range) -> xr.DataArray:
    lo, hi = bounds if bounds is not None else (None, None)
    keep = xr.ones_like(x, dtype=bool)
    if lo is not None:
        keep &= x >= lo * (1 - 1e-9)
    if hi is not None:
        keep &= x <= hi * (1 + 1e-9)
    return keep


def fit_scaling(
    ds: xr.Dataset,
    var: str | xr.DataArray,
    symbols: Mapping[str, str],
    *,
    alpha: float | None = None,
    fit_range: str | xr.DataArray = "lazy",
    T_range: Range = None,
    P_range: Range = None,
    include: Include = ("converged",),
    n_boot: int = 0,
    seed: int = 0,
    quantity: str | None = None,
) -> PowerLawFit:
    """Fit ``var ~ A T^{e_T} P^{e_P}`` at one alpha (default: the largest).

    fit_range : "lazy" (default, see `lazy_mask`), "all", or a bool DataArray over (T, P)
    T_range, P_range : inclusive (low, high) bounds applied on top of ``fit_range``
    n_boot    : bootstrap resamples of the seeds (0: none); ``seed`` seeds the Generator
    """
    sel = at_alpha(ds, alpha)
    # One read of the per-seed values; the statistics and the bootstrap run in memory.
    values = masked(sel, var, include).compute()
    name = quantity or (var if isinstance(var, str) else str(var.name))
    stats = mean_stderr(values).transpose("T", "P")
    where, note = _fit_range(sel, fit_range, T_range, P_range, include)
    boot = None
    if n_boot:
        boot = bootstrap_mean(values, n_boot, np.random.default_rng(seed))
    n_seeds = int(seeds_with_values(values))
    return fit_power_law(
        stats["mean"],
        pooled_stderr(stats, where),
        where=where,
        symbols=symbols,
        quantity=name,
        boot_means=boot,
        n_seeds=n_seeds if n_boot else None,
        resamples=resample_key(values, n_boot, seed) if n_boot else None,
        range_note=note,
    )


def pooled_stderr(stats: xr.Dataset, where: xr.DataArray | None = None) -> xr.DataArray:
    """Standard errors of seed means from one relative spread pooled over the points.

    stats : `analysis.aggregate.mean_stderr` output (``mean``, ``stderr``, ``n``)
    where : the points that enter the pool (default: all)
    Returns ``mean_i s / sqrt(n_i)``, with s^2 the pooled variance of the per-seed values
    relative to their means, (sd_i / mean_i)^2 weighted by n_i - 1 over the points of
    ``where`` with n_i >= 2; ``stats["stderr"]`` (NaN where n < 2) when none has.
    Few seeds (3-5) estimate each point's own error poorly, and weighting by it lets the
    points whose seeds happen to agree dominate the fit and its bootstrap (which keeps
    the weights): on synthetic cubes of 5 seeds the exponents came out noisier and their
    errors too small (|z| > 2 in 20 % of cubes for a nominal 5 %).
    """
    n = stats["n"]
    rel_sd2 = (stats["stderr"] / stats["mean"]) ** 2 * n  # (sd_i / mean_i)^2
    dof = (n - 1).where((n >= 2) & np.isfinite(rel_sd2), 0)
    if where is not None:
        dof = dof.where(where.astype(bool), 0)
    total = float(dof.sum())
    if total == 0:
        return stats["stderr"]
    s2 = float((rel_sd2.fillna(0.0) * dof).sum()) / total
    out = abs(stats["mean"]) * math.sqrt(s2) / np.sqrt(n.where(n > 0))
    out.attrs = dict(stats["stderr"].attrs)
    return out.rename("stderr")


def _fit_range(
    sel: xr.Dataset,
    fit_range: str | xr.DataArray,
    T_range: Range,
    P_range: Range,
    include: Include,
) -> tuple[xr.DataArray, str]:
    box = range_mask(sel, T_range, P_range)
    notes = []
    if isinstance(fit_range, xr.DataArray):
        base = fit_range.astype(bool)
        notes.append("user mask")
    elif fit_range == "lazy":
        base = lazy_mask(sel, include=include)
        notes.append("lazy: T <= T_c(P) of the test error (10% departure from its plateau)")
    elif fit_range == "all":
        base = xr.ones_like(box)
        notes.append("all T and P")
    else:
        raise ValueError(f"fit_range must be 'lazy', 'all' or a bool DataArray, got {fit_range!r}")
    if T_range is not None:
        notes.append(f"T in {T_range}")
    if P_range is not None:
        notes.append(f"P in {P_range}")
    alpha = float(sel["alpha"]) if "alpha" in sel.coords and sel["alpha"].ndim == 0 else None
    if alpha is not None:
        notes.append(f"alpha = {alpha:g}")
    return (base & box).transpose("T", "P"), "; ".join(notes)


REL_CHANGE_SYMBOLS = {"T": "delta", "P": "gamma"}
T_STAR_SYMBOLS = {"T": "c", "P": "b"}


def fit_rel_change(ds: xr.Dataset, **kwargs) -> PowerLawFit:
    r"""Fit :math:`\|w - w_0\| / \|w_0\| \sim T^\delta P^\gamma` (see `fit_scaling`)."""
    return fit_scaling(ds, "rel_change", REL_CHANGE_SYMBOLS, **kwargs)


def fit_t_star(ds: xr.Dataset, **kwargs) -> PowerLawFit:
    r"""Fit :math:`t^* \sim T^c P^b` (t* = dt x steps to zero training loss; see
    `fit_scaling`)."""
    return fit_scaling(ds, "t_star", T_STAR_SYMBOLS, **kwargs)


def ratio(fit: PowerLawFit, numerator: str, denominator: str) -> Estimate:
    """Exponent ratio e_num / e_den (e.g. ``ratio(fit, "gamma", "delta")``) with errors.

    The lstsq error propagates the full covariance of the two exponents; the bootstrap
    error is the spread of the ratio over the bootstrap refits (`bootstrap_std`).
    """
    i = fit.variables.index(fit.variable(numerator)) + 1
    j = fit.variables.index(fit.variable(denominator)) + 1
    num, den = fit.exponents[fit.variables[i - 1]].value, fit.exponents[fit.variables[j - 1]].value
    c = fit.covariance
    var = c[i, i] / den**2 + num**2 * c[j, j] / den**4 - 2 * num * c[i, j] / den**3
    boot_std = float("nan")
    if fit.boot is not None:
        boot_std = float(bootstrap_std(fit.boot[:, i] / fit.boot[:, j], fit.n_seeds))
    return Estimate(float(num / den), float(np.sqrt(max(var, 0.0))), boot_std)
