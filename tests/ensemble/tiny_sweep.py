"""The tiny FC sweep the Dask tests run (8 cells of a small FC on real MNIST)."""

from __future__ import annotations

from pathlib import Path

TINY = """
name = "tiny"
description = "tiny test sweep"
expected_cost = "seconds"

[[experiment]]
name = "tiny_fc"
dataset = "mnist"
arch = "fc"
h = 32
L = 2
B = 8
pte = 256
max_steps = 3000
alpha = {alpha}
T = {T}
P = [64]
seed = {seeds}
"""


def write_sweep(path: Path, alpha="[1.0, 1024.0]", T="[0.0078125, 0.03125]", seeds=2) -> Path:
    path.write_text(TINY.format(alpha=alpha, T=T, seeds=seeds))
    return path
