"""``python -m analysis reproduce``: the page, its provenance, readings and errors."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from synthetic_cube import optimum_dataset, perceptron_dataset, tsweep_dataset, write_cube

from analysis.aggregate import mean_stderr
from analysis.cli import main
from analysis.report import analysis_commit
from analysis.reproduction import (
    ManifestError,
    _commits,
    absent_runs,
    error_trend,
    load_manifest,
    provenance,
    reproduce,
    verdict,
)
from ensemble.schema import CONVERGED, DIMS, LAUNCHES_ATTR, MISSING

REPO = Path(__file__).resolve().parents[2]


def manifest(path: Path, *runs: dict, title: str = "Test reproduction") -> Path:
    """Write a manifest with one [[run]] table per dict."""
    lines = [f'title = "{title}"']
    for run in runs:
        lines.append("[[run]]")
        for k, v in run.items():
            value = "[" + ", ".join(f'"{x}"' for x in v) + "]" if isinstance(v, list) else f'"{v}"'
            lines.append(f"{k} = {value}")
    path.write_text("\n".join(lines) + "\n")
    return path


def image_links(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


def table_row(text: str, first_cell: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def estimate(cell: str) -> tuple[float, float]:
    value, error = cell.split("±")
    return float(value), float(error)


# -- the engine's cube: real launch records -------------------------------------------


@pytest.fixture(scope="module")
def engine_page(real_cube: Path, tmp_path_factory) -> Path:
    """reproduction.md of the engine-made cube (two runs), by the command line, with the
    store path relative to the working directory."""
    tmp = tmp_path_factory.mktemp("engine_page")
    m = manifest(
        tmp / "m.toml",
        {"key": "phase", "title": "Tiny phase", "store": "cube.zarr"}
        | {"experiments": ["tiny_phase"], "sweep": "sweep.toml"},
        {"key": "tsweep", "title": "Tiny T-sweep", "store": "cube.zarr"}
        | {"experiments": ["tiny_tsweep"]},
    )
    out = tmp / "docs"
    result = subprocess.run(
        [sys.executable, "-m", "analysis", "reproduce", str(m), "--out", str(out)]
        + ["--n-boot", "20"],
        capture_output=True,
        text=True,
        cwd=real_cube.parent,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out / "reproduction.md")
    return out


def test_page_states_how_it_was_made(engine_page):
    text = (engine_page / "reproduction.md").read_text()
    assert text.startswith("# Test reproduction\n")
    assert "by `python -m analysis reproduce" in text and "--n-boot 20`" in text
    # the analysis code that wrote it: this checkout's commit (dirty while edited)
    assert re.search(r"\(analysis code ([0-9a-f]{40}(\+dirty)?|unknown)\)", text)
    assert f"(analysis code {analysis_commit()})" in text


def test_provenance_table_reads_the_launch_records(engine_page, real_cube):
    text = (engine_page / "reproduction.md").read_text()
    phase = table_row(text, "[`phase`](reproduction/phase/report.md)")
    tsweep = table_row(text, "[`tsweep`](reproduction/tsweep/report.md)")
    # run, sweep, command(s), device, wall time, cells, outcomes, code
    link = re.fullmatch(r"\[`sweep.toml`\]\((.+)\)", phase[1])  # the file exists: linked
    assert link and (engine_page / link.group(1)).resolve() == real_cube.parent / "sweep.toml"
    assert tsweep[1] == "`tiny_report`"  # no sweep in the manifest: the cube's name
    for row, cells in ((phase, 4), (tsweep, 12)):
        assert row[2] == "`python API`"
        assert row[3].startswith("cpu (") and "at group creation" not in row[3]
        wall = re.fullmatch(r"(\d+ min )?([\d.]+) s \(1 launch\)", row[4])  # a busy CPU: > 1 min
        assert wall and (wall.group(1) or float(wall.group(2)) > 0), row[4]
        assert row[5] == f"{cells} / {cells}"
        assert re.fullmatch(r"`[0-9a-f]{10}(\+dirty)?`|`unknown`", row[7]), row[7]
    # one launch trained both groups: the same wall time in both rows
    assert phase[4] == tsweep[4]


def test_each_run_has_its_report_and_embedded_figures(engine_page):
    text = (engine_page / "reproduction.md").read_text()
    links = image_links(text)
    for key, group, suffix in (("phase", "tiny_phase", "phase_P64"), ("tsweep", "tiny_tsweep", "")):
        assert (engine_page / "reproduction" / key / "report.md").is_file()
        assert f"## {group}" in (engine_page / "reproduction" / key / "report.md").read_text()
        mine = [link for link in links if link.startswith(f"reproduction/{key}/figures/{group}")]
        assert mine, links
        assert all(suffix in link for link in mine)
    for link in links:
        assert (engine_page / link).is_file(), link
        assert "dynamics" not in link  # detail stays in the run's report
    assert "Phase diagram at P = 64" in text
    assert "| delta | rel. change ~ T^delta P^gamma |" in text


# -- synthetic cubes: readings with known answers ---------------------------------------


@pytest.fixture(scope="module")
def synthetic_page(cube_path: Path, tmp_path_factory) -> str:
    """The page of the session's synthetic cube (T-sweep, phase diagram, chi = 0, 1)."""
    tmp = tmp_path_factory.mktemp("synthetic_page")
    m = manifest(
        tmp / "m.toml",
        {"key": "tsweep", "title": "T-sweep", "store": str(cube_path)}
        | {"experiments": ["fc_mnist_tsweep"]},
        {"key": "phase", "title": "Phase", "store": str(cube_path)}
        | {"experiments": ["fc_mnist_phase"]},
        {"key": "perceptron", "title": "Perceptron", "store": str(cube_path)}
        | {"experiments": ["perceptron_chi0_d16", "perceptron_chi1_d16"]},
    )
    return reproduce(m, tmp / "out", n_boot=20).read_text()


