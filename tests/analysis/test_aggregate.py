"""Seed statistics count only the chosen outcomes and stay lazy."""

from __future__ import annotations

import dask.array as da
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from synthetic_cube import ABSURD

from analysis.aggregate import (
    bootstrap_mean,
    compared_T,
    included,
    masked,
    outcome_counts,
    paired_change,
    resample_counts,
    seed_mean,
)
from analysis.load import open_cube
from analysis.perceptron import observables
from ensemble.schema import CONVERGED, DIVERGED, MISSING, UNFINISHED


@pytest.fixture(scope="module")
def tsweep(cube_path) -> xr.Dataset:
    return open_cube(cube_path)["fc_mnist_tsweep"]


def test_spoiled_cells_never_enter_the_mean(tsweep):
    values = tsweep["rel_change"].values
    outcome = tsweep["outcome"].values
    assert (values[outcome != CONVERGED] == ABSURD).all()  # the absurd values are there
    stats = seed_mean(tsweep, "rel_change").compute()
    keep = outcome == CONVERGED
    expected_n = keep.sum(axis=-1)
    expected_mean = np.where(keep, values, 0).sum(axis=-1) / expected_n
    np.testing.assert_array_equal(stats["n"].values, expected_n)
    np.testing.assert_allclose(stats["mean"].values, expected_mean, rtol=1e-12)
    assert stats["mean"].max() < 1.0  # the 1e6 never leaked in
    std = np.array(
        [
            np.std(v[k], ddof=1)
            for v, k in zip(values.reshape(-1, 8), keep.reshape(-1, 8), strict=True)
        ]
    ).reshape(expected_n.shape)
    np.testing.assert_allclose(stats["stderr"].values, std / np.sqrt(expected_n), rtol=1e-10)


def test_include_unfinished_adds_exactly_those_cells(tsweep):
    both = seed_mean(tsweep, "rel_change", include=("converged", "unfinished")).compute()
    only = seed_mean(tsweep, "rel_change").compute()
    n_unfinished = (tsweep["outcome"] == UNFINISHED).sum("seed").values
    np.testing.assert_array_equal(both["n"].values - only["n"].values, n_unfinished)
    assert (both["mean"].values[n_unfinished > 0] > 1e4).all()  # absurd values now enter
    same = n_unfinished == 0
    np.testing.assert_allclose(both["mean"].values[same], only["mean"].values[same])


def test_outcome_counts(tsweep):
    counts = outcome_counts(tsweep, dims=None).compute()
    outcome = tsweep["outcome"].values
    for name, code in (
        ("missing", MISSING),
        ("converged", CONVERGED),
        ("diverged", DIVERGED),
        ("unfinished", UNFINISHED),
    ):
        assert int(counts.sel(outcome=name)) == (outcome == code).sum(), name
    assert int(counts.sum()) == outcome.size
    assert int(counts.sel(outcome="missing")) == 4
    per_P = outcome_counts(tsweep, dims=("alpha", "T", "seed"))
    assert per_P.dims == ("outcome", "P")


def test_not_done_counts_as_missing(tsweep):
    ds = tsweep.copy()
    ds["done"] = ds["done"].copy(data=np.zeros(ds["done"].shape, bool))
    assert int(outcome_counts(ds, None).sel(outcome="missing")) == ds["outcome"].size
    assert int(seed_mean(ds, "test_error")["n"].sum()) == 0


def test_bad_include_names_the_allowed_outcomes(tsweep):
    with pytest.raises(ValueError, match="converged"):
        seed_mean(tsweep, "rel_change", include=("converged", "missing"))
    with pytest.raises(ValueError, match="convergd"):
        included(tsweep, include=("convergd",))


