"""The Zarr cube on disk: group swaps and their recovery after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import xarray as xr
import zarr

from ensemble import cube
from ensemble.schema import CELL_VARS, CHECKPOINT_VARS, CONVERGED, N_CHECKPOINTS

ATTRS = {"experiment": "e", "arch": "fc"}
GRID = dict(alpha=[1.0], T=[0.5], P=[64], seed=[0])


def test_recover_rewrites_stale_consolidated_metadata(tmp_path):
    """A kill between a growth's group swap and its consolidation leaves the old shapes
    in the store's consolidated metadata, which readers trust and then cannot read;
    ``recover`` (the first thing a launch does) rewrites it from the groups."""
    store = tmp_path / "c.zarr"
    cube.ensure_experiment(store, "e", GRID, ["W0"], 8.0, ATTRS)
    stale = (store / "zarr.json").read_bytes()
    cube.ensure_experiment(store, "e", {**GRID, "seed": [0, 1]}, ["W0"], 8.0, ATTRS)
    (store / "zarr.json").write_bytes(stale)  # as a kill before the consolidation left it
    with pytest.raises(ValueError):
        xr.open_datatree(store, engine="zarr").load()
    cube.recover(store)
    tree = xr.open_datatree(store, engine="zarr")
    assert tree["e"].sizes["seed"] == 2
    assert not tree["e"]["done"].any()


def test_store_lock_dies_with_its_holder(tmp_path):
    """A launch killed with SIGKILL while it holds the store leaves no stale lock: the
    next one takes the store at once. While the holder lives, another is refused."""
    store = tmp_path / "s.zarr"
    code = (
        "import sys, time\n"
        "from ensemble.cube import store_lock\n"
        "with store_lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(store)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(cube.StoreBusyError, match=f"pid {holder.pid}"), cube.store_lock(store):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with cube.store_lock(store):
        assert json.loads((tmp_path / "s.zarr.lock").read_text())["pid"] == os.getpid()
        (tmp_path / "link.zarr").symlink_to(store)  # the same store by another path
        with pytest.raises(cube.StoreBusyError), cube.store_lock(tmp_path / "link.zarr"):
            pass
    assert not (tmp_path / "s.zarr.lock").exists()


def _record() -> dict:
    """A member's results as the launch writes them (every value 1)."""
    r = {name: 1.0 for name in CELL_VARS}
    r.update(outcome=CONVERGED, dw2_layer={"W0": 1.0}, w0_2_layer={"W0": 1.0})
    r.update({name: [1.0] * N_CHECKPOINTS for name in CHECKPOINT_VARS})
    return r


def test_remote_growth_survives_a_kill_at_any_stage():
    """A remote store (here fsspec's memory://) has no rename: a growth writes a complete
    staged copy, marked ready, before it overwrites the group. The states a kill leaves
    behind, each put on the store by hand, are repaired by ``recover``: a half-written
    group is copied back from a ready staged copy, an unready staged copy is dropped.
    The done cell survives every time."""
    url = "memory://growth/c.zarr"
    cube.ensure_experiment(url, "e", GRID, ["W0"], 8.0, ATTRS)
    cube.CubeWriter(url, "e").write([(1.0, 0.5, 64, 0)], [_record()])
    grown = {**GRID, "seed": [0, 1]}
    cube.ensure_experiment(url, "e", grown, ["W0"], 8.0, ATTRS)
    assert sorted(zarr.open_group(url, mode="r").group_keys()) == ["e"]
    ds = cube.open_experiment(url, "e").load()
    assert ds["done"].values.ravel().tolist() == [True, False]

    # killed while overwriting the group: the staged copy is ready, the group is not
    for var in ds.variables.values():
        var.encoding = {}
    ds.to_zarr(url, group="e.__new", mode="w", consolidated=False)
    zarr.open_group(url, path="e.__new", mode="a").attrs[cube.SWAP_READY] = True
    del zarr.open_group(url, mode="a")["e/done"]
    with pytest.raises(KeyError):
        cube.open_experiment(url, "e")["done"]
    cube.recover(url)
    assert sorted(zarr.open_group(url, mode="r").group_keys()) == ["e"]
    repaired = cube.open_experiment(url, "e").load()
    assert repaired["done"].values.ravel().tolist() == [True, False]
    assert cube.SWAP_READY not in repaired.attrs
    xr.testing.assert_identical(repaired, ds)

    # killed while staging: the unready copy goes, the group stays as it was
    ds.isel(seed=[0]).to_zarr(url, group="e.__new", mode="w", consolidated=False)
    cube.recover(url)
    assert sorted(zarr.open_group(url, mode="r").group_keys()) == ["e"]
    xr.testing.assert_identical(cube.open_experiment(url, "e").load(), ds)


def test_cube_reads_happen_in_this_process_not_on_a_default_dask_client(tmp_path):
    """With a Dask client as the default scheduler (a launch's), the launch's own reads
    of the cube (groups, status, the sweep page's tallies) are not dask-backed, so none
    becomes a task queued on the workers behind the training."""
    from distributed import Client, LocalCluster

    from ensemble import launch, monitor

    store = tmp_path / "c.zarr"
    cube.ensure_experiment(store, "e", GRID, ["W0"], 8.0, ATTRS)
    cube.CubeWriter(store, "e").write([(1.0, 0.5, 64, 0)], [_record()])
    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as lc, Client(lc) as c:
        before = c.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.transition_log))
        assert cube.open_experiment(store, "e")["done"].chunks is None
        assert "e: 1/1 done" in launch.store_status(store)
        experiments, tallies, _ = monitor._tallies_from_cube(store)
        assert experiments[0]["name"] == "e" and len(tallies) == 1
        after = c.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.transition_log))
        assert after == before  # no task reached the scheduler


def test_launch_records_are_appended_replaced_and_removed_by_id(tmp_path):
    store = tmp_path / "c.zarr"
    cube.ensure_experiment(store, "e", GRID, ["W0"], 8.0, ATTRS)
    for i in "abc":
        cube.append_launch(store, "e", {"id": i, "ended": "running"})
    cube.replace_launch(store, "e", "b", {"id": "b", "completed": True})
    cube.replace_launch(store, "e", "a", None)
    assert cube.launches(store, "e") == [
        {"id": "b", "completed": True},
        {"id": "c", "ended": "running"},
    ]
    assert xr.open_zarr(store, group="e").attrs["launches"][0] == {"id": "b", "completed": True}
    with pytest.raises(ValueError, match="launch record of 'e' is not JSON-able"):
        cube.append_launch(store, "e", {"id": "d", "wall_s": float("nan")})
    assert len(cube.launches(store, "e")) == 2