def test_cube_without_launch_records_says_not_recorded(synthetic_page):
    row = table_row(synthetic_page, "[`tsweep`](reproduction/tsweep/report.md)")
    assert row[2] == "not recorded" and row[4] == "not recorded"
    assert row[3] == "synthetic (at group creation)"
    assert row[1] == "`synthetic`"


def test_tsweep_reading_recovers_the_synthetic_laws(synthetic_page):
    # synthetic_cube.Laws: delta 0.5, gamma 0.35, c 1, b 1.4, a = gamma/delta = 0.7
    for symbol, truth in (("delta", 0.5), ("gamma", 0.35), ("c", 1.0), ("b", 1.4)):
        value, error = estimate(table_row(synthetic_page, symbol)[2])
        assert abs(value - truth) < 4 * error + 0.01, (symbol, value, error)
    a, a_err = estimate(table_row(synthetic_page, "a (a)")[2])
    assert abs(a - 0.7) < 4 * a_err + 0.02
    assert re.search(
        r"- a \(a\) = .* z = -?\d+\.\d\d with the paired error .*, consistent", synthetic_page
    )
    assert re.search(
        r"^T-sweep at the largest alpha = \S+, taken as the lazy regime \(no NTK change"
        r" measured\):$",
        synthetic_page,
        re.M,
    )
    # the test error per P: it rises past T_c (b) in these laws, by a paired t test
    assert "Test error against T at alpha = 2^15: seed means ± stderr" in synthetic_page
    for P in (1024, 2048, 4096, 8192, 16384):
        row = table_row(synthetic_page, str(P))
        assert row[4].endswith("noise hurts") and row[5].endswith(", rises past it"), row


def test_phase_reading_of_the_synthetic_diagram(synthetic_page):
    # phase_dataset: the error rises with T at every alpha; diverged for alpha <= 1 at
    # T >= 2^-4; best at the largest alpha and smallest T.
    for alpha in ("2^-4", "2^-2", "1", "2^2", "2^4", "2^6", "2^8"):
        assert "noise hurts" in table_row(synthetic_page, alpha)[5], alpha
    assert table_row(synthetic_page, "2^-2")[6] == "T = 2^-4: 3/3 diverged; T = 2^-2: 3/3 diverged"
    assert table_row(synthetic_page, "2^2")[6] == "none"
    assert "Lowest test error" in synthetic_page and "at alpha = 2^8, T = 2^-12." in synthetic_page
    assert "- Noise hurts (error rises with T) at alpha = 2^-4, 2^-2, 1, 2^2" in synthetic_page
    # no interior optimum: the optimal T is at the small-T edge everywhere
    line = next(ln for ln in synthetic_page.splitlines() if ln.startswith("- Optimal temp"))
    assert line.startswith("- Optimal temperature at P = 1024: small-T edge at alpha = 2^-4")
    assert "interior" not in line.split(".")[0]
    assert "(interior) not fitted" in line and "(best trainable T) not fitted" in line