def test_bootstrap_resamples_seeds_and_is_reproducible(tsweep):
    counts = resample_counts(8, 50, 3)
    assert counts.shape == (50, 8) and (counts.sum(axis=1) == 8).all()
    values = masked(tsweep, "rel_change")
    a = bootstrap_mean(values, 50, 3).compute()
    b = bootstrap_mean(values, 50, 3).compute()
    assert a.dims == ("alpha", "T", "P", "bootstrap")
    np.testing.assert_array_equal(a.values, b.values)
    assert np.nanmax(a.values) < 1.0
    # The bootstrap spread of the mean matches the standard error.
    stats = seed_mean(tsweep, "rel_change").compute()
    ratio = a.std("bootstrap") / stats["stderr"]
    assert 0.7 < float(ratio.median()) < 1.1


def test_aggregation_is_lazy(cube_path, raise_if_dask_computes):
    ds = open_cube(cube_path)["fc_mnist_tsweep"]
    stats = seed_mean(ds, "test_error", include=("converged", "diverged"))
    counts = outcome_counts(ds)
    boot = bootstrap_mean(masked(ds, "t_star"), 20, 0)
    derived = seed_mean(ds, np.sqrt(ds["dw2"] / ds["w0_2"]))
    perceptron = observables(open_cube(cube_path)["perceptron_chi1_d16"])
    lazy = [stats["mean"], stats["stderr"], stats["n"], counts, boot, derived["mean"]]
    for out in lazy + [perceptron[name] for name in perceptron.data_vars]:
        assert isinstance(out.data, da.Array)
    assert raise_if_dask_computes.total_computes == 0


@settings(max_examples=40, deadline=None)
@given(
    outcome=hnp.arrays(np.int8, (3, 2, 4), elements=st.sampled_from([0, 1, 2, 3])),
    values=hnp.arrays(np.float64, (3, 2, 4), elements=st.floats(0.01, 10.0)),
    junk=st.floats(-1e300, 1e300) | st.just(np.inf) | st.just(np.nan),
)
def test_mean_equals_the_mean_of_converged_cells(outcome, values, junk):
    """Whatever the cells outside 'converged' hold, the mean is the converged cells' mean."""
    dims = ("alpha", "T", "seed")
    ds = xr.Dataset(
        {
            "x": (dims, np.where(outcome == CONVERGED, values, junk)),
            "outcome": (dims, outcome),
            "done": (dims, outcome != MISSING),
        }
    )
    stats = seed_mean(ds, "x")
    keep = outcome == CONVERGED
    n = keep.sum(axis=-1)
    np.testing.assert_array_equal(stats["n"].values, n)
    with np.errstate(invalid="ignore"):
        expected = np.where(keep, values, 0).sum(axis=-1) / n
    np.testing.assert_allclose(stats["mean"].values, expected, rtol=1e-12)
    assert np.isnan(stats["stderr"].values[n < 2]).all()
    counts = outcome_counts(ds, dims=("alpha", "T", "seed"))
    assert counts.sel(outcome="converged") == keep.sum()


@pytest.mark.parametrize("n", [3, 5, 10])
def test_bootstrap_std_of_a_mean_is_the_usual_standard_error(n):
    """The bootstrap spread of a mean of n seeds, scaled by `bootstrap_std`, matches
    s / sqrt(n) (s with ddof = 1); unscaled it falls short by sqrt((n - 1) / n)."""
    from analysis.aggregate import bootstrap_std, resample_counts

    x = np.random.default_rng(n).normal(size=n)
    reps = resample_counts(n, 40_000, 1) @ x / n
    usual = x.std(ddof=1) / np.sqrt(n)
    assert bootstrap_std(reps, n) == pytest.approx(usual, rel=0.02)
    assert reps.std() == pytest.approx(usual * np.sqrt((n - 1) / n), rel=0.02)
    assert np.isnan(bootstrap_std(reps, 1)) and np.isnan(bootstrap_std(reps[:1], n))


def _with_counts(counts: list[int], n_seed: int = 6) -> np.ndarray:
    """values[T, seed] with counts[i] seeds converged at T i (NaN elsewhere)."""
    values = np.full((len(counts), n_seed), np.nan)
    for i, c in enumerate(counts):
        values[i, :c] = 0.1 + 0.01 * i
    return values


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ([6, 6, 6, 5, 3, 1, 0], [0, 1, 2, 3, 4]),  # at least 3 of 6
        ([6, 6, 2, 1], [0, 1]),
        ([0, 2, 2, 1], [1, 2]),  # at least 2 (half of 2 is 1)
        ([2, 1, 1], [0, 1, 2]),  # one T with 2 seeds: every T with a value
        ([1, 1, 0], [0, 1]),
        ([0, 0], []),
    ],
)
def test_compared_T_leaves_out_the_few_seeds_at_an_edge(counts, expected):
    assert compared_T(_with_counts(counts)).tolist() == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=1, max_size=15))
