r"""Perceptron experiments: signal, noise and t* against T and P, for each chi.

One group per (chi, d) (group attrs ``chi`` and ``d``). The predictor is centred,
f = (w - w0) . x / sqrt(d), so the quantities are those of the change w - w0:

- signal :math:`s = w_\parallel - w_{\parallel,0} = (w - w_0) \cdot e_1` (``w_par - w_par0``);
- noise :math:`n = \|(w - w_0)_\perp\| / \sqrt{d - 1}` (``sqrt(dnoise)``), a per-component
  amplitude;
- t*, the time to zero training loss;
- the signal-to-noise ratio s / n (``snr``, per cell), the quantity the scaling argument
  is about: a point at distance |x_1| from the boundary is fitted once s |x_1| beats the
  noise's O(n) contribution to f, and the smallest |x_1| among P points is
  ~ P^{-1/(1+chi)}, so s / n ~ P^{1/(1+chi)}. With n independent of P the signal itself
  follows; at finite d the noise still drifts with P, and s / n separates that drift
  from the signal's exponent.

Predictions (science spec, "Scaling laws", noise-dominated regime):
:math:`s \sim T P^{1/(1+\chi)}`, :math:`n \sim T P^0`, and the scaling argument
:math:`t^* \sim T P^{(3+\chi)/(1+\chi)}` (to be checked, not assumed), hence
:math:`s / n \sim T^0 P^{1/(1+\chi)}`.

Default fit range: the largest alpha and all T and P (``fit_range="all"``); pass
``T_range`` to keep only the noise-dominated large-T part when the small-T points are
set by the margin 1/alpha instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import xarray as xr

from analysis.aggregate import (
    MIN_VALID_SHARE,
    Include,
    at_alpha,
    bootstrap_mean,
    bootstrap_std,
    masked,
    mean_stderr,
    seeds_with_values,
)
from analysis.fits import InsufficientData, PowerLawFit, Range, fit_scaling, pooled_stderr

QUANTITIES: dict[str, tuple[str, str]] = {
    "signal": ("signal (w - w0) . e1", "1"),
    "noise": ("noise ||(w - w0)_perp|| / sqrt(d - 1)", "1"),
    "t_star": ("t = dt * steps at the first step with zero training loss", "1"),
}
DERIVED: dict[str, tuple[str, str]] = {
    "snr": ("signal-to-noise ratio s / n per network", "1"),
}
"""Per-cell quantities of `per_seed` beyond `QUANTITIES` (not fitted by `fit_perceptron`)."""
SYMBOLS: dict[str, dict[str, str]] = {
    "signal": {"T": "T-exponent of the signal", "P": "gamma"},
    "noise": {"T": "T-exponent of the noise", "P": "P-exponent of the noise"},
    "t_star": {"T": "c", "P": "b"},
}


def is_perceptron(ds: xr.Dataset) -> bool:
    """True for a perceptron experiment group (attrs arch or dataset = "perceptron")."""
    return "perceptron" in (ds.attrs.get("arch"), ds.attrs.get("dataset"))


def predicted_exponents(chi: float) -> dict[str, dict[str, float]]:
    """Predicted exponents {quantity: {"T": e_T, "P": e_P}} at depletion exponent chi."""
    return {
        "signal": {"T": 1.0, "P": 1.0 / (1.0 + chi)},
        "noise": {"T": 1.0, "P": 0.0},
        "t_star": {"T": 1.0, "P": (3.0 + chi) / (1.0 + chi)},
        "snr": {"T": 0.0, "P": 1.0 / (1.0 + chi)},
    }


def per_seed(ds: xr.Dataset, quantity: str) -> xr.DataArray:
    """Per-cell values of ``quantity`` ("signal", "noise", "t_star" or "snr"), lazy."""
    if quantity == "signal":
        out = ds["w_par"] - ds["w_par0"]
    elif quantity == "noise":
        out = np.sqrt(ds["dnoise"])
    elif quantity == "t_star":
        out = ds["t_star"]
    elif quantity == "snr":
        out = per_seed(ds, "signal") / per_seed(ds, "noise")
    else:
        raise ValueError(f"quantity must be one of {(*QUANTITIES, *DERIVED)}, got {quantity!r}")
    long_name, units = (QUANTITIES | DERIVED)[quantity]
    out = out.rename(quantity)
    out.attrs = {"long_name": long_name, "units": units}
    return out


def observables(
    ds: xr.Dataset, alpha: float | None = None, include: Include = ("converged",)
) -> xr.Dataset:
    """Seed means over (T, P) of signal, noise and t* at one alpha (default: largest).

    Returns a lazy Dataset with ``<q>``, ``<q>_stderr`` and ``<q>_n`` for each quantity.
    """
    sel = at_alpha(ds, alpha)
    out = {}
    for q in QUANTITIES:
        stats = mean_stderr(masked(sel, per_seed(sel, q), include))
        out[q] = stats["mean"]
        out[f"{q}_stderr"] = stats["stderr"]
        out[f"{q}_n"] = stats["n"]
    return xr.Dataset(out, attrs={"chi": ds.attrs.get("chi"), "d": ds.attrs.get("d")})


def fit_perceptron(
    ds: xr.Dataset,
    *,
    alpha: float | None = None,
    T_range: Range = None,
    P_range: Range = None,
    include: Include = ("converged",),
    n_boot: int = 0,
    seed: int = 0,
) -> dict[str, PowerLawFit]:
    """Power-law fits q ~ T^{e_T} P^{e_P} of signal, noise and t* (see `analysis.fits`).

    Raises `analysis.fits.InsufficientData` (from the first quantity that cannot be
    fitted) when the grid is too small.
    """
    sel = at_alpha(ds, alpha)
    return {
        q: fit_scaling(
            sel,
            per_seed(sel, q),
            SYMBOLS[q],
            fit_range="all",
            T_range=T_range,
            P_range=P_range,
            include=include,
            n_boot=n_boot,
            seed=seed,
            quantity=q,
        )
        for q in QUANTITIES
    }


def exponent_table(fits: Mapping[str, PowerLawFit], chi: float) -> list[dict[str, object]]:
    """Rows (quantity, variable, fitted, stderr, predicted, z) comparing fits with the
    predictions at chi; z = (fitted - predicted) / `Estimate.error`."""
    predicted = predicted_exponents(chi)
    rows = []
    for q, fit in fits.items():
        for var in fit.variables:
            est = fit.exponents[var]
            pred = predicted[q][var]
            rows.append(
                {
                    "quantity": q,
                    "variable": var,
                    "fitted": est.value,
                    "stderr": est.error,
                    "predicted": pred,
                    "z": (est.value - pred) / est.error if est.error > 0 else math.nan,
                }
            )
    return rows


def local_exponent_pairs(local: xr.Dataset) -> list[tuple[int, int, float, float]]:
    """(P_lo, P_hi, weighted-mean exponent, stderr) per P pair of `local_P_exponents`."""
    return [
        (int(lo), int(hi), float(m), float(e))
        for lo, hi, m, e in zip(
            local["P_lo"].values,
            local["P_hi"].values,
            local["slope_mean"].values,
            local["slope_mean_stderr"].values,
            strict=True,
        )
    ]


def local_exponent_map(local: xr.Dataset) -> dict[tuple[int, int], tuple[float, float]]:
    """{(P_lo, P_hi): (weighted-mean exponent, stderr)} of `local_P_exponents`."""
    return {(lo, hi): (m, e) for lo, hi, m, e in local_exponent_pairs(local)}


def local_P_exponents(
    ds: xr.Dataset,
    quantity: str = "signal",
    *,
    alpha: float | None = None,
    T_range: Range = None,
    include: Include = ("converged",),
    n_boot: int = 500,
    seed: int = 0,
) -> xr.Dataset:
    """Local P-exponents of ``quantity`` between successive P, for each T and averaged.

    slope(T, pair) = ln(q(P_hi) / q(P_lo)) / ln(P_hi / P_lo) from seed means.
    ``slope_mean`` is the weighted mean over T (within ``T_range``) for each pair, with
    weights 1 / e^2, e = sqrt((se_lo/q_lo)^2 + (se_hi/q_hi)^2) / ln(P_hi/P_lo) from the
    cells' standard errors pooled over the cells in range (`analysis.fits.pooled_stderr`:
    equal weights where the cells have equal seed counts). Errors (``stderr``,
    ``slope_mean_stderr``; NaN with ``n_boot`` < 2) come from a bootstrap over seeds
    (``n_boot`` resamples, generator ``seed``, `analysis.aggregate.bootstrap_std`; a
    resample's mean over T weighs only the slopes it has) that draws the same seeds in
    every cell: a seed fixes the initialisation, the batch draws and (for the perceptron)
    the nested training sets at every T and P, so cells of one seed are correlated and
    only a joint resample gives the right error of a slope or of a mean over T. Returns a
    computed Dataset with dims (T, pair) and coords P_lo, P_hi, P_mid (geometric mean).
    """
    sel = at_alpha(ds, alpha)
    values = masked(sel, per_seed(sel, quantity), include)
    stats = mean_stderr(values).transpose("T", "P").compute()
    P = stats["P"].values.astype(float)
    if len(P) < 2:
        raise InsufficientData(
            f"local P-exponents need at least 2 P values, got P = {stats['P'].values.tolist()}"
        )
    boot = bootstrap_mean(values, n_boot, seed).transpose("bootstrap", "T", "P").values
    log_ratio = np.log(P[1:] / P[:-1])

    def slopes(q: np.ndarray) -> np.ndarray:
        q = np.where(q > 0, q, np.nan)
        return np.log(q[..., 1:] / q[..., :-1]) / log_ratio

    slope, boot_slope = slopes(stats["mean"].values), slopes(boot)
    n = int(seeds_with_values(values))  # the seeds behind the bootstrap, as in the fits
    # (T, pair); without a bootstrap (n_boot < 2) the point estimates alone
    if n_boot >= 2:
        usable = np.isfinite(boot_slope).mean(axis=0) >= MIN_VALID_SHARE
    else:
        usable = np.isfinite(slope)
    stderr = np.where(usable, bootstrap_std(boot_slope, n), np.nan)
    T = stats["T"].values
    lo, hi = T_range if T_range is not None else (None, None)
    in_range = np.ones(len(T), bool)
    if lo is not None:
        in_range &= T >= lo
    if hi is not None:
        in_range &= T <= hi
    # weights from the seeds' relative spread pooled over the cells in range
    # (`analysis.fits.pooled_stderr`), not from each cell's own few-seed estimate
    in_T = xr.DataArray(in_range, dims="T", coords={"T": T})
    pooled = pooled_stderr(stats, in_T.broadcast_like(stats["mean"]))
    with np.errstate(invalid="ignore"):
        rel = (pooled / stats["mean"]).transpose("T", "P").values
        weight_err = np.sqrt(rel[:, 1:] ** 2 + rel[:, :-1] ** 2) / log_ratio
    weight = np.where(
        np.isfinite(slope)
        & np.isfinite(weight_err)
        & (weight_err > 0)
        & usable
        & in_range[:, None],
        weight_err**-2.0,
        0.0,
    )
    total = weight.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_slope = np.where(
            total > 0, np.nansum(np.where(weight > 0, slope, 0.0) * weight, axis=0) / total, np.nan
        )
        # each replicate averages the slopes it has: a cell whose resampled seeds all
        # failed gives no slope there, and must not count as a slope of 0
        boot_weight = np.where(np.isfinite(boot_slope), weight, 0.0)  # (bootstrap, T, pair)
        boot_total = boot_weight.sum(axis=1)
        boot_mean = np.where(
            boot_total > 0,
            np.nansum(np.where(boot_weight > 0, boot_slope, 0.0) * boot_weight, axis=1)
            / boot_total,
            np.nan,
        )
    mean_err = np.where(total > 0, bootstrap_std(boot_mean, n), np.nan)
    coords = {
        "T": T,
        "P_lo": ("pair", P[:-1]),
        "P_hi": ("pair", P[1:]),
        "P_mid": ("pair", np.sqrt(P[:-1] * P[1:])),
    }
    return xr.Dataset(
        {
            "slope": (
                ("T", "pair"),
                slope,
                {"long_name": f"local P-exponent of the {quantity}", "units": "1"},
            ),
            "stderr": (
                ("T", "pair"),
                stderr,
                {"long_name": "standard error of the local exponent (bootstrap)", "units": "1"},
            ),
            "slope_mean": (
                "pair",
                mean_slope,
                {"long_name": "weighted mean over T of the local exponent", "units": "1"},
            ),
            "slope_mean_stderr": (
                "pair",
                mean_err,
                {"long_name": "standard error of slope_mean (bootstrap)", "units": "1"},
            ),
        },
        coords=coords,
        attrs={"quantity": quantity, "chi": ds.attrs.get("chi"), "n_boot": n_boot},
    )