def test_optimal_temperature_reading(tmp_path):
    """A diagram with T_opt = 2^-8 alpha^0.5 on the feature side: the page gives k and
    embeds the optimal-T figure."""
    groups = {"feature": optimum_dataset(np.random.default_rng(5), k=0.5)}
    write_cube(tmp_path / "f.zarr", groups)
    m = manifest(tmp_path / "m.toml", {"key": "f", "title": "F", "store": str(tmp_path / "f.zarr")})
    page = reproduce(m, tmp_path / "out", n_boot=50).read_text()
    line = next(ln for ln in page.splitlines() if ln.startswith("- Optimal temperature"))
    assert "stability edge at alpha = 2^-10 (T_opt = 2^-14.0)" in line
    assert "small-T edge at alpha = 2^8 (T_opt = 2^-16.0)" in line
    k = re.search(
        r"the 4 alphas <= 1 with interior optima \(interior\): k = (\d+\.\d+)"
        r" ± (\d+\.\d+) \(chi2_red \d+\.\d\d; 4 of the 4 optima resolved",
        line,
    )
    assert k and abs(float(k.group(1)) - 0.5) < max(3 * float(k.group(2)), 0.05), line
    both = "the 5 alphas <= 1 with interior or stability edge optima (best trainable T)"
    assert both in line and "within noise" not in line
    assert "reproduction/f/figures/feature_optimal_T_P256.png" in image_links(page)
    # every seed of alpha = 2^-10 diverges from T = 2^-13 on, none elsewhere
    edge = next(ln for ln in page.splitlines() if ln.startswith("- Divergence temperature"))
    assert edge == (
        "- Divergence temperature T_div (where half the finished seeds diverged, interpolated"
        " in log T): 2^-13.50 at alpha = 2^-10; above the grid at alpha = 2^-6; above the"
        " grid at alpha = 2^-4; above the grid at alpha = 2^-2; above the grid at alpha = 1;"
        " above the grid at alpha = 2^8. T_div ~ alpha^k not fitted: fewer than 3 alphas <="
        " 1 with a T_div."
    )


def test_tsweep_on_too_few_T_says_why_definition_b_is_not_measured(tmp_path):
    """Two T: T_c (a) still interpolates between them, but the test error's departure
    from a 3-point plateau cannot be measured; the report and the page say so instead of
    "T_c found for 0 of N P"."""
    ds = tsweep_dataset(np.random.default_rng(2), T=np.array([2.0**-12, 2.0**-6]), n_spoiled=0)
    write_cube(tmp_path / "t.zarr", {"two_T": ds})
    m = manifest(tmp_path / "m.toml", {"key": "t", "title": "T", "store": str(tmp_path / "t.zarr")})
    page = reproduce(m, tmp_path / "out", n_boot=20).read_text()
    why = "needs at least 4 T (3 on the small-T plateau and one to depart from it), the grid has 2"
    row = table_row(page, "a (b)")
    assert row[2] == f"not measured: definition (b) {why}" and row[3] == "0"
    assert "±" in table_row(page, "a (a)")[2]  # (a) interpolates between the 2 T
    report = (tmp_path / "out" / "reproduction" / "t" / "report.md").read_text()
    assert f"- T_c definition (b) skipped: definition (b) {why}" in report


