"""Fixtures of the analysis tests: seeded synthetic cubes, a small cube trained by the
engine, and a dask compute counter."""

from __future__ import annotations

import os
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


ENGINE_SWEEP = """
name = "tiny_report"
description = "a small lazy T-sweep at two P and a 2 x 2 phase diagram, for the report tests"
expected_cost = "about a minute on 2 CPU cores"

[[experiment]]
name = "tiny_tsweep"
dataset = "mnist"
arch = "fc"
h = 32
L = 2
B = 8
pte = 256
max_steps = 4000
alpha = [1024.0]
T = {pow2 = [-8, -4, 2]}
P = [32, 64]
seed = 2

[[experiment]]
name = "tiny_phase"
dataset = "mnist"
arch = "fc"
h = 32
L = 2
B = 8
pte = 256
max_steps = 4000
alpha = [0.5, 1024.0]
T = [0.0078125, 0.03125]
P = [64]
seed = 1
"""


@pytest.fixture(scope="session")
def real_cube(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """``ENGINE_SWEEP`` trained by ``ensemble.launch`` (in-process Dask) into cube.zarr."""
    from distributed import Client

    from ensemble.launch import launch

    os.environ["ENSEMBLE_DATA"] = str(data_root)
    tmp = tmp_path_factory.mktemp("real")
    (tmp / "sweep.toml").write_text(ENGINE_SWEEP)
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as c:
        launch(tmp / "sweep.toml", tmp / "cube.zarr", client=c, progress=False)
    return tmp / "cube.zarr"


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
