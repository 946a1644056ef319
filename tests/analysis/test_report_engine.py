"""The report command on a small real cube trained by the engine (in-process Dask)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from distributed import Client
from PIL import Image

SWEEP = """
name = "tiny_report"
description = "a small lazy T-sweep at two P, for the report test"
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


@pytest.fixture(scope="module")
def real_cube(tmp_path_factory, data_root):
    from ensemble.launch import launch

    os.environ["ENSEMBLE_DATA"] = str(data_root)
    tmp = tmp_path_factory.mktemp("real")
    (tmp / "sweep.toml").write_text(SWEEP)
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as c:
        launch(tmp / "sweep.toml", tmp / "cube.zarr", client=c, progress=False)
    return tmp / "cube.zarr"


def test_report_on_engine_cube(real_cube, tmp_path):
    out = tmp_path / "report"
    subprocess.run(
        [sys.executable, "-m", "analysis", "report", str(real_cube), "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    text = (out / "report.md").read_text()
    for name in ("tiny_tsweep", "tiny_phase"):
        assert f"## {name}" in text
    assert "converged" in text
    pngs = sorted((out / "figures").glob("*.png"))
    names = {p.name for p in pngs}
    assert "tiny_phase_phase_P64.png" in names
    assert any(n.startswith("tiny_tsweep_tsweep") for n in names), names
    for p in pngs:
        assert (p.with_suffix(".svg")).exists()
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            assert len(np.unique(np.asarray(im.convert("L")))) > 10  # not blank


def test_phase_diagram_axes_on_engine_cube(real_cube):
    import xarray as xr

    from analysis.plots import phase_diagram

    ds = xr.open_zarr(real_cube, group="tiny_phase")
    fig = phase_diagram(ds, P=64)
    labels = {ax.get_xlabel() for ax in fig.axes} | {ax.get_ylabel() for ax in fig.axes}
    assert any("alpha" in s for s in labels) and any("T" in s for s in labels)