def test_lowest_error_is_read_where_the_trends_compare():
    """The lowest cell is ranked among each alpha's compared T: not where 1 or 2 of 6
    seeds converged and the others diverged, but where 2 seeds are all there are."""
    from analysis.reproduction import _phase_summary

    T = 2.0 ** np.arange(-4, 0)
    coords = {"alpha": [1.0, 4.0], "T": T, "seed": np.arange(6)}
    values = xr.DataArray(np.full((2, 4, 6), np.nan), dims=("alpha", "T", "seed"), coords=coords)
    values[0, :2] = [[0.20], [0.15]] + np.linspace(-0.01, 0.01, 6)
    values[0, 2, :2] = [0.09, 0.11]  # 2 of 6 seeds at the edge: below half the best count
    values[0, 3, :1] = 0.05  # 1 of 6
    values[1, :, :2] = [[0.3], [0.25], [0.2], [0.16]] + np.array([-0.01, 0.01])  # 2 seeds
    err = mean_stderr(values)
    rel = xr.Dataset({"mean": (("alpha", "T"), np.full((2, 4), 0.1))}, coords=coords)
    (line, *_) = _phase_summary(err, rel, {}, values)
    assert line == (
        "- Lowest test error 0.1500 ± 0.0031 (6 seeds) at alpha = 1, T = 2^-3"
        " (among the T each alpha's trend compares)."
    )
    values[1, 3, :2] -= 0.02  # alpha = 4 reaches 0.14 with its 2 seeds: ranked
    (line, *_) = _phase_summary(mean_stderr(values), rel, {}, values)
    assert line.startswith("- Lowest test error 0.1400 ± 0.0100 (2 seeds) at alpha = 2^2, T = 2^-1")
    alone = values.isel(seed=[0])  # one seed everywhere: every cell is ranked
    line = _phase_summary(mean_stderr(alone), rel, {}, alone)[0]
    assert line == "- Lowest test error 0.0500 (1 seed) at alpha = 1, T = 2^-1."


def _seeds(means, spread=(-0.002, 0.0, 0.002)) -> np.ndarray:
    """values[T, seed]: each mean with the same per-seed offsets (NaN stays NaN)."""
    return np.asarray(means, dtype=float)[:, None] + np.asarray(spread)[None, :]


def test_error_trend_classes():
    T = 2.0 ** np.arange(-4, 0)
    jitter = np.array([[0, 1, -1], [1, -1, 0], [-1, 0, 1], [0, -1, 1]]) * 1e-3
    assert error_trend(T, _seeds([0.2, 0.15, 0.12, 0.11]) + jitter).kind == "helps"
    assert error_trend(T, _seeds([0.2, 0.1, 0.15, 0.2]) + jitter).kind == "optimum"
    assert error_trend(T, _seeds([0.1, 0.11, 0.12, np.nan]) + jitter).kind == "hurts"
    flat = error_trend(T, _seeds([0.1, 0.1005, 0.0995, 0.101]) + jitter)
    assert flat.kind == "flat" and flat.last[0] == T[-1]
    assert flat.text.endswith("no significant change")
    peak = error_trend(T, _seeds([0.1, 0.15, 0.2, 0.1]) + jitter)
    assert peak.kind == "peak" and peak.best[0] == T[0], peak.text
    assert peak.text == (  # corrected for the 2 inner T: t_2 at 1 - 0.025 / 2 = 6.21
        "rises by 0.100 (t = 100.0 > 6.21, 3 seeds) from T = 2^-4 to 2^-2, then falls by"
        " 0.100 (t = 173.2 > 6.21, 3 seeds) from T = 2^-2 to 2^-1: highest on the grid at"
        " T = 2^-2"
    )
    # a bump that does not fall back significantly stays flat (the ends do not differ)
    assert error_trend(T, _seeds([0.1, 0.1, 0.1015, 0.1]) + jitter).kind == "flat"
    assert error_trend(T, _seeds([0.1, np.nan, np.nan, np.nan])) is None
    # a one-seed mean (no stderr) is not the lowest where others have errors
    lone = _seeds([0.2, 0.15, 0.1, 0.18]) + jitter
    lone[2, 1:] = np.nan
    assert error_trend(T, lone).best[0] == T[1]
    # one seed at both ends of every change: nothing is judged
    single = error_trend(T, _seeds([0.2, 0.15, 0.1, 0.05], spread=(0.0,)))
    assert single.kind == "flat" and "1 seed at both: not judged" in single.text
    # 2 seeds that rise by exactly the same amount (test errors are multiples of 1 / pte):
    # no spread for a t test, and a sign test over 2 seeds cannot pass (the quick FC
    # T-sweep's P = 256 read "t = inf > 12.71 ... noise hurts" before)
    alike = error_trend(T, np.array([[357, 380], [360, 383], [370, 393], [393, 416]]) / 2048)
    assert alike.kind == "flat", alike.text
    assert alike.text == (
        "rises by 0.018 (the same in all 2 seeds, sign test p = 0.5 > 0.05) from T = 2^-4"
        " to 2^-1: no significant change"
    )
    many = error_trend(T, np.tile([[357], [360], [370], [393]], 6) / 2048 + np.arange(6) / 2048)
    assert (
        many.kind == "hurts" and "the same in all 6 seeds, sign test p = 0.031 <= 0.05" in many.text
    )
    # the largest T where one seed of three converged is not an end: the rise to the
    # T before it is judged (it would not be, 1 seed at both ends of the change)
    edge = _seeds([0.1, 0.11, 0.12, 0.3]) + jitter
    edge[3, 1:] = np.nan
    trend = error_trend(T, edge)
    assert trend.last[0] == T[2] and trend.kind == "hurts", trend.text
    assert "from T = 2^-4 to 2^-2: noise hurts" in trend.text


