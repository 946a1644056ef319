"""The results cube's schema: names, dimensions, units and flag conventions.

This module is the contract between the writer (`ensemble.cube`) and every reader
(`analysis`, the dashboard page, `python -m ensemble status`). It imports neither torch
nor zarr, so readers can use it without the engine.

Layout of a store: one Zarr group per experiment (group name = experiment name). Opened
with ``xarray.open_zarr(store, group=name)`` each group is a Dataset with

- dimensions ``(alpha, T, P, seed)`` for per-cell quantities, plus ``layer`` for
  per-layer quantities and ``checkpoint`` for the dynamics;
- coordinates ``alpha``, ``T``, ``P``, ``seed``, ``layer``, ``checkpoint`` and the derived
  ``dt(T) = T * h * B`` (h = 1 for the perceptron) and ``checkpoint_step(checkpoint)``;
- a boolean ``done`` mask: a cell is done only after all its values were written;
- ``outcome`` (int8 flag variable, 0 where not computed);
- every other variable below as float64, NaN where not computed or not defined.
"""

from __future__ import annotations

DIMS: tuple[str, ...] = ("alpha", "T", "P", "seed")
"""Per-cell dimensions, in this order in every per-cell variable."""

LAYER_DIM = "layer"
CHECKPOINT_DIM = "checkpoint"

# Outcome flags (CF flag_values / flag_meanings).
MISSING, CONVERGED, DIVERGED, UNFINISHED = 0, 1, 2, 3
OUTCOME_FLAGS: dict[int, str] = {
    MISSING: "missing",
    CONVERGED: "converged",
    DIVERGED: "diverged",
    UNFINISHED: "unfinished",
}

COORDS: dict[str, dict[str, str]] = {
    "alpha": {"long_name": "output scale alpha (lazy >> 1, feature learning << 1)", "units": "1"},
    "T": {"long_name": "SGD temperature T = dt / (h B)", "units": "1"},
    "P": {"long_name": "training set size", "units": "images"},
    "seed": {"long_name": "member seed (init, training set, batch draws)", "units": "1"},
    "dt": {"long_name": "SGD step size dt = T h B", "units": "1"},
    "layer": {"long_name": "parameter tensor name", "units": "1"},
    "checkpoint": {"long_name": "checkpoint index", "units": "1"},
    "checkpoint_step": {"long_name": "SGD steps at the checkpoint", "units": "steps"},
}

# name -> (long_name, units). Per-cell variables have dims DIMS.
CELL_VARS: dict[str, tuple[str, str]] = {
    "test_error": ("fraction of test points with y f <= 0 at the end", "1"),
    "train_loss": ("mean hinge(alpha f y) / alpha on the training set at the end", "1"),
    "n_unfitted": ("training points with alpha f y < 1 at the end", "points"),
    "steps": ("SGD steps taken (to t* if converged)", "steps"),
    "t_star": ("t = dt * steps at the first step with zero training loss", "1"),
    "dw2": ("||w - w0||^2 summed over all layers", "1"),
    "w0_2": ("||w0||^2 summed over all layers", "1"),
    "rel_change": ("relative weight change ||w - w0|| / ||w0||", "1"),
    "seconds": (
        "wall time the member occupied an ensemble slot (shared with its batch-mates)",
        "s",
    ),
}
PERCEPTRON_VARS: dict[str, tuple[str, str]] = {
    "w_par": ("signal w . e1 at the end", "1"),
    "w_par0": ("signal w0 . e1 at initialisation", "1"),
    "noise": ("noise ||w_perp||^2 / (d - 1) at the end", "1"),
    "noise0": ("noise ||w0_perp||^2 / (d - 1) at initialisation", "1"),
    "dnoise": ("||(w - w0)_perp||^2 / (d - 1), the noise of the change", "1"),
    "x1_unfitted": ("mean |x_1| of the training points not yet fitted (NaN if none)", "1"),
}
NTK_VARS: dict[str, tuple[str, str]] = {
    "ntk_change": (
        "change of the empirical NTK on the first ntk_points test points,"
        " mean((K - K0)^2) / mean(K0^2)",
        "1",
    ),
}
"""Variables of groups with ``ntk_points`` > 0 (see ``ensemble.ntk``)."""
SETTING_DEFAULTS: dict[str, object] = {"ntk_points": 0}
"""Settings added after the first cubes were written, with the value those cubes were
computed with: a group without the attribute has that setting."""
LAYER_VARS: dict[str, tuple[str, str]] = {
    "dw2_layer": ("||w - w0||^2 of one parameter tensor", "1"),
    "w0_2_layer": ("||w0||^2 of one parameter tensor", "1"),
}
N_CKPT_TEST = 1024
"""Checkpoints evaluate the test error on the first min(pte, N_CKPT_TEST) test points."""
CHECKPOINT_VARS: dict[str, tuple[str, str]] = {
    "ckpt_t": ("t = dt * step at the checkpoint", "1"),
    "ckpt_train_loss": ("training loss at the checkpoint", "1"),
    "ckpt_test_error": (
        f"test error on the first min(pte, {N_CKPT_TEST}) test points at the checkpoint",
        "1",
    ),
}

