"""Perceptron observables, fits against predictions, local P-exponents."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.load import open_cube
from analysis.perceptron import (
    exponent_table,
    fit_perceptron,
    is_perceptron,
    local_P_exponents,
    observables,
    predicted_exponents,
)


def test_predicted_exponents():
    p = predicted_exponents(1.0)
    assert p["signal"] == {"T": 1.0, "P": 0.5}
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
