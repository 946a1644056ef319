"""The report command on a small real cube trained by the engine (``real_cube``, conftest)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image


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
