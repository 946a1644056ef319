"""Power-law fits recover the exponents of synthetic cubes within their errors."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from synthetic_cube import Laws, one_curve_dataset, tsweep_dataset

from analysis.aggregate import masked, mean_stderr
from analysis.fits import (
    REL_CHANGE_SYMBOLS,
    InsufficientData,
    fit_power_law,
    fit_rel_change,
    fit_scaling,
    fit_t_star,
    lazy_mask,
    pooled_stderr,
    ratio,
)
from analysis.load import open_cube

LAWS = Laws()


@pytest.fixture(scope="module")
def tsweep(cube_path) -> xr.Dataset:
    return open_cube(cube_path)["fc_mnist_tsweep"]


def _close(estimate, true: float, max_error: float) -> None:
    assert abs(estimate.value - true) < 3 * estimate.error, (estimate, true)
    assert 0 < estimate.error < max_error, estimate


def test_exact_power_law_is_recovered_exactly():
    T = 2.0 ** np.arange(-8, 0)
    P = np.array([1024.0, 2048, 4096])
    y = 0.3 * T[:, None] ** 0.5 * P[None, :] ** -1.25
    mean = xr.DataArray(y, dims=("T", "P"), coords={"T": T, "P": P}, name="y")
    fit = fit_power_law(mean, 0.01 * mean)
    assert fit["T"].value == pytest.approx(0.5, abs=1e-10)
    assert fit["P"].value == pytest.approx(-1.25, abs=1e-10)
    assert np.exp(fit.log_prefactor.value) == pytest.approx(0.3, rel=1e-9)
    assert fit.n_points == 24 and fit.weighted
    np.testing.assert_allclose(fit.predict(T=T[:, None], P=P[None, :]), y, rtol=1e-9)


def test_rel_change_exponents(tsweep):
    fit = fit_rel_change(tsweep, n_boot=100, seed=1)
    _close(fit["delta"], LAWS.delta, 0.02)
    _close(fit["gamma"], LAWS.gamma, 0.02)
    assert np.isfinite(fit["delta"].stderr_boot) and fit.boot.shape == (100, 3)
    assert fit.chi2_red < 3
    r = ratio(fit, "gamma", "delta")
    _close(r, LAWS.a, 0.05)


def test_t_star_exponents(tsweep):
    fit = fit_t_star(tsweep)
    _close(fit["c"], LAWS.c, 0.03)
    _close(fit["b"], LAWS.b, 0.03)


def test_default_range_is_below_the_test_error_crossover(tsweep):
    mask = lazy_mask(tsweep)
    T_departure = LAWS.T_c(mask["P"].values) * np.sqrt(0.1)  # 10 % above the plateau
    for j, P in enumerate(mask["P"].values):
        kept = mask["T"].values[mask.values[:, j]]
        assert kept.max() <= T_departure[j] * 1.2, P
        assert kept.max() >= T_departure[j] / 2.5, P
    fit = fit_rel_change(tsweep)
    assert fit.used.sum() == fit.n_points < mask.size
    assert "lazy" in fit.range_note


def test_user_ranges(tsweep):
    fit = fit_rel_change(tsweep, fit_range="all", T_range=(2**-10, 2**-4), P_range=(2048, None))
    used_T = fit.used["T"].values[fit.used.any("P").values]
    used_P = fit.used["P"].values[fit.used.any("T").values]
    assert used_T.min() == 2**-10 and used_T.max() == 2**-4
    assert used_P.min() == 2048
    _close(fit["gamma"], LAWS.gamma, 0.03)


def test_one_P_cannot_give_a_P_exponent(rng):
    ds = tsweep_dataset(rng, P=(1024,), n_spoiled=0)
    with pytest.raises(InsufficientData, match="single P"):
        fit_rel_change(ds, fit_range="all")


def test_all_diverged_gives_insufficient_data(rng):
    ds = tsweep_dataset(rng, n_spoiled=0)
    ds["outcome"][:] = 2
    with pytest.raises(InsufficientData, match="0 usable points"):
        fit_t_star(ds)


def test_lazy_mask_drops_a_P_whose_crossover_is_below_the_grid():
    """On a grid from T = 2^-9, the test error of the largest P already rises across its
    plateau points (T_c is below the grid there): the default fit range keeps none of
    that P's T rather than all of them, and the exponents come out right (with every T
    of those P kept, delta came out 0.08 instead of 0.5)."""
    ds = tsweep_dataset(
        np.random.default_rng(0), Laws(sigma_err=0.0), T=2.0 ** np.arange(-9, -1), n_spoiled=0
    )
    mask = lazy_mask(ds).transpose("T", "P")
    assert not mask.sel(P=16384).any() and not mask.sel(P=8192).any()
    assert mask.sel(P=1024).sum() >= 3
    fit = fit_rel_change(ds)
    _close(fit["delta"], LAWS.delta, 0.1)
    _close(fit["gamma"], LAWS.gamma, 0.1)


def test_lazy_mask_keeps_the_grid_T_its_crossover_is_clipped_onto():
    """The test error jumps at 2^-5: T_c is clipped onto 2^-5.5, the last point under the
    threshold, and exp(log(2^-5.5)) comes back 1 ulp under it; the lazy range keeps it."""
    T = 2.0 ** np.arange(-7.0, -3.9, 0.5)
    y = np.array([0.100, 0.102, 0.098, 0.099, 0.150, 0.151, 0.152])
    ds = one_curve_dataset(T, y)
    assert lazy_mask(ds).values[:, 0].tolist() == [True] * 4 + [False] * 3


def test_seed_errors_are_pooled_over_the_fit_points(rng):
    """With the same seeds at every point the pooled errors are equal, so the fit is the
    unweighted one however unequal the points' own errors (a point whose seeds happen to
    agree no longer pulls the fit through itself); a point of fewer seeds weighs less."""
    ds = tsweep_dataset(rng, n_seed=4, n_spoiled=0)
    sel = ds.sel(alpha=ds["alpha"].max())
    values = masked(sel, "rel_change", ("converged",)).compute()
    # one point's seeds agree to 0.1 % but sit 30 % above the law
    point = {"T": 2, "P": 1}
    values[point] = 1.3 * float(values[point].mean()) * (1 + 1e-3 * np.arange(4))
    stats = mean_stderr(values).transpose("T", "P")
    fitted = fit_scaling(sel.assign(rel_change=values), "rel_change", REL_CHANGE_SYMBOLS,
                         fit_range="all")  # fmt: skip
    unweighted = fit_power_law(stats["mean"], None)
    for var in ("T", "P"):
        expected = unweighted.exponents[var].value
        assert fitted.exponents[var].value == pytest.approx(expected, abs=1e-12)
    own = fit_power_law(stats["mean"], stats["stderr"])  # each point's own error
    assert abs(own["T"].value - fitted["T"].value) > 0.01  # the outlier pulled it
    # pooled: sd / mean pooled with n - 1 weights, divided by sqrt(n) per point
    rel_sd = (values.std("seed", ddof=1) / values.mean("seed")).values
    pooled = pooled_stderr(stats)
    assert np.allclose(pooled / stats["mean"], np.sqrt(np.mean(rel_sd**2) / 4))
    fewer = values.where(~((values["T"] == values["T"][0]) & (values["seed"] > 0)))
    few_stats = mean_stderr(fewer).transpose("T", "P")
    ratio = (pooled_stderr(few_stats) / few_stats["mean"]).values
    assert np.allclose(ratio[0], 2 * ratio[1])  # 1 seed against 4