def test_compared_T_keeps_the_best_covered_T(counts):
    got = compared_T(_with_counts(counts, n_seed=12)).tolist()
    with_values = [i for i, c in enumerate(counts) if c >= 1]
    assert set(got) <= set(with_values)
    if with_values:
        assert counts.index(max(counts)) in got
    well = [i for i, c in enumerate(counts) if c >= 2 and 2 * c >= max(counts)]
    if len(well) >= 2:
        assert got == well
    else:
        assert all(counts[i] >= 2 for i in got) or got == with_values


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 400),  # the same change in every seed, in test points
    st.integers(2, 12),  # seeds
    st.sampled_from([1, 2, 12]),  # comparisons
    st.sampled_from([512, 1000, 2048]),  # test-set size
    st.sampled_from([1, -1]),  # direction
    st.booleans(),  # stored in float32, as the engine's test error is computed
    st.data(),
)
def test_a_change_alike_in_every_seed_is_judged_by_the_sign_test(
    k, n, comparisons, pte, sign, float32, data
):
    """Test errors are multiples of 1 / pte, so a few seeds can change by exactly the same
    amount: no spread for a t test (it would read t = inf, or some 10^6 after float32
    rounding, and always pass). The exact sign test decides: p = 2 / 2^n against
    0.05 / comparisons, whatever the rounding of the values, in either direction."""
    lo = np.asarray(data.draw(st.lists(st.integers(0, pte - k), min_size=n, max_size=n)))
    values = np.stack([lo, lo + k])[::sign] / pte  # values[T, seed]
    if float32:
        values = values.astype(np.float32).astype(float)
    c = paired_change(values, 0, 1, comparisons)
    assert c.n == n and c.t == np.inf
    assert c.sign_p == pytest.approx(2.0 ** (1 - n))
    assert c.counts == (2.0 ** (1 - n) <= 0.05 / comparisons)
    assert np.sign(c.diff) == sign and abs(c.diff) == pytest.approx(k / pte, abs=1e-6)
    verdict = "<=" if c.counts else ">"
    assert c.text().startswith(f"the same in all {n} seeds, sign test p = ")
    assert c.text().endswith(f" {verdict} {0.05 / comparisons:.2g}")


def test_a_change_with_spread_is_judged_by_the_t_test():
    """Differences that are not all alike keep Student's t (df = n - 1); 2 alike seeds
    never pass, 6 alike do at 5 % but not against 2 comparisons (p = 1/32), 7 do."""
    values = np.array([[0.10, 0.12, 0.14], [0.13, 0.16, 0.16]])
    c = paired_change(values, 0, 1)
    d = values[1] - values[0]
    assert c.t == pytest.approx(d.mean() / (d.std(ddof=1) / np.sqrt(3)))
    assert c.counts == (c.t > c.threshold) and np.isnan(c.sign_p)
    assert c.text() == f"t = {c.t:.1f} > 4.30, 3 seeds"
    alike = lambda n: np.stack([np.full(n, 0.1743), np.full(n, 0.1919)])  # noqa: E731
    assert not paired_change(alike(2), 0, 1).counts
    assert (
        paired_change(alike(2), 0, 1).text() == "the same in all 2 seeds, sign test p = 0.5 > 0.05"
    )
    assert paired_change(alike(6), 0, 1).counts and not paired_change(alike(6), 0, 1, 2).counts
    assert paired_change(alike(7), 0, 1, 2).counts
    assert (
        paired_change(np.zeros((2, 4)), 0, 1).t == 0
        and not paired_change(np.zeros((2, 4)), 0, 1).counts
    )
