"""The lazy / feature-learning boundary alpha*(T) from the NTK change."""

from __future__ import annotations

import numpy as np
import pytest
from synthetic_cube import NTK_LAW, ntk_phase_dataset, phase_dataset

from analysis.fits import InsufficientData
from analysis.regimes import fit_ntk_boundary, lazy_side, ntk_boundary

ALPHA_0, SLOPE, K = NTK_LAW  # alpha* = ALPHA_0 (T / 2^-8)^SLOPE (P / 1024)^K


def _with_ntk(noise: float = 0.0, seed: int = 0, P=(1024,)):
    return ntk_phase_dataset(seed, noise, P)


def test_boundary_recovers_a_power_law_crossing_exactly():
    """Log-log interpolation is exact for a power law in alpha (the largest alpha at the
    largest T is missing: the scan starts at the next one)."""
    ds, star = _with_ntk()
    table = ntk_boundary(ds, n_boot=0)
    assert table["alpha_star"].dims == ("T", "P") and table.attrs["level"] == 1.0
    np.testing.assert_allclose(table["alpha_star"].values, star, rtol=1e-9)
    # another level: the change is 4 where alpha = alpha* / 2
    np.testing.assert_allclose(
        ntk_boundary(ds, level=4.0, n_boot=0)["alpha_star"].values, star / 2, rtol=1e-9
    )


def test_boundary_outside_the_grid_is_nan():
    ds, _ = _with_ntk()
    tiny = ds.assign(ntk_change=ds["ntk_change"] * 1e-6)  # lazy everywhere: below the grid
    assert np.isnan(ntk_boundary(tiny, n_boot=0)["alpha_star"].values).all()
    huge = ds.assign(ntk_change=ds["ntk_change"] * 1e6)  # the largest alpha already moves
    assert np.isnan(ntk_boundary(huge, n_boot=0)["alpha_star"].values).all()


def test_interval_holds_the_boundary_under_seed_noise():
    """With seed noise (sd 0.3 in ln of the change, 3 seeds) the 95 % t interval of
    alpha* holds the true one at almost every T of 20 noisy diagrams."""
    hits = []
    for r in range(20):
        ds, star = _with_ntk(noise=0.3, seed=r)
        table = ntk_boundary(ds, n_boot=200, seed=r)
        lo, hi = table["alpha_star_low"].values, table["alpha_star_high"].values
        assert np.isfinite(lo).sum() >= 4
        hits += list(((lo <= star) & (star <= hi)).ravel())
    assert np.mean(hits) >= 0.85, np.mean(hits)


def test_no_ntk_change_is_a_clear_error():
    with pytest.raises(InsufficientData, match="did not set ntk_points"):
        ntk_boundary(phase_dataset(np.random.default_rng(0)))


def test_the_reproduction_page_reads_the_boundary_at_the_extreme_temperatures():
    from types import SimpleNamespace

    from analysis.reproduction import ntk_reading

    ds, star = _with_ntk(noise=0.1)
    table = ntk_boundary(ds, n_boot=100).sel(P=1024)
    (line, blank) = ntk_reading(SimpleNamespace(results={"ntk_boundary": {1024: table}}))
    assert line.startswith("- Lazy / feature-learning boundary at P = 1024") and blank == ""
    assert f"found at 6 of 6 T): alpha* = 2^{np.log2(table['alpha_star'].values[0]):.1f}" in line
    assert "at T = 2^-12" in line and "at T = 2^-2." in line and line.count("95 %") == 2
    flat = ntk_boundary(ds.assign(ntk_change=ds["ntk_change"] * 1e-6), n_boot=0).sel(P=1024)
    lazy = ds.assign(ntk_change=ds["ntk_change"] * 1e-6)
    (line, _) = ntk_reading(SimpleNamespace(data=lazy, results={"ntk_boundary": {1024: flat}}))
    assert "does not cross 1 inside the alpha grid at any T (its seed mean runs from" in line
    # the largest change: smallest alpha, largest T that converged there (2^-4 diverges)
    high = lazy["ntk_change"].sel(alpha=2.0**-4, T=2.0**-6, P=1024).mean("seed")
    assert line.endswith(f"to {float(high):.3g} (alpha = 2^-4, T = 2^-6)).")
    assert ntk_reading(SimpleNamespace(results={})) == []
    ds, _ = _with_ntk(P=(256, 512, 1024))
    table = ntk_boundary(ds, n_boot=0)
    fits = {2.0**-8: fit_ntk_boundary(table, T=2.0**-8)}
    results = {"ntk_boundary": {1024: table.sel(P=1024)}, "ntk_boundary_fits": fits}
    results["ntk_boundary_T_fits"] = {1024: fit_ntk_boundary(table, P=1024)}
    first, line, blank = ntk_reading(SimpleNamespace(results=results))
    s = results["ntk_boundary_T_fits"][1024]["s"]
    assert first.endswith(f"at T = 2^-2; alpha* ~ T^s with s = {s} (6 T).")
    assert (
        line
        == f"- The boundary against P, alpha* ~ P^k: k = {fits[2.0**-8]['k']} at T = 2^-8 (3 P)."
    )


