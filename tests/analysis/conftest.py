"""Fixtures of the analysis tests: seeded synthetic cubes and a dask compute counter."""

from __future__ import annotations

from pathlib import Path

import dask
import numpy as np
import pytest
from synthetic_cube import perceptron_dataset, phase_dataset, tsweep_dataset, write_cube


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20230131)


@pytest.fixture(scope="session")
def cube_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cube with a T-sweep (chunked like the engine's cubes), a phase diagram and two
    perceptron groups (chi = 0, 1)."""
    rng = np.random.default_rng(1234)
    path = tmp_path_factory.mktemp("cube") / "cube.zarr"
    datasets = {
        "fc_mnist_tsweep": tsweep_dataset(rng),
        "fc_mnist_phase": phase_dataset(rng),
        "perceptron_chi0_d16": perceptron_dataset(rng, 0.0),
        "perceptron_chi1_d16": perceptron_dataset(rng, 1.0),
    }
    return write_cube(path, datasets, engine_chunks=("fc_mnist_tsweep",))


class CountingScheduler:
    """A dask scheduler that counts computes and raises beyond ``max_computes``
    (like xarray's ``raise_if_dask_computes``)."""

    def __init__(self, max_computes: int = 0) -> None:
        self.total_computes = 0
        self.max_computes = max_computes

    def __call__(self, dsk, keys, **kwargs):
        self.total_computes += 1
        if self.total_computes > self.max_computes:
            raise RuntimeError(
                f"Too many computes: {self.total_computes} > {self.max_computes} allowed"
            )
        return dask.get(dsk, keys, **kwargs)


@pytest.fixture
def raise_if_dask_computes():
    scheduler = CountingScheduler(0)
    with dask.config.set(scheduler=scheduler):
        yield scheduler
