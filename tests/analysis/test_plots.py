"""Figures: labels with symbols and units, outcome markings, valid image files."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from analysis import plots
from analysis.crossover import crossover_test_error, fit_crossover
from analysis.fits import fit_rel_change
from analysis.load import open_cube
from analysis.perceptron import fit_perceptron

T_LABEL = "temperature $T = dt/(hB)$ (dimensionless)"
ALPHA_LABEL = r"output scale $\alpha$ (dimensionless)"
P_LABEL = "training set size $P$ (images)"


@pytest.fixture(scope="module")
def cube(cube_path) -> dict[str, xr.Dataset]:
    """The synthetic cube read into memory (laziness is tested with the aggregation)."""
    return {name: ds.load() for name, ds in open_cube(cube_path).items()}


def test_labels_carry_symbol_and_units():
    assert plots.label("T") == T_LABEL
    assert plots.label("P") == P_LABEL
    assert plots.label("t_star") == "training time $t^*$ (dimensionless)"


@pytest.mark.parametrize(
    "x,text",
    [
        (2.0**-14, "2^-14"),
        (2.0**-9.5, "2^-9.5"),  # a half octave, as a sweep file writes 2 ** (k + 0.5)
        (2.0**1.5, "2^1.5"),
        (1.0, "1"),
        (0.001, "0.001"),
        (3.0, "3"),
    ],
)
def test_pow2_text(x, text):
    assert plots.pow2_text(x) == text


def test_phase_diagram_marks_every_outcome(cube):
    fig = plots.phase_diagram(cube["fc_mnist_phase"], "test_error")
    ax = fig.axes[0]
    assert ax.get_xlabel() == ALPHA_LABEL and ax.get_ylabel() == T_LABEL
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    colorbar = fig.axes[1]
    assert colorbar.get_ylabel().startswith(
        r"test error $\epsilon_{\mathrm{test}}$ (dimensionless)"
    )
    hatches = [p.get_hatch() for p in ax.patches if isinstance(p, Rectangle)]
    # 3 alpha <= 1 times 2 T >= 2^-4 all diverged; one unfinished and one missing cell.
    assert hatches.count("xxx") == 6
    assert hatches.count("///") == 1
    assert hatches.count("...") == 1
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [
        "diverged (no converged seed)",
        "unfinished (no converged seed)",
        "missing (not computed)",
        "some seeds not converged",
    ]
    assert len(ax.collections[1].get_offsets()) == 1  # the one partial cell


def test_phase_diagrams_have_three_panels_with_colour_bars(cube):
    fig = plots.phase_diagrams(cube["fc_mnist_phase"])
    assert isinstance(fig, Figure)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels.count(T_LABEL) == 3
    assert any(label.startswith("relative weight change") for label in labels)
    assert any(label.startswith("training time $t^*$") for label in labels)


def test_phase_diagrams_add_the_ntk_change_where_it_was_measured(cube):
    """A fourth panel, and on every panel the line where the NTK change is 1 (here a
    change 1 / alpha, which crosses 1 inside the alpha grid)."""
    ds = cube["fc_mnist_phase"]
    assert ds["alpha"].min() < 1 < ds["alpha"].max()
    ntk = (1.0 / ds["alpha"]).broadcast_like(ds["rel_change"])
    fig = plots.phase_diagrams(ds.assign(ntk_change=ntk))  # where the sweep set ntk_points
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels.count(T_LABEL) == 4
    assert any(label.startswith("NTK change") for label in labels)
    panels = [ax for ax in fig.axes if ax.get_ylabel() == T_LABEL]
    for ax in panels:
        assert "NTK change = 1" in _legend_texts(ax)
    assert not any("NTK change = 1" in _legend_texts(ax) for ax in plots.phase_diagrams(ds).axes)


def _legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


def test_temperature_sweeps(cube):
    ds = cube["fc_mnist_tsweep"]
    fit = fit_rel_change(ds)
    crossover = crossover_test_error(ds, n_boot=0)
    fig = plots.temperature_sweeps(ds, a=0.7, fits={"rel_change": fit}, crossover=crossover)
    axes = fig.axes
    assert len(axes) == 6
    assert [ax.get_xlabel() for ax in axes[:3]] == [T_LABEL] * 3
    assert axes[3].get_xlabel() == r"rescaled temperature $T P^{0.70}$ (images$^{0.70}$)"
    assert axes[1].get_ylabel() == plots.label("rel_change")
    assert axes[1].get_yscale() == "log" and axes[0].get_yscale() == "linear"
    assert len(axes[0].containers) == 5  # one error-bar curve per P
    assert [t.get_text() for t in axes[0].get_legend().get_texts()][0] == "P = 1024"


def test_crossover_and_dynamics_figures(cube):
    ds = cube["fc_mnist_tsweep"]
    table = crossover_test_error(ds, n_boot=20)
    fig = plots.crossover_plot([table], [fit_crossover(table)])
    ax = fig.axes[0]
    assert ax.get_xlabel() == P_LABEL
    assert ax.get_ylabel() == "crossover temperature $T_c$ (dimensionless)"
    assert "a = " in ax.get_legend().get_texts()[0].get_text()
    fig = plots.dynamics(ds)
    assert len(fig.axes) == 6  # smallest, middle and largest P; loss and error
    assert fig.axes[0].get_xlabel() == r"time $t = dt \times \mathrm{steps}$ (dimensionless)"
    ylabel = r"test error $\epsilon_{\mathrm{test}}(t)$, first 1024 test points (dimensionless)"
    assert fig.axes[1].get_ylabel() == ylabel


def test_perceptron_figures(cube):
    ds = cube["perceptron_chi1_d16"]
    fig = plots.perceptron_figure(ds, fit_perceptron(ds))
    axes = fig.axes
    assert [ax.get_xlabel() for ax in axes] == [T_LABEL] * 3 + [P_LABEL]
    assert axes[0].get_ylabel() == r"signal $(w-w_0)\cdot e_1$ (dimensionless)"
    assert "predicted T^1 P^0.5" in axes[0].get_title()
    assert "fitted T^(" in axes[0].get_title()
    rows = [
        {"chi": chi, "quantity": q, "fitted": 1.0, "stderr": 0.1}
        for chi in (0.0, 1.0)
        for q in ("signal", "t_star")
    ]
    fig = plots.perceptron_summary(rows)
    assert fig.axes[0].get_xlabel() == r"depletion exponent $\chi$ (dimensionless)"


def test_phase_diagram_ticks_sit_on_a_sparse_grid(cube):
    """One tick per grid value (the cell centres) where the labels have room, as 2^k;
    a dense grid axis keeps matplotlib's own ticks."""
    ds = cube["fc_mnist_phase"]
    sparse = ds.isel(alpha=[0, 3, 6], T=[0, 5])
    ax = plots.phase_diagram(sparse).axes[0]
    assert list(ax.get_xticks()) == list(sparse["alpha"].values)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["$2^{-4}$", "$2^{2}$", "$2^{8}$"]
    assert list(ax.get_yticks()) == list(sparse["T"].values)
    # half octaves on the feature side and one lazy alpha far away: labels would collide
    dense = ds.assign_coords(alpha=2.0 ** np.array([-4, -3.5, -3, -2.5, -2, -1.5, 8]))
    ax = plots.phase_diagram(dense).axes[0]
    assert not set(dense["alpha"].values) <= set(ax.get_xticks())


def test_optimal_temperature_figure_shows_the_divergence_temperature():
    """T_div (red crosses) and its fit sit beside T_opt on the right panel."""
    from synthetic_cube import edge_dataset, optimum_dataset

    from analysis.optimal import optimal_temperature
    from analysis.stability import divergence_temperature, fit_divergence_temperature

    ds, _ = edge_dataset(0.6, 16, np.random.default_rng(0))
    edges = divergence_temperature(ds)
    fit = fit_divergence_temperature(edges, alpha_max=1.0)
    phase = optimum_dataset(np.random.default_rng(5), k=0.5)
    table = optimal_temperature(phase, n_boot=0)
    fig = plots.optimal_temperature_figure(phase, table, {}, 256, edges=edges, edge_fit=fit)
    ax = fig.axes[1]
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "T_div: half the seeds diverge" in texts
    assert any(t.startswith("fit: T_div ~ alpha^(0.6") for t in texts), texts
    (crosses,) = [ln for ln in ax.get_lines() if ln.get_marker() == "x"]
    np.testing.assert_allclose(crosses.get_ydata(), edges["T_div"].isel(P=0).values)
