"""Shared pytest fixtures."""

from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> pathlib.Path:
    """Directory with the real datasets: $ENSEMBLE_DATA, else <repo>/../shared/data if it
    exists, else <repo>/data. Fails (never skips) when MNIST is missing there; a test that
    needs CIFAR-10 fails with the loader's DataError if it is missing."""
    from ensemble.data import dataset_present

    env = os.environ.get("ENSEMBLE_DATA")
    shared = REPO.parent / "shared" / "data"
    root = pathlib.Path(env) if env else shared if shared.is_dir() else REPO / "data"
    missing = [name for name in ("mnist",) if not dataset_present(name, root)]
    if missing:
        pytest.fail(
            f"no {missing} data under {root}: run `python -m ensemble fetch-data --dataset NAME`"
            " or set ENSEMBLE_DATA to a directory holding the dataset tarballs",
            pytrace=False,
        )
    return root