def test_error_trend_pairs_seeds():
    """Seed offsets shared across T (init, training set and batches are the seed's) hide
    a fall from an unpaired comparison, not from the paired one."""
    T = 2.0 ** np.arange(-4, 0)
    values = _seeds([0.2, 0.19, 0.18, 0.17], spread=(-0.05, 0.0, 0.05, 0.02, -0.02))
    values += np.random.default_rng(0).normal(0, 1e-3, values.shape)
    trend = error_trend(T, values)
    assert trend.kind == "helps", trend.text
    unpaired = abs(trend.last[1] - trend.first[1]) / np.hypot(trend.first[2], trend.last[2])
    assert unpaired < 2  # what the old combined-stderr test saw
    assert "5 seeds" in trend.text


@pytest.mark.parametrize("n_seed", [3, 5])
@pytest.mark.parametrize("seed_spread", [0.0, 0.01])
def test_error_trend_is_calibrated_when_T_changes_nothing(n_seed, seed_spread):
    """No effect of T: at most about 5 % of (8 T x n seeds) diagrams may read as a trend,
    although the lowest of 8 noisy means is picked (the old unpaired 2-sigma test: 27.5 %
    and 17 % without seed offsets, at 3 and 5 seeds)."""
    rng = np.random.default_rng(n_seed)
    T = 2.0 ** np.arange(-8, 0)
    kinds = []
    for _ in range(400):
        offsets = rng.normal(0, seed_spread, (1, n_seed))
        kinds.append(error_trend(T, 0.2 + offsets + rng.normal(0, 0.005, (8, n_seed))).kind)
    false = 1 - kinds.count("flat") / len(kinds)
    assert false <= 0.08, (false, {k: kinds.count(k) for k in set(kinds)})


# -- perceptron verdicts ----------------------------------------------------------------


def test_verdict_wording():
    assert verdict(0.53, 0.2, 0.5) == "agrees within 0.05"
    assert verdict(0.44, 0.01, 0.5) == "differs by 6.0 sigma"
    assert verdict(0.40, 0.15, 0.5) == "agrees within 1 sigma"
    assert verdict(0.40, math.nan, 0.5) == "differs by 0.100 (no error estimate)"
    assert verdict(math.nan, 0.1, 0.5) == "no estimate"


@pytest.fixture(scope="module")
def perceptron_page(tmp_path_factory) -> str:
    """Perceptron groups with known signal exponents 1/(1+chi): chi = 1 and 3 labelled
    right, and the chi = 1 data labelled chi = 0 (predicted 1, true 0.5)."""
    rng = np.random.default_rng(7)
    tmp = tmp_path_factory.mktemp("perceptron_page")
    wrong = perceptron_dataset(rng, 1.0)
    wrong.attrs["chi"] = 0.0
    groups = {
        "chi1": perceptron_dataset(rng, 1.0),
        "chi3": perceptron_dataset(rng, 3.0, d=32),
        "mislabelled": wrong,
    }
    write_cube(tmp / "p.zarr", groups)
    m = manifest(tmp / "m.toml", {"key": "p", "title": "P", "store": str(tmp / "p.zarr")})
    return reproduce(m, tmp / "out", n_boot=20).read_text()


