"""Open a results cube: one lazy xarray Dataset per experiment group.

The cube is a Zarr (v3) store written by `ensemble`; its layout is described in
`ensemble.schema`. Nothing here reads array values: every variable stays a dask array
until a fit or a plot asks for numbers.
"""

from __future__ import annotations

import os
from typing import Any

import xarray as xr

from ensemble.cube import experiment_names

__all__ = ["CubeError", "Store", "experiment_names", "open_cube"]

Store = str | os.PathLike | Any
"""A path to a Zarr store or any store object that zarr and xarray accept."""


class CubeError(ValueError):
    """A store that is not a results cube, or lacks the groups asked for."""


def open_cube(store: Store) -> dict[str, xr.Dataset]:
    """Open every experiment of a cube lazily.

    Returns ``{experiment name: Dataset}`` in the order of `experiment_names` (CubeError
    where there is no cube or it has no group). Each
    Dataset comes from ``xarray.open_zarr(store, group=name)`` with one dask chunk per
    variable, so its data variables are dask arrays (nothing is read until a result is
    computed) and its group attributes are ``ds.attrs``.
    """
    try:
        names = experiment_names(store)
    except FileNotFoundError as exc:
        raise CubeError(f"{store!s} is not a results cube: {exc}") from None
    if not names:
        raise CubeError(
            f"no experiment groups in the cube {store!r}: the store has no child groups"
            " (is it the root of a cube written by `python -m ensemble run`?)"
        )
    # consolidated=False: read each array's own metadata, which is never stale (a cube
    # is written incrementally) and costs a few small reads per group.
    # chunks=-1: one dask chunk per variable. The storage chunks are one (P, seed) slice
    # each, far too small to be worth a dask task apiece, and a group is a few MB.
    return {
        name: xr.open_zarr(_as_store(store), group=name, consolidated=False, chunks=-1)
        for name in names
    }


def _as_store(store: Store) -> Any:
    """Paths as strings (zarr and xarray both accept them); store objects unchanged."""
    return os.fspath(store) if isinstance(store, os.PathLike) else store
