"""Perceptron observables, fits against predictions, local P-exponents."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic_cube import perceptron_dataset

from analysis.load import open_cube
from analysis.perceptron import (
    exponent_table,
    fit_perceptron,
    is_perceptron,
    local_P_exponents,
    observables,
    per_seed,
    predicted_exponents,
)
from ensemble.schema import DIVERGED


def test_predicted_exponents():
    p = predicted_exponents(1.0)
    assert p["signal"] == {"T": 1.0, "P": 0.5}
    assert p["snr"] == {"T": 0.0, "P": 0.5}
    assert p["noise"] == {"T": 1.0, "P": 0.0}
    assert p["t_star"]["P"] == pytest.approx(2.0)
    assert predicted_exponents(0.0)["t_star"]["P"] == pytest.approx(3.0)


@pytest.mark.parametrize("chi", [0, 1])
def test_fits_recover_the_synthetic_laws(cube_path, chi):
    cube = open_cube(cube_path)
    ds = cube[f"perceptron_chi{chi}_d16"]
    assert is_perceptron(ds) and not is_perceptron(cube["fc_mnist_tsweep"])
    fits = fit_perceptron(ds)
    rows = exponent_table(fits, float(ds.attrs["chi"]))
    assert len(rows) == 6
    for row in rows:
        # The synthetic cube follows the predictions exactly, up to seed noise.
        assert abs(row["z"]) < 3, row
        assert row["stderr"] < 0.03, row


def test_observables_use_the_change_from_init(cube_path):
    ds = open_cube(cube_path)["perceptron_chi1_d16"]
    obs = observables(ds).compute()
    signal = (ds["w_par"] - ds["w_par0"]).where(ds["outcome"] == 1).mean("seed").squeeze()
    np.testing.assert_allclose(obs["signal"].values, signal.values)
    assert (obs["noise"] > 0).all()
    # The diverged seed (absurd values) is left out.
    assert int(obs["signal_n"].sel(P=1024).isel(T=-1)) == 4
    assert float(obs["t_star"].max()) < 1e6 * 0.9 or float(obs["t_star"].max()) > 1e6


def test_local_P_exponents(cube_path):
    ds = open_cube(cube_path)["perceptron_chi1_d16"]
    local = local_P_exponents(ds, "signal")
    assert local["slope"].dims == ("T", "pair") and local.sizes["pair"] == 4
    np.testing.assert_array_equal(local["P_lo"].values, [1024, 2048, 4096, 8192])
    z = (local["slope_mean"] - 0.5) / local["slope_mean_stderr"]
    assert (np.abs(z) < 3).all(), local["slope_mean"].values
    assert (local["slope_mean_stderr"] < 0.05).all()
    noise = local_P_exponents(ds, "noise")
    assert abs(float(noise["slope_mean"].mean())) < 0.05


def test_signal_to_noise_ratio_separates_a_drifting_noise(rng):
    """Noise ~ P^-0.1 (a finite-d drift): the signal's local exponent is 1/(1+chi) and the
    ratio s / n carries the extra 0.1, per network and per pair."""
    ds = perceptron_dataset(rng, 1.0, n_seed=40, sigma=0.05, noise_P=-0.1)
    snr = per_seed(ds, "snr")
    np.testing.assert_allclose(snr, per_seed(ds, "signal") / per_seed(ds, "noise"))
    assert snr.attrs["long_name"] == "signal-to-noise ratio s / n per network"
    for quantity, expected in (("signal", 0.5), ("noise", -0.1), ("snr", 0.6)):
        local = local_P_exponents(ds, quantity)
        z = (local["slope_mean"] - expected) / local["slope_mean_stderr"]
        assert (np.abs(z) < 4).all() and (local["slope_mean_stderr"] < 0.02).all(), local
        assert local.attrs["quantity"] == quantity
    with pytest.raises(ValueError, match="'snr'"):
        per_seed(ds, "ratio")


def test_local_exponent_errors_see_that_cells_of_one_seed_are_correlated(rng):
    """A seed fixes init, draws and data at every T: here every T repeats the first T's
    networks scaled by T, so averaging over T adds no information and the T-mean's error
    must stay that of one T (an independent-cells formula would divide it by sqrt(n_T))."""
    ds = perceptron_dataset(rng, 1.0, n_seed=30)
    ds["outcome"][:] = 1
    T = ds["T"]
    for name in ("w_par", "dnoise"):
        first = (ds[name] - ds["w_par0"] if name == "w_par" else ds[name]).isel(T=0)
        scale = (T / T[0]) ** (1 if name == "w_par" else 2)
        ds[name] = first * scale + (ds["w_par0"] if name == "w_par" else 0)
    local = local_P_exponents(ds, "signal")
    np.testing.assert_allclose(
        local["slope"], local["slope"].isel(T=0).broadcast_like(local["slope"])
    )
    np.testing.assert_allclose(local["slope_mean_stderr"], local["stderr"].isel(T=0), rtol=1e-6)
    assert local.sizes["T"] == 7 and (local["stderr"] > 0.005).all()


def test_local_exponent_error_ignores_resamples_without_a_slope():
    """At the largest P only 2 of 5 seeds converged at every T, so about 8 % of the
    bootstrap resamples draw neither there and have no slope: the error of the mean slope
    over T must come from the slopes the resamples have (it came out 12x too large, each
    missing slope counted as 0)."""
    ds = perceptron_dataset(np.random.default_rng(1), chi=1.0, sigma=0.05)
    ds["outcome"].values[0, :, -1, 2:] = DIVERGED
    loc = local_P_exponents(ds, "signal", n_boot=2000, seed=0)
    last = loc.isel(pair=-1)
    per_T = last["stderr"].where(np.isfinite(last["slope"]))
    assert float(last["slope_mean"]) == pytest.approx(0.5, abs=0.05)
    # the spread of a weighted mean is at most the largest spread of its terms
    assert float(last["slope_mean_stderr"]) <= float(per_T.max())


def test_local_exponent_mean_weighs_cells_by_seed_count_not_own_error(rng):
    """Where every cell has the same seeds the mean over T is the plain mean of the
    slopes (each cell's own few-seed error made it lean on cells whose seeds happened to
    agree); without a bootstrap the means stand and the errors are NaN."""
    ds = perceptron_dataset(rng, 1.0)  # one diverged cell: T = 1, P = 1024, seed 0
    local = local_P_exponents(ds, "signal", n_boot=200, seed=1)
    slope = local["slope"].values
    # pairs 1.. have 5 seeds in every cell: equal weights
    assert np.allclose(
        local["slope_mean"].values[1:], slope[:, 1:].mean(axis=0), rtol=0, atol=1e-12
    )
    # pair 0: the 4-seed cell weighs less than the others
    assert not np.isclose(local["slope_mean"].values[0], slope[:, 0].mean(), rtol=0, atol=1e-6)
    bare = local_P_exponents(ds, "signal", n_boot=0)
    assert np.allclose(bare["slope_mean"].values, local["slope_mean"].values, rtol=0, atol=1e-12)
    assert np.isnan(bare["slope_mean_stderr"].values).all()