def test_perceptron_table_verdicts(perceptron_page):
    header = table_row(perceptron_page, "group")
    rows = {name: table_row(perceptron_page, f"`{name}`") for name in ("chi1", "chi3")}
    rows["mislabelled"] = table_row(perceptron_page, "`mislabelled`")
    col = {name: header.index(name) for name in header}  # "verdict": the signal fit's
    assert [r[col["chi"]] for r in rows.values()] == ["1", "3", "0"]
    assert rows["chi3"][col["d"]] == "32"
    # rows sorted by (chi, d)
    order = [ln for ln in perceptron_page.splitlines() if ln.startswith("| `")]
    assert [ln.split("`")[1] for ln in order] == ["mislabelled", "chi1", "chi3"]
    for name in ("chi1", "chi3"):
        row = rows[name]
        assert row[col["verdict"]] == "agrees within 0.05", row
        assert row[-1] == "agrees within 0.05", row  # noise, predicted 0
    bad = rows["mislabelled"]
    fitted, error = estimate(bad[col["signal P-exp. (fit)"]])
    assert abs(fitted - 0.5) < 0.05 and bad[col["1/(1+chi)"]] == "1.0000"
    sigma = float(re.fullmatch(r"differs by ([\d.]+) sigma", bad[col["verdict"]]).group(1))
    assert sigma == pytest.approx(abs(fitted - 1.0) / error, rel=0.05, abs=0.1)
    # local exponents: one column per successive P pair, values near 1/(1+chi)
    pairs = [h for h in header if h.startswith("local ")]
    assert pairs == ["local 1024-2048", "local 2048-4096", "local 4096-8192", "local 8192-16384"]
    for pair in pairs:
        value, error = estimate(rows["chi1"][col[pair]])
        assert abs(value - 0.5) < 4 * error, (pair, value, error)
    assert rows["mislabelled"][col["verdict (largest P pair)"]].startswith("differs by")
    # s / n at the largest pair: the noise is flat here, so it agrees like the signal
    snr = col["s / n, largest P pair"]
    value, error = estimate(rows["chi1"][snr])
    assert abs(value - 0.5) < 4 * error and error < 0.1
    assert rows["chi1"][snr + 1] in ("agrees within 0.05", "agrees within 1 sigma")
    assert rows["mislabelled"][snr + 1].startswith("differs by")


# -- provenance from launch records -----------------------------------------------------


def small_group(launches: list[dict] | None, n_done: int) -> xr.Dataset:
    """A 1 x 2 x 1 x 4 group with ``n_done`` converged cells and the given records."""
    shape = (1, 2, 1, 4)
    done = np.zeros(shape, bool)
    done.flat[:n_done] = True
    outcome = np.where(done, CONVERGED, MISSING).astype(np.int8)
    attrs = {"sweep": "s", "device": "cpu (2 cores)", "git_commit": "abc"}
    if launches is not None:
        attrs[LAUNCHES_ATTR] = launches
    return xr.Dataset(
        {"done": (DIMS, done), "outcome": (DIMS, outcome)},
        coords={"alpha": [1.0], "T": [0.1, 0.2], "P": [64], "seed": np.arange(4)},
        attrs=attrs,
    )


def test_provenance_counts_each_launch_once():
    one = {"id": "a", "command": "python -m ensemble run s", "wall_s": 10.0, "cells_trained": 3}
    two = {"id": "b", "command": "python API", "wall_s": 5.5, "cells_trained": 2}
    p = provenance(
        {
            "g1": small_group([one, two], 5),
            "g2": small_group([{**one, "cells_trained": 4}], 4),
        }
    )
    assert [r["id"] for r in p.launches] == ["a", "b"]
    assert p.wall_s == 15.5 and p.recorded == 9
    assert (p.done, p.total) == (9, 16)
    assert p.outcomes == {"missing": 7, "converged": 9, "diverged": 0, "unfinished": 0}


def test_provenance_of_a_killed_launch():
    """A launch settled as killed (no wall time) counts its cells and is named untimed;
    the timed launches' wall time is still summed."""
    from analysis.reproduction import _launch_cells

    timed = {"id": "a", "command": "c", "device": "cpu", "wall_s": 10.0, "cells_trained": 3}
    killed = {**timed, "id": "k", "wall_s": None, "completed": False, "ended": "killed"}
    p = provenance({"g": small_group([killed, timed], 5)})
    assert p.wall_s == 10.0 and p.untimed == 1 and p.recorded == 6
    assert _launch_cells(p)[2] == "10.0 s (2 launches; 1 of them killed or running, not timed)"


def test_commits_keep_the_dirty_mark():
    """A launch from uncommitted code says so in the report's code column."""
    clean = {"id": "a", "git_commit": "0123456789abcdef", "cells_trained": 1}
    dirty = {"id": "b", "git_commit": "fedcba9876543210+dirty", "cells_trained": 1}
    p = provenance({"g": small_group([clean, dirty], 2)})
    assert _commits(p) == "`0123456789`, `fedcba9876+dirty`"