N_CHECKPOINTS = 12
"""Checkpoints are at steps 16 * 4**k, k = 0..N_CHECKPOINTS-1 (16 .. 6.7e7 steps)."""


def checkpoint_steps() -> list[int]:
    """Steps at which the dynamics are recorded: 16, 64, 256, ... (log-spaced, x4)."""
    return [16 * 4**k for k in range(N_CHECKPOINTS)]


LAUNCHES_ATTR = "launches"
"""Group attribute: a list with one record per launch that trained (or is training)
cells of the group, oldest first. Each record is a flat dict:

- ``id``           : random hex id of the launch (the same in every group it trained)
- ``command``      : the command line (``python -m ensemble run ...``) or ``"python API"``
- ``sweep``        : the sweep file (path or shipped name) or the Sweep's name
- ``started``      : UTC start time, ISO 8601
- ``wall_s``       : wall time of the whole launch, s (shared by its groups)
- ``device``       : devices the tasks trained on (GPU name, or ``"cpu (N cores)"``)
- ``n_workers``    : Dask workers of the launch
- ``cells_trained``: cells of this group written by the launch
- ``cells_failed`` : cells of this group whose task failed
- ``compile``      : whether CPU workers used torch.compile
- ``git_commit``   : commit of the launching code ("unknown" outside a git checkout)
- ``completed``    : False when the launch stopped on an error or an interrupt (None
                     while it runs)
- ``cells_done_before``: cells of this group done when the launch started
- ``ended``        : RUNNING while the launch runs, KILLED once a later launch found it
                     still running (it died without closing it; no ``wall_s`` then);
                     absent on a record the launch closed itself

A launch appends its record as running to each group it has cells of before it trains,
and replaces it at the end (removes it where the group got nothing); a later launch on
the store, holding its lock, settles a record still running as killed, with the cells
written since it opened (`ensemble.launch.settle_launches`). Cubes written before launch
records existed have no such attribute; records written before 2026-11-27 have no
``ended`` or ``cells_done_before``, and launches killed then left no record."""


RUNNING = "running"
"""``ended`` of a launch record while its launch runs (see LAUNCHES_ATTR)."""
KILLED = "killed"
"""``ended`` of a record whose launch died without closing it
(`ensemble.launch.settle_launches`)."""


def launch_end(record: dict) -> str:
    """How a launch record says its launch ended, in words."""
    if record.get("ended") == RUNNING:
        return "still running, or killed (the next launch on the store settles it)"
    if record.get("ended") == KILLED:
        return "killed (closed by a later launch)"
    return {True: "completed", False: "interrupted or failed"}.get(record.get("completed"), "?")


def group_name(experiment: str) -> str:
    """Zarr group that holds one experiment."""
    return experiment
