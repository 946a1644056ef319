r"""The lazy / feature-learning boundary of a phase diagram from the NTK change.

The change of the empirical NTK, mean((K - K0)^2) / mean(K0^2) (``ntk_change``, measured
where a sweep sets ``ntk_points``; see `ensemble.ntk`), falls with alpha: near 0 in the
lazy regime, of order 1 and beyond where features are learned. ``ntk_boundary`` gives,
for each T at one P, the alpha*(T) where the seed-mean change is ``level`` (1 by
default): scanning from the largest alpha down, the first grid alpha whose mean reaches
the level, interpolated with its right neighbour linearly in (log alpha, log change).

Errors: the definition re-applied to bootstrap resamples of the seeds (the same seeds in
every cell, `analysis.aggregate.bootstrap_mean`): the standard error of ln alpha*
(`analysis.aggregate.bootstrap_std`) and its 95 % t interval
(`analysis.aggregate.seed_interval`), both only where alpha* is found and at least
MIN_VALID_SHARE of the replicates find one.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis.aggregate import (
    MIN_VALID_SHARE,
    Include,
    bootstrap_mean,
    bootstrap_std,
    masked,
    mean_stderr,
    seed_interval,
    seeds_with_values,
)
from analysis.fits import InsufficientData
from analysis.interpolate import first_crossing


def ntk_boundary(
    ds: xr.Dataset,
    P: int | None = None,
    level: float = 1.0,
    *,
    include: Include = ("converged",),
    n_boot: int = 200,
    seed: int = 0,
    ci: float = 0.95,
) -> xr.Dataset:
    """alpha*(T) where the seed-mean NTK change is ``level``, at one P (default: the
    smallest).

    Returns a Dataset over T with ``alpha_star`` (NaN where the change is on one side of
    the level at every alpha of the grid, or where its largest alpha already reaches it),
    ``alpha_star_low`` / ``alpha_star_high`` (the ``ci`` t interval) and
    ``log_alpha_star_stderr``; attrs ``P``, ``level``, ``n_seeds``, ``n_boot``. Raises
    InsufficientData without an ``ntk_change`` variable or with fewer than 2 alpha.
    """
    if "ntk_change" not in ds:
        raise InsufficientData("no ntk_change in this experiment: its sweep did not set ntk_points")
    P = int(ds["P"].values.min()) if P is None else int(P)
    sel = ds.sel(P=P)
    if sel.sizes.get("alpha", 1) < 2:
        raise InsufficientData("the NTK boundary needs at least 2 alpha")
    values = masked(sel, "ntk_change", include).transpose("T", "alpha", "seed").compute()
    # scanned in 1 / alpha, increasing from the lazy end (log-log interpolation alike)
    inverse = 1.0 / values["alpha"].values[::-1]

    def star(curves: np.ndarray) -> np.ndarray:  # (..., alpha) -> (...)
        flat = curves.reshape(-1, curves.shape[-1])
        out = [1.0 / first_crossing(inverse, y[::-1], level) for y in flat]
        return np.array(out).reshape(curves.shape[:-1])

    means = mean_stderr(values)["mean"].transpose("T", "alpha").values
    alpha_star = star(means)
    n_T = len(alpha_star)
    low, high, log_std = (np.full(n_T, np.nan) for _ in range(3))
    n_seeds = seeds_with_values(values, ["T"]).transpose("T").values
    if n_boot:
        reps = bootstrap_mean(values, n_boot, np.random.default_rng(seed))
        boot = star(reps.transpose("bootstrap", "T", "alpha").values)  # (bootstrap, T)
        valid = np.isfinite(boot).sum(axis=0)
        for j in range(n_T):
            if np.isfinite(alpha_star[j]) and valid[j] >= MIN_VALID_SHARE * n_boot:
                log_std[j] = bootstrap_std(np.log(boot[:, j]), int(n_seeds[j]))
                lo, hi = seed_interval(np.log(alpha_star[j]), log_std[j], int(n_seeds[j]), ci)
                low[j], high[j] = np.exp(lo), np.exp(hi)
    units = {"units": "1"}
    return xr.Dataset(
        {
            "alpha_star": (
                "T",
                alpha_star,
                {"long_name": f"alpha where the NTK change is {level:g}", **units},
            ),
            "alpha_star_low": ("T", low, {"long_name": f"lower {ci:.0%} bound", **units}),
            "alpha_star_high": ("T", high, {"long_name": f"upper {ci:.0%} bound", **units}),
            "log_alpha_star_stderr": (
                "T",
                log_std,
                {"long_name": "bootstrap standard error of ln alpha*", **units},
            ),
        },
        coords={"T": values["T"].values},
        attrs={
            "P": P,
            "level": level,
            "n_seeds": int(seeds_with_values(values)),
            "n_boot": n_boot,
            "ci": ci,
        },
    )