def test_provenance_without_records():
    p = provenance({"g": small_group(None, 8)})
    assert p.launches == [] and p.wall_s is None and p.recorded == 0
    assert p.fallback_devices == ["cpu (2 cores)"]


# -- manifest and missing cubes -----------------------------------------------------------


def test_missing_store_fails_before_writing(cube_path, tmp_path, capsys):
    m = manifest(
        tmp_path / "m.toml",
        {"key": "here", "title": "Here", "store": str(cube_path)}
        | {"experiments": ["fc_mnist_phase"]},
        {"key": "gone", "title": "Gone", "store": "results/nowhere.zarr"},
    )
    out = tmp_path / "out"
    assert main(["reproduce", str(m), "--out", str(out), "--n-boot", "5"]) == 2
    err = capsys.readouterr().err
    assert "run 'gone'" in err and "results/nowhere.zarr does not exist" in err
    assert "--skip-missing" in err
    assert not out.exists()  # nothing written, not even the present run's figures
    with pytest.raises(ManifestError, match="run 'gone'"):
        reproduce(m, out)


def test_skip_missing_notes_the_absent_cube(cube_path, tmp_path):
    m = manifest(
        tmp_path / "m.toml",
        {"key": "here", "title": "Here", "store": str(cube_path)}
        | {"experiments": ["fc_mnist_phase"]},
        {"key": "gone", "title": "Gone", "store": "results/nowhere.zarr", "sweep": "x"},
    )
    text = reproduce(m, tmp_path / "out", skip_missing=True, n_boot=5).read_text()
    assert "Not regenerated: store results/nowhere.zarr does not exist" in text
    assert table_row(text, "`gone`")[2] == "not regenerated"
    assert (tmp_path / "out/reproduction/here/figures/fc_mnist_phase_phase_P1024.png").is_file()
    assert not (tmp_path / "out/reproduction/gone").exists()


def test_skip_missing_with_every_cube_absent_writes_the_page(tmp_path, monkeypatch):
    """With no cube at all the page is still written, into a folder created for it, and
    it does not name the directory the command ran in."""
    monkeypatch.chdir(tmp_path)
    m = manifest(
        tmp_path / "m.toml",
        {"key": "gone", "title": "Gone", "store": "results/nowhere.zarr", "sweep": "x"},
    )
    text = reproduce(m.name, Path("new/out"), skip_missing=True, n_boot=5).read_text()
    assert "Not regenerated: store results/nowhere.zarr does not exist" in text
    assert str(tmp_path) not in text  # with a relative manifest and output folder


def test_skip_missing_keeps_the_last_section_of_an_absent_cube(cube_path, tmp_path):
    """A run whose cube is gone keeps the section an earlier call wrote from it, marked
    with that call's date and analysis code; its provenance row says so too."""
    import shutil

    cube = tmp_path / "c.zarr"
    shutil.copytree(cube_path, cube)
    runs = (
        {"key": "stays", "title": "Stays", "store": str(cube_path)}
        | {"experiments": ["fc_mnist_phase"]},
        {"key": "goes", "title": "Goes", "store": str(cube)} | {"experiments": ["fc_mnist_phase"]},
    )
    m = manifest(tmp_path / "m.toml", *runs)
    out = tmp_path / "out"
    first = reproduce(m, out, n_boot=5).read_text()
    assert "Not regenerated" not in first
    kept = json.loads((out / "reproduction/goes/page.json").read_text())
    assert kept["analysis_code"] == analysis_commit() and kept["section"][0] == "## Goes"
    shutil.rmtree(cube)
    second = reproduce(m, out, skip_missing=True, n_boot=5).read_text()
    goes = second[second.index("## Goes") :]
    assert goes.startswith(f"## Goes\n\n**Not regenerated**: store {cube} does not exist")
    assert f"written on {kept['generated']} by analysis code `{analysis_commit()[:10]}" in goes
    assert "\n".join(kept["section"][1:]) in goes  # the old reading, figures and links
    row = next(ln for ln in second.splitlines() if ln.startswith("| [`goes`]"))
    assert row.endswith(f"; section of {kept['generated'][:10]}, not regenerated |")
    assert "**Not every run was regenerated**: 1 run(s)" in second  # under the header
    assert (out / "reproduction/goes/report.md").is_file()  # the old report stays
    # --only: the runs left out keep their section and need no cube (no --skip-missing)
    third = reproduce(m, out, only=["stays"], n_boot=5).read_text()
    goes = third[third.index("## Goes") :]
    assert goes.startswith("## Goes\n\n**Not regenerated**: not selected by --only.")
    assert "\n".join(kept["section"][1:]) in goes
    assert "Not regenerated" not in third[third.index("## Stays") : third.index("## Goes")]
    with pytest.raises(ManifestError, match=r"--only names \['gone'\]; the runs .* \['stays'"):
        reproduce(m, out, only=["gone"], n_boot=5)


