"""Opening a cube: group names from the root attribute or the listing; lazy arrays."""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from analysis.load import experiment_names, open_cube
from ensemble.schema import CELL_VARS, PERCEPTRON_VARS


def test_open_cube_lists_experiments_in_root_order_and_stays_lazy(cube_path):
    cube = open_cube(cube_path)
    assert list(cube) == [
        "fc_mnist_tsweep",
        "fc_mnist_phase",
        "perceptron_chi0_d16",
        "perceptron_chi1_d16",
    ]
    ds = cube["fc_mnist_tsweep"]
    assert ds["test_error"].dims == ("alpha", "T", "P", "seed")
    for name in CELL_VARS:
        assert isinstance(ds[name].data, da.Array), name
    assert set(PERCEPTRON_VARS) <= set(cube["perceptron_chi1_d16"].data_vars)
    assert ds.attrs["dataset"] == "mnist"
    np.testing.assert_allclose(ds["dt"].values, ds["T"].values * 128 * 16)


def test_groups_missing_from_the_root_attribute_are_listed_too(tmp_path):
    path = tmp_path / "c.zarr"
    zarr.open_group(str(path), mode="w")
    small = xr.Dataset({"done": ("seed", [True, False])})
    for name in ("c_late", "b_phase", "a_tsweep", "a_tsweep.__new"):  # last: a temporary
        small.to_zarr(str(path), group=name, mode="w", consolidated=False)
    assert experiment_names(path) == ["a_tsweep", "b_phase", "c_late"]  # no attribute
    # A stale attribute (as left by a writer that read old consolidated metadata) and a
    # name whose group is gone: attribute order first, then the groups it misses.
    zarr.open_group(str(path), mode="a").attrs["experiments"] = ["b_phase", "gone"]
    with warnings.catch_warnings():  # zarr notes that consolidation is not in the v3 spec
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))
    assert experiment_names(path) == ["b_phase", "a_tsweep", "c_late"]
    cube = open_cube(path)
    assert list(cube) == ["b_phase", "a_tsweep", "c_late"]
    assert cube["b_phase"]["done"].values.tolist() == [True, False]
