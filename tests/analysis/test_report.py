"""The report command: files written, tables filled, degenerate cubes explained."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from PIL import Image
from synthetic_cube import (
    NTK_LAW,
    Laws,
    ntk_phase_dataset,
    perceptron_dataset,
    tsweep_dataset,
    write_cube,
)

from analysis.report import _finite_d_rows, build_report, write_report
from ensemble.schema import DIVERGED

REPO = Path(__file__).resolve().parents[2]


def subset(cube_path: Path, out: Path, names: list[str]) -> Path:
    """A copy of the cube with only the experiment groups ``names``."""
    shutil.copytree(cube_path, out)
    root = zarr.open_group(str(out), mode="a")
    for name in root.attrs["experiments"]:
        if name not in names:
            shutil.rmtree(out / name)
    root.attrs["experiments"] = names
    return out


def table_row(text: str, first_cells: str) -> list[str]:
    """Cells of the markdown table row that starts with ``| first_cells |``."""
    line = next(line for line in text.splitlines() if line.startswith(f"| {first_cells} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


@pytest.fixture(scope="module")
def report_dir(cube_path, tmp_path_factory) -> Path:
    """The report of the T-sweep and phase-diagram groups, written by the command line."""
    tmp = tmp_path_factory.mktemp("report")
    store = subset(cube_path, tmp / "cube.zarr", ["fc_mnist_tsweep", "fc_mnist_phase"])
    out = tmp / "out"
    result = subprocess.run(
        [sys.executable, "-m", "analysis", "report", str(store), "--out", str(out)]
        + ["--n-boot", "30"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out / "report.md")
    return out


def test_report_writes_every_figure(report_dir):
    stems = [
        "fc_mnist_tsweep_tsweep",
        "fc_mnist_tsweep_crossover",
        "fc_mnist_tsweep_dynamics",
        "fc_mnist_phase_phase_P1024",
        "fc_mnist_phase_optimal_T_P1024",
    ]
    names = {p.name for p in (report_dir / "figures").iterdir()}
    assert names == {f"{s}.{ext}" for s in stems for ext in ("png", "svg")}
    for stem in stems:
        with Image.open(report_dir / "figures" / f"{stem}.png") as image:
            pixels = np.asarray(image.convert("L"), dtype=float)
        assert pixels.std() > 10, stem
        assert (report_dir / "figures" / f"{stem}.svg").read_text().lstrip().startswith("<?xml")


def test_report_tables(report_dir):
    laws = Laws()
    text = (report_dir / "report.md").read_text()
    assert "## fc_mnist_tsweep" in text and "## fc_mnist_phase" in text
    assert table_row(text, "experiment") == ["experiment", "fc_mnist_tsweep"]
    assert table_row(text, "all") == ["all", "4", "468", "4", "4", "480"]  # cells per outcome
    for first, true in (
        ("rel_change | T^delta P^gamma | delta", laws.delta),
        ("rel_change | T^delta P^gamma | gamma", laws.gamma),
        ("t_star | T^c P^b | b", laws.b),
    ):
        row = table_row(text, first)
        value, stderr, boot = (float(x) for x in row[3:6])
        assert abs(value - true) < 3 * max(stderr, boot), row
    for definition in ("(a)", "(b)"):
        row = table_row(text, definition)
        a, stderr, boot = (float(x) for x in row[1:4])
        assert abs(a - laws.a) < 3 * max(stderr, boot), row
        assert row[-1].startswith("yes (abs z < ")  # consistent with gamma / delta
    assert "| P | T_c (a) | 95 % interval (a) | T_c (b) | 95 % interval (b) |" in text
    assert "T-sweep figure, fits and T_c(P) skipped: they need at least 2 P" in text  # phase
    # the phase diagram's error rises with T at every alpha: optima at the small-T edge (or
    # the smallest T that trained), resolved where the rise passes its paired t test
    head = "| alpha | T_opt | 68 % interval | class | paired t: fall, rise | lowest test error |"
    optima = text.split(head)[1].split("\n\n")[0].splitlines()[2:]
    assert len(optima) == 7, optima
    resolved = 0
    for line in optima:
        where, t = (cell.strip() for cell in line.split("|")[4:6])
        edge = re.fullmatch(r"(small-T|stability) edge, (resolved|within noise)", where)
        rise = re.fullmatch(r"(-|n < 2|\d+\.\d (>|<=) \d+\.\d\d), (\d+\.\d (>|<=) \d+\.\d\d)", t)
        assert edge and rise, line
        resolved += edge[2] == "resolved"
        if edge[1] == "small-T":  # resolved by the rise alone
            assert (edge[2] == "resolved") == (rise[4] == ">"), line
    assert resolved >= 5, optima  # 5 % seed noise against a rise of 0.01 per octave of T
    assert " failed: " not in text  # no report step failed (`_Section.attempt`)
    for link in ("figures/fc_mnist_tsweep_tsweep.png", "figures/fc_mnist_phase_phase_P1024.svg"):
        assert f"({link})" in text


def test_degenerate_cubes_are_explained_not_fatal(cube_path, tmp_path, rng):
    all_diverged = tsweep_dataset(rng, n_spoiled=0, T=2.0 ** np.arange(-6, -2))
    all_diverged["outcome"][:] = DIVERGED
    one_P = tsweep_dataset(rng, P=(1024,), n_spoiled=0)
    for name in ("ckpt_t", "ckpt_train_loss", "ckpt_test_error"):
        one_P[name][:] = np.nan
    chi1 = xr.open_zarr(cube_path, group="perceptron_chi1_d16", consolidated=False).load()
    one_P_perceptron = perceptron_dataset(rng, 3.0).isel(P=[0])
    path = write_cube(
        tmp_path / "degenerate.zarr",
        {
            "all_diverged": all_diverged,
            "one_P": one_P,
            "perceptron_chi1_d16": chi1,
            "perceptron_one_P": one_P_perceptron,
        },
    )
    text = write_report(path, tmp_path / "out", n_boot=10, formats=("png",)).read_text()
    assert " failed: " not in text  # no report step failed (`_Section.attempt`)
    assert table_row(text, "all") == ["all", "0", "0", "160", "0", "160"]
    assert "figures and fits skipped: no cell converged" in text
    assert "T-sweep figure, fits and T_c(P) skipped: they need at least 2 P, P = [1024]" in text
    assert "perceptron fits skipped: signal: the fit range has a single P = 1024" in text
    for q in ("signal", "snr"):
        assert f"local P-exponents of {q} skipped: local P-exponents need at least 2 P" in text
    assert "dynamics skipped: no converged cell has checkpoint values" in text
    # The complete perceptron group: its exponents next to the predicted ones.
    chi1_part = text[text.index("### Perceptron (chi = 1, d = 16)") :]
    row = table_row(chi1_part, "signal | P")
    assert float(row[4]) == 0.5 and abs(float(row[5])) < 3  # predicted 1/(1+chi), z
    assert "## Perceptron across chi" in text
    figures = sorted(p.name for p in (tmp_path / "out" / "figures").iterdir())
    assert figures == [
        "perceptron_chi1_d16_perceptron.png",
        "perceptron_one_P_perceptron.png",
        "perceptron_summary.png",
    ]


def test_ntk_boundary_against_P(tmp_path):
    """A phase diagram with the NTK change at 3 P: a boundary table per P, the fit
    alpha* ~ P^k at each T (k = NTK_LAW's up to the seed noise) and its figure."""
    ds, _ = ntk_phase_dataset(0, noise=0.05, P=(256, 512, 1024))
    path = write_cube(tmp_path / "ntk.zarr", {"fc_mnist_phase": ds})
    report = build_report(path, tmp_path / "out", n_boot=50, formats=("png",))
    text = report.path.read_text()
    assert " failed: " not in text and "P^k at T = " not in text  # no fit skipped
    er = report.experiments["fc_mnist_phase"]
    assert [f.name for f in er.figures if "ntk_scaling" in f.name] == [
        "fc_mnist_phase_ntk_scaling.png"
    ]
    assert text.count("Lazy / feature-learning boundary at P = ") == 3
    assert "at the largest alpha = 256: lazy by the NTK change, below 1 in all 15 (T, P)" in text
    fits = er.results["ntk_boundary_fits"]
    assert len(fits) == ds.sizes["T"]
    for fit in fits.values():
        assert abs(fit["k"].value - NTK_LAW[2]) < 0.05, fit["k"]
    scaling = text[text.index("boundary against P") :]
    row = table_row(scaling, "2^-8")  # alpha* at each P, then k and its errors
    a0, _, k = NTK_LAW
    for cell, P in zip(row[1:4], (256, 512, 1024), strict=True):
        assert abs(float(cell.removeprefix("2^")) - np.log2(a0 * (P / 1024) ** k)) < 0.1, row
    assert abs(float(row[4]) - k) < 0.05, row
    slopes = er.results["ntk_boundary_T_fits"]  # alpha* ~ T^s at each P
    assert sorted(slopes) == [256, 512, 1024]
    for P, fit in slopes.items():
        assert abs(fit["s"].value - NTK_LAW[1]) < 0.05, fit["s"]
        assert (
            f"The boundary line at P = {P}: alpha* ~ T^s with s = {fit['s']} over the 6 T" in text
        )


def test_finite_d_figure_when_a_chi_has_several_d(tmp_path, rng):
    groups = {
        "chi1_d16": perceptron_dataset(rng, 1.0, d=16, noise_P=-0.1),
        "chi1_d64": perceptron_dataset(rng, 1.0, d=64),
        "chi3_d16": perceptron_dataset(rng, 3.0, d=16),
        "chi1_d64_small_P": perceptron_dataset(rng, 1.0, d=64).isel(P=[0, 1]),
    }
    path = write_cube(tmp_path / "d.zarr", groups)
    report = build_report(path, tmp_path / "out", n_boot=100, formats=("png",))
    text = report.path.read_text()
    assert " failed: " not in text  # no report step failed (`_Section.attempt`)
    assert [f.stem for f in report.summary_figures] == ["perceptron_summary", "perceptron_finite_d"]
    # one point per (chi, d, quantity): the group reaching the largest P
    rows = _finite_d_rows(report)
    assert len(rows) == 6
    assert {r["P_hi"] for r in rows if r["chi"] == 1.0 and r["d"] == 64} == {16384}
    # the local table of chi1_d16: signal near 0.5, s / n near 0.6 (noise ~ P^-0.1)
    part = text[text.index("## chi1_d16") : text.index("## chi1_d64")]
    row = table_row(part, "8192-16384")
    assert abs(float(row[1]) - 0.5) < 4 * float(row[2]), row
    assert abs(float(row[3]) - 0.6) < 4 * float(row[4]), row


def test_finite_d_falls_back_to_the_largest_pair_with_a_mean(tmp_path, rng):
    """A group whose largest P has no converged seed keeps its point from the next pair."""
    ds = perceptron_dataset(rng, 1.0, d=16)
    ds["outcome"].loc[{"P": 16384}] = DIVERGED
    report = build_report(
        write_cube(tmp_path / "d.zarr", {"chi1": ds}), tmp_path / "out", n_boot=50, formats=("png",)
    )
    rows = _finite_d_rows(report)
    assert {(r["quantity"], r["P_lo"], r["P_hi"]) for r in rows} == {
        ("signal", 4096, 8192),
        ("snr", 4096, 8192),
    }
    assert all(np.isfinite(r["fitted"]) for r in rows)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["report", "{tmp}/absent.zarr"], "absent.zarr is not a results cube"),
        (["report", "{tmp}/a_file"], "a_file is not a results cube"),
        (["report", "{cube}", "--experiments", "nope"], "experiments ['nope'] are not groups"),
        (["report", "{cube}", "--out", "{tmp}/a_file"], "a_file exists and is not a folder"),
        (["report", "{cube}", "--formats", "xyz"], "--formats: formats must be matplotlib"),
        (["reproduce", "{tmp}/m.toml", "--formats", "png,xyz"], "got ['png', 'xyz']"),
    ],
)
def test_cli_refuses_bad_input_with_one_line(tmp_path, cube_path, args, message):
    """Exit status 2 and one line naming the problem, not a traceback; nothing written."""
    (tmp_path / "a_file").write_text("not a cube")
    args = [a.format(tmp=tmp_path, cube=cube_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    result = subprocess.run(
        [sys.executable, "-m", "analysis", *args], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_settings_table_lists_what_the_architecture_uses(report_dir):
    """The group attributes hold every Group field; the report's settings table leaves
    out those the architecture ignores (an FC network has no d or chi)."""
    part = (report_dir / "report.md").read_text().split("### Settings")[1]
    table = part.split("\n\n")[1]
    assert "| L | 5 |" in table and "| activation | relu |" in table
    assert "| d |" not in table and "| chi |" not in table


def test_launches_table_shows_failed_cells_and_how_each_launch_ended():
    """A launch record's failed cells and whether it completed (``completed`` False: it
    was interrupted or failed) are columns of the report's launches table."""
    from pathlib import Path

    from analysis.report import _launches, _Section

    records = [
        {"started": "s1", "command": "c", "device": "cpu", "n_workers": 2}
        | {"cells_trained": 7, "cells_failed": 0, "completed": False, "wall_s": 3.0},
        {"started": "s2", "command": "c", "device": "cpu", "n_workers": 2}
        | {"cells_trained": 0, "cells_failed": 8, "completed": True, "wall_s": 1.0},
    ]
    section = _Section(Path("."), "x", ())
    _launches(section, records)
    rows = [ln for ln in section.lines if ln.startswith(("| s1", "| s2"))]
    assert rows == [
        "| s1 | `c` | cpu | 2 | 7 | 0 | interrupted or failed | 3.0 |",
        "| s2 | `c` | cpu | 2 | 0 | 8 | completed | 1.0 |",
    ]
    section = _Section(Path("."), "x", ())
    _launches(section, [])
    assert section.lines[0].startswith("Launches: none recorded")
