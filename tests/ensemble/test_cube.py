"""The Zarr cube on disk: group swaps and their recovery after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import xarray as xr

from ensemble import cube

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
    assert not (tmp_path / "s.zarr.lock").exists()