def test_store_lacking_a_listed_group_is_absent(cube_path, tmp_path):
    m = manifest(
        tmp_path / "m.toml",
        {"key": "typo", "title": "T", "store": str(cube_path), "experiments": ["fc_mnist_phse"]},
    )
    why = absent_runs(load_manifest(m))["typo"]
    assert "['fc_mnist_phse']" in why and "fc_mnist_phase" in why


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('title = "x"\n', "lists no runs"),
        (
            '[[run]]\nkey = "a"\ntitle = "A"\nstore = "s"\nstroe = "s"\n',
            r"unknown keys \['stroe'\]",
        ),
        ('[[run]]\nkey = "a"\ntitle = "A"\n', r"missing keys \['store'\]"),
        ('[[run]]\nkey = "a/b"\ntitle = "A"\nstore = "s"\n', "must be a folder name"),
        ('[[run]]\nkey = "a"\ntitle = "A"\nstore = "s"\n' * 2, r"run keys \['a'\] appear"),
        ("title = \n", "not valid TOML"),
    ],
)
def test_bad_manifests_are_refused(tmp_path, text, match):
    (tmp_path / "m.toml").write_text(text)
    with pytest.raises(ManifestError, match=match):
        load_manifest(tmp_path / "m.toml")


def test_shipped_manifest_is_valid():
    m = load_manifest(REPO / "docs" / "reproduction.toml")
    assert len({r.key for r in m.runs}) == len(m.runs) >= 5
    for run in m.runs:
        assert not Path(run.store).is_absolute()
        if run.sweep and run.sweep.endswith(".toml"):
            assert (REPO / run.sweep).is_file(), run.sweep


def test_feature_against_lazy_side_is_paired_by_seed():
    """The best errors of the smallest and the largest alpha differ by 0.03 under seed
    offsets of 0.05 shared by both: the paired t sees it (unpaired: about 1 sigma)."""
    from analysis.reproduction import _feature_vs_lazy

    T = 2.0 ** np.arange(-4, -1)
    offsets = np.array([-0.05, 0.0, 0.05, 0.02])
    lazy = np.array([0.0, 0.002, -0.001, 0.004])  # the lazy side's own seed noise
    per_seed = np.stack([np.full((3, 4), 0.1) + offsets, np.full((3, 4), 0.13) + offsets + lazy])
    values = xr.DataArray(
        per_seed, dims=("alpha", "T", "seed"), coords={"alpha": [2.0**-4, 2.0**8], "T": T}
    )
    trends = {a: error_trend(T, values.sel(alpha=a).values) for a in (2.0**-4, 2.0**8)}
    rel = xr.Dataset({"mean": (("alpha", "T"), np.full((2, 3), 0.1))}, coords=values.coords)
    (line,) = _feature_vs_lazy(trends, rel, values)
    d = 0.03 + lazy
    t = d.mean() / (d.std(ddof=1) / 2)
    assert line.endswith(f"feature side lower by 0.031, paired t = {t:.1f} over 4 seeds."), line
    assert line.startswith("- Feature side (smallest alpha = 2^-4, rel. change 0.1 at its")
    assert t > 10
    # both alphas on one side of 1: named by alpha, not as feature and lazy sides
    values["alpha"] = [2.0**-6, 2.0**-2]
    trends = dict(zip([2.0**-6, 2.0**-2], trends.values(), strict=True))
    (line,) = _feature_vs_lazy(trends, rel.assign_coords(alpha=values["alpha"]), values)
    assert line.startswith("- Smallest alpha = 2^-6 (rel. change 0.1 at its smallest T): best")
    assert "; largest alpha = 2^-2 (rel. change 0.1): best" in line
    assert line.endswith(f"smallest alpha lower by 0.031, paired t = {t:.1f} over 4 seeds.")
