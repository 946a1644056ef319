"""``python -m ensemble bench`` on the CPU, at toy sizes: every mode runs and prints the
rows it promises (its numbers are measurements, not asserted)."""

from __future__ import annotations

import re

from ensemble.cli import main


def _rows(text: str) -> list[list[str]]:
    """The data rows of the markdown tables in ``text`` (first cell K or an arch), as
    lists of cells."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()]
    return [r for r in rows if r[0].isdigit() or r[0] in ("fc", "mnas", "perceptron")]


def test_bench_table_has_a_row_per_K(capsys, data_root):
    assert (
        main(["bench", "--arch", "perceptron", "--K", "1,3", "--steps", "4", "--repeats", "1"]) == 0
    )
    rows = _rows(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["1", "3"]
    assert all(float(r[1].replace(",", "")) > 0 for r in rows)
    assert rows[0][2] == "1.00"


def test_bench_table_ends_at_the_first_K_over_the_memory_budget(capsys, data_root):
    """A K whose slots `engine.slots_that_fit` refuses (here 10^7 perceptron members, about
    6 TB) ends the table with a row that says so instead of stopping the benchmark."""
    argv = ["bench", "--arch", "perceptron", "--K", "1,10000000,2", "--steps", "4"]
    assert main([*argv, "--repeats", "1"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert [r[:2] for r in rows[1:]] == [["10000000", "over the engine's memory budget"]]


def test_bench_fc_compares_fused_with_generic_and_profiles(capsys, data_root):
    argv = ["bench", "--arch", "fc", "--K", "2", "--steps", "2", "--repeats", "1"]
    assert main([*argv, "--data-root", str(data_root)]) == 0
    (row,) = _rows(capsys.readouterr().out)
    assert len(row) == 5 and float(row[4]) > 0  # K, rate, x one, generic, fused / generic
    assert main(["bench", "--arch", "fc", "--profile", "2", "--data-root", str(data_root)]) == 0
    out = capsys.readouterr().out
    assert "operators (self CPU time)" in out and re.search(r"\| aten::\w+ \|", out)


def test_bench_run_reports_the_engine_against_its_hot_loop(capsys, data_root):
    argv = ["bench", "--arch", "fc", "--run", "40", "--K", "2", "--repeats", "1"]
    assert main([*argv, "--data-root", str(data_root)]) == 0
    (row,) = _rows(capsys.readouterr().out)
    assert row[:3] == ["fc", "2", "80"]  # 2 members x 40 steps (lazy: none stops sooner)
    assert row[-1] == "100%"


def test_bench_suite_checks_then_prints_every_table(capsys, data_root):
    """``bench --suite``, the one command of a device run: first the float64 equalities
    that ``--check`` asserts (eager = fixed slots = generic step; MNAS ensemble = alone,
    perceptron skipping = plain steps) and its float32 comparisons, then a table per
    architecture, Engine.run against the hot loop and continuous against static batching."""
    argv = ["bench", "--suite", "--K", "1,2", "--steps", "1", "--repeats", "1"]
    assert main([*argv, "--run", "10", "--occupancy", "4", "--data-root", str(data_root)]) == 0
    out = capsys.readouterr().out
    assert "= eager = fixed slots = generic step (outcomes, steps, weights to 1e-6)" in out
    assert re.search(r"graph vs eager 8/8 identical steps.*ensemble vs alone \d/8", out)
    assert re.search(r"MNAS ensemble = alone \(119, 46 steps;.*perceptron skipping = plain", out)
    assert re.findall(r"^## (\w+)", out, re.M) == ["fc", "perceptron", "mnas", "fc"]
    rows = _rows(out)
    assert [r[0] for r in rows] == ["1", "2", "fc", "1", "2", "1", "2"]
    assert rows[2][:3] == ["fc", "2", "20"]  # Engine.run: 2 members x 10 steps
    assert re.search(r"^\| continuous \+ shrink \| [\d.]+ s \|", out, re.M)


def test_bench_suite_reports_a_failing_section_and_goes_on(capsys, tmp_path):
    """With no dataset under the data root, the sections that read MNIST fail (each
    prints its traceback) and the synthetic tables are still measured; the exit
    status says that sections failed."""
    argv = ["bench", "--suite", "--K", "1", "--steps", "1", "--repeats", "1", "--synthetic"]
    assert main([*argv, "--data-root", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("DataError: no mnist data found") == 4  # 2 checks, run, occupancy
    assert re.findall(r"^## (\w+)", captured.out, re.M) == ["fc", "perceptron", "mnas"]
    assert "4 sections failed" in captured.out
