r"""Where a seed-mean curve crosses something, with a bootstrap over seeds, and the power
law of that crossing against P.

Both the crossover temperature T_c(P) (`analysis.crossover`, scanned along T) and the
lazy / feature-learning boundary alpha*(T, P) (`analysis.regimes`, scanned along alpha)
are one function of a seed-mean curve, ``curve(x, mean(x)) -> crossing``, applied to
every cell of the other dimensions. `crossing_table` does that, and re-applies it to
``n_boot`` bootstrap resamples of the seeds (`analysis.aggregate.bootstrap_mean`, the
same resample in every cell): the bootstrap standard error of the log crossing
(`analysis.aggregate.bootstrap_std`) and its t interval
(`analysis.aggregate.seed_interval`), both only where the crossing is found and at
least MIN_VALID_SHARE of the replicates find one. `fit_crossing` fits crossing ~ x^e
along one dimension (P, or T) weighted by that error and refits every replicate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import xarray as xr

from analysis.aggregate import (
    MIN_VALID_SHARE,
    bootstrap_mean,
    bootstrap_std,
    mean_stderr,
    resample_key,
    seed_interval,
    seeds_with_values,
)
from analysis.fits import InsufficientData, PowerLawFit, Range, fit_power_law

Curve = Callable[[np.ndarray, np.ndarray], float]
"""(grid of the scanned dimension, seed means along it) -> the crossing (NaN: none)."""


def crossing_table(
    values: xr.DataArray,
    curve: Curve,
    scan: str,
    name: str,
    long_name: str,
    *,
    n_boot: int,
    seed: int,
    ci: float,
    means: xr.DataArray | None = None,
) -> xr.Dataset:
    """Apply ``curve`` along ``scan`` to the seed means of every cell of the other
    dimensions, and to bootstrap resamples of the seeds.

    values : masked per-seed values with dims ``scan``, ``seed`` and any others (NaN =
             excluded)
    means  : their seed means, if already computed
    Returns a Dataset over the other dimensions with ``name`` (the crossing),
    ``name_low`` / ``name_high`` (the level ``ci`` t interval, over the seeds with a
    value in that cell), ``log_name_stderr`` (bootstrap standard error of its log),
    ``n_boot_valid`` (replicates with a crossing) and ``name_boot`` (bootstrap first);
    attrs ``n_boot``, ``ci``, ``seed``, ``n_seeds`` (the seeds the bootstrap draws) and
    ``resamples`` (`analysis.aggregate.resample_key`, with a bootstrap).
    """
    others = [str(d) for d in values.dims if d not in (scan, "seed")]
    if means is None:
        means = mean_stderr(values)["mean"]
    means = means.transpose(*others, scan).compute()
    x = means[scan].values
    shape = means.shape[:-1]

    def apply(curves: np.ndarray) -> np.ndarray:  # (..., scan) -> (...)
        flat = curves.reshape(-1, len(x))
        return np.array([curve(x, y) for y in flat], dtype=float).reshape(curves.shape[:-1])

    est = apply(means.values)
    boot = np.full((n_boot, *shape), np.nan)
    if n_boot:
        reps = bootstrap_mean(values, n_boot, np.random.default_rng(seed))
        boot = apply(reps.transpose("bootstrap", *others, scan).compute().values)
    n_valid = np.isfinite(boot).sum(axis=0)
    n_seeds = np.asarray(seeds_with_values(values, others).transpose(*others).values)
    low, high, log_std = (np.full(shape, np.nan) for _ in range(3))
    for idx in np.ndindex(*shape):
        if np.isfinite(est[idx]) and n_boot and n_valid[idx] >= MIN_VALID_SHARE * n_boot:
            k = int(n_seeds[idx])
            log_std[idx] = bootstrap_std(np.log(boot[(slice(None), *idx)]), k)
            low[idx], high[idx] = np.exp(seed_interval(np.log(est[idx]), log_std[idx], k, ci))
    units = {"units": "1"}
    return xr.Dataset(
        {
            name: (others, est, {"long_name": long_name, **units}),
            f"{name}_low": (others, low, {"long_name": f"lower {ci:.0%} bound", **units}),
            f"{name}_high": (others, high, {"long_name": f"upper {ci:.0%} bound", **units}),
            f"log_{name}_stderr": (
                others,
                log_std,
                {"long_name": f"bootstrap standard error of ln {name}", **units},
            ),
            "n_boot_valid": (
                others,
                n_valid.astype(int),
                {"long_name": "bootstrap replicates with a crossing", "units": "1"},
            ),
            f"{name}_boot": (
                ["bootstrap", *others],
                boot,
                {"long_name": f"{name} of each bootstrap replicate", **units},
            ),
        },
        coords={d: means[d].values for d in others},
        attrs={"n_boot": n_boot, "ci": ci, "seed": seed, "n_seeds": int(seeds_with_values(values))}
        | ({"resamples": resample_key(values, n_boot, seed)} if n_boot else {}),
    )


def fit_crossing(
    table: xr.Dataset,
    name: str,
    symbol: str,
    over: str = "P",
    fit_range: Range = None,
    note: str = "",
) -> PowerLawFit:
    """Fit ``table[name] ~ A x^e`` over ``over`` (a `crossing_table` along that one
    dimension), weighted by its bootstrap error; ``symbol`` names e. Points without a
    crossing are left out; each bootstrap replicate is refitted. Raises InsufficientData
    with fewer than 3 crossings in ``fit_range`` (bounds on ``over``; None = open)."""
    y = table[name]
    x = y[over].values
    in_range = np.ones(len(x), bool)
    if fit_range is not None:
        lo, hi = fit_range
        in_range = (x >= (lo or 0)) & (x <= (hi or np.inf))
    n_found = int((np.isfinite(y.values) & in_range).sum())
    if n_found < 3:
        grid = [f"{v:g}" for v in x[in_range]]
        raise InsufficientData(
            f"{name} found for {n_found} of {len(grid)} {over} values in the fit range"
            f" ({over} = {', '.join(grid)}); fitting {name} ~ {over}^{symbol} needs at least 3"
        )
    boot = table[f"{name}_boot"] if table.sizes.get("bootstrap", 0) >= 2 else None
    return fit_power_law(
        y.rename(name),
        (y * table[f"log_{name}_stderr"]).rename(f"{name}_stderr"),
        where=None
        if fit_range is None
        else xr.DataArray(in_range, dims=over, coords={over: y[over]}),
        symbols={over: symbol},
        quantity=name,
        boot_means=boot,
        n_seeds=table.attrs.get("n_seeds"),
        resamples=table.attrs.get("resamples"),
        range_note=note,
    )
