"""Fixtures of the engine tests."""

from __future__ import annotations

import pytest

from ensemble.cells import Group


@pytest.fixture
def small_fc(data_root) -> Group:
    """A small float64 FC on real MNIST: P = 64, B = 8, pte = 256, h = 32, L = 2."""
    return Group(
        dataset="mnist",
        arch="fc",
        P=64,
        B=8,
        pte=256,
        h=32,
        L=2,
        max_steps=3000,
        dtype="float64",
        data_root=str(data_root),
    )