def test_the_boundary_against_P_recovers_its_exponent():
    """alpha* ~ P^K at every T: exact without noise; with seed noise the 95 % t interval
    of k (bootstrap error, 3 seeds) holds K in most of 20 diagrams."""
    P = (256, 512, 1024, 2048)
    ds, _ = _with_ntk(P=P)
    table = ntk_boundary(ds, n_boot=0)
    for T in table["T"].values[:-1]:  # the largest T misses its largest alpha
        fit = fit_ntk_boundary(table, T=float(T))
        assert fit.n_points == len(P) and fit.symbols == {"P": "k"}
        assert fit["k"].value == pytest.approx(K, abs=1e-9)
    hits = []
    for r in range(20):
        ds, _ = _with_ntk(noise=0.3, seed=r, P=P)
        table = ntk_boundary(ds, n_boot=200, seed=r)
        k = fit_ntk_boundary(table, T=2.0**-8)["k"]
        half = 4.30 * k.stderr_boot  # t_2(0.975): 3 seeds
        hits.append(abs(k.value - K) <= half)
    assert np.mean(hits) >= 0.85, np.mean(hits)


def test_the_boundary_against_P_needs_three_P():
    ds, _ = _with_ntk(P=(512, 1024))
    with pytest.raises(InsufficientData, match="alpha_star found for 2 of 2 P"):
        fit_ntk_boundary(ntk_boundary(ds, n_boot=0), T=2.0**-8)


def test_the_boundary_line_recovers_its_T_exponent():
    """alpha* ~ T^SLOPE at one P: exact without noise (the largest T misses its largest
    alpha, the scan starts at the next one); one of T or P must be given."""
    ds, _ = _with_ntk()
    table = ntk_boundary(ds, n_boot=0)
    fit = fit_ntk_boundary(table, P=1024)
    assert fit.symbols == {"T": "s"} and fit.n_points == ds.sizes["T"]
    assert fit["s"].value == pytest.approx(SLOPE, abs=1e-9)
    for bad in ({}, {"T": 2.0**-8, "P": 1024}):
        with pytest.raises(ValueError, match="exactly one of T"):
            fit_ntk_boundary(table, **bad)


def test_lazy_side_measures_the_largest_alpha():
    """alpha = 2^8 sits above alpha* at every T (change (alpha* / alpha)^2 < 1): lazy, its
    largest change at the largest T that has one; scaled up 10^4 it is not lazy."""
    ds, star = _with_ntk()
    side = lazy_side(ds)
    assert side.alpha == 2.0**8 and side.lazy and side.cells == 5  # the 6th cell is missing
    T = ds["T"].values[-2]
    assert side.T == T and side.P == 1024
    assert side.largest == pytest.approx(float(star[-2, 0] / 2.0**8) ** 2, rel=1e-9)
    moved = lazy_side(ds.assign(ntk_change=ds["ntk_change"] * 1e4))
    assert not moved.lazy and moved.largest > 1
    assert lazy_side(ds, alpha=2.0**-4, level=1.0).lazy is False  # the feature end
    with pytest.raises(InsufficientData, match="did not set ntk_points"):
        lazy_side(phase_dataset(np.random.default_rng(0)))
