"""The Zarr cube on disk: group swaps and their recovery after a kill."""

from __future__ import annotations

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
