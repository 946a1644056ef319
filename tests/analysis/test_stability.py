"""The divergence temperature T_div(alpha, P) and its scaling with alpha."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic_cube import EDGE_T, edge_dataset

from analysis.fits import InsufficientData
from analysis.stability import divergence_temperature, fit_divergence_temperature
from ensemble.schema import CONVERGED, DIVERGED, MISSING, UNFINISHED

T = EDGE_T


def test_T_div_is_where_half_the_seeds_diverge_and_its_exponent_is_recovered():
    ds, edge = edge_dataset(0.6, 64, np.random.default_rng(0))
    table = divergence_temperature(ds)
    T_div = table["T_div"].isel(P=0).values
    median = np.median(edge, axis=1)
    # within a grid step (half an octave) of the seeds' median edge
    assert np.all(np.abs(np.log2(T_div / median)) < 0.5), np.log2(T_div / median)
    assert not table["above_grid"].any() and not table["below_grid"].any()
    fit = fit_divergence_temperature(table, alpha_max=1.0)
    assert fit.n_points == 5 and fit["k"].value == pytest.approx(0.6, abs=0.05)
    frac = table["diverged_fraction"].isel(P=0).values
    np.testing.assert_allclose(frac, (T[None, :, None] > edge[:, None, :]).mean(-1))


def test_missing_cells_do_not_count_and_the_grid_ends_are_flagged():
    """A seed never trained (missing) leaves the fraction over the others; an alpha where
    few seeds diverge anywhere is above the grid, one where half diverge at the smallest T
    below it, and unfinished cells count as not diverged."""
    ds, _ = edge_dataset(0.6, 8, np.random.default_rng(1))
    outcome = ds["outcome"].values  # (alpha, T, P, seed)
    outcome[0, :, :, :] = CONVERGED
    outcome[0, -1, :, :3] = DIVERGED  # 3 of 8 at the largest T
    outcome[1, :, :, :4] = DIVERGED  # half of them everywhere
    outcome[2, :, :, :] = UNFINISHED
    outcome[2, 5:, :, :4] = DIVERGED  # 4 of 8 from the sixth T
    outcome[2, 5:, :, 4] = MISSING  # one seed not trained there: 4 of 7
    ds["outcome"].values[:] = outcome
    ds["done"].values[:] = outcome != MISSING
    table = divergence_temperature(ds).isel(P=0)
    assert bool(table["above_grid"][0]) and np.isnan(table["T_div"][0])
    assert bool(table["below_grid"][1]) and np.isnan(table["T_div"][1])
    frac = table["diverged_fraction"].values
    assert frac[2, 4] == 0 and frac[2, 5] == pytest.approx(4 / 7)
    # between T[4] (fraction 0) and T[5]: linear in log T from 0 to 4/7, 0.5 at 7/8 of it
    assert float(table["T_div"][2]) == pytest.approx(T[4] * (T[5] / T[4]) ** (7 / 8))


def test_fewer_than_3_alphas_with_a_T_div_give_no_fit():
    ds, _ = edge_dataset(0.6, 8, np.random.default_rng(2))
    ds["outcome"].values[2:] = CONVERGED
    with pytest.raises(InsufficientData, match="at least 3 alphas <= 1 .* got 2"):
        fit_divergence_temperature(divergence_temperature(ds), alpha_max=1.0)
