"""The sweep page: live on a real Dask cluster (HTTP on loopback, headless Chromium) and
as a static HTML file from a cube."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster
from tiny_sweep import write_sweep

from ensemble import cube
from ensemble.launch import launch
from ensemble.monitor import (
    PAGE,
    REFRESH_MS,
    STATE_COLORS,
    SweepBoard,
    SweepMonitor,
    _columns,
    _summary_html,
    cube_view,
    sweep_state,
    write_status_html,
)
from ensemble.schema import CHECKPOINT_VARS, CONVERGED, DIVERGED, N_CHECKPOINTS, UNFINISHED

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
NO_CHROMIUM = (
    f"{CHROMIUM} is absent: install Debian's chromium and chromium-driver"
    " (apt-get install -y chromium chromium-driver) to run the browser tests"
)


def chrome(user_data: Path):
    """Headless Debian Chromium with the browser console log recorded."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={user_data}",
        "--window-size=1280,900",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)


def wait_for_bokeh(driver, timeout: float = 30.0) -> None:
    """Until BokehJS has rendered the page's document."""
    script = "return !!(window.Bokeh && Bokeh.documents.length && Object.keys(Bokeh.index).length)"
    end = time.monotonic() + timeout
    while not driver.execute_script(script):
        assert time.monotonic() < end, f"BokehJS did not render {driver.current_url} in {timeout} s"
        time.sleep(0.2)
    time.sleep(1.0)  # let the canvases paint


def severe_errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def screenshot_colors(path: Path) -> np.ndarray:
    """Distinct RGB colours of a screenshot, (n, 3)."""
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return np.unique(rgb, axis=0)


def assert_not_blank(path: Path) -> np.ndarray:
    colors = screenshot_colors(path)
    assert len(colors) > 20, f"screenshot {path} has only {len(colors)} colours"
    assert not (colors == 255).all(), f"screenshot {path} is all white"
    return colors


def assert_drawn(colors: np.ndarray, hex_colors: list[str], what: str) -> None:
    """Each colour (a square's fill) appears in the screenshot, within 2 per channel."""
    for h in hex_colors:
        want = np.array([int(h[i : i + 2], 16) for i in (1, 3, 5)])
        near = np.abs(colors.astype(int) - want).max(axis=1).min()
        assert near <= 2, f"{what}: fill {h} is not in the screenshot (closest differs by {near})"


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=20) as r:
        return r.status, r.read()


# -- the live page on a real cluster ---------------------------------------------------


@dataclasses.dataclass
class LiveRun:
    """A tiny sweep launched with the page, and what was seen of the page while it ran."""

    store: Path
    monitor: SweepMonitor
    views: list[dict]  # state.json views of this sweep, polled while it ran
    pages: list[tuple[int, str]]  # (HTTP status, body) of the page while it ran
    driver: object | None  # Chromium, opened on the page while the sweep ran
    report: dict  # what launch reported (its returned tree's attrs["launch_report"])


@pytest.fixture(scope="module")
def client(data_root):
    os.environ["ENSEMBLE_DATA"] = str(data_root)  # inherited by the worker processes
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


@pytest.fixture(scope="module")
def live(client, tmp_path_factory):
    """Launch the tiny sweep in a thread; poll the page over HTTP while it runs and open
    it in Chromium (when present); return after the launch ends. Half its cells are at
    T = 2^-10, about 2 s each on this CPU, so its one task runs for many of the launch's
    POLL_EVERY checks, and its start reaches the page long before its end."""
    tmp = tmp_path_factory.mktemp("live")
    spec = write_sweep(tmp / "tiny.toml", T="[0.0009765625, 0.03125]")
    store = tmp / "tiny.zarr"
    made: list[SweepMonitor] = []
    errors: list[BaseException] = []
    returned: list = []

    def monitor(*args) -> SweepMonitor:
        made.append(SweepMonitor(*args))
        return made[-1]

    def run() -> None:
        try:
            returned.append(launch(spec, store, client=client, monitor=monitor, progress=False))
        except BaseException as exc:  # noqa: BLE001  re-raised in the test thread
            errors.append(exc)

    thread = threading.Thread(target=run, name="launch", daemon=True)
    thread.start()
    views: list[dict] = []
    pages: list[tuple[int, str]] = []

    def poll_state() -> None:
        """state.json every 0.2 s in a thread of its own, so that fetching the page and
        starting Chromium (seconds on a busy CPU) never hide the cells' running spell."""
        while thread.is_alive():
            if made:
                try:
                    _, body = get(f"{made[0].url}/state.json")
                    views.append(json.loads(body)["sweeps"][made[0].id])
                except urllib.error.HTTPError:
                    pass  # an empty views list fails the test that needs it
            thread.join(0.2)

    poller = threading.Thread(target=poll_state, name="poll state.json", daemon=True)
    poller.start()
    driver = None
    deadline = time.monotonic() + 240
    try:
        while thread.is_alive():
            assert time.monotonic() < deadline, "the tiny sweep did not finish in 240 s"
            if made and views:
                mon = made[0]
                try:
                    if len(pages) < 2 and (not pages or views[-1]["counts"]["running"]):
                        status, html = get(mon.url)
                        pages.append((status, html.decode()))
                except urllib.error.HTTPError as err:
                    pages.append((err.code, ""))
                if driver is None and CHROMIUM.exists() and pages:
                    driver = chrome(tmp / "chromium")
                    driver.get(mon.url)
            thread.join(0.5)
        poller.join(30)
        if errors:
            raise errors[0]
        yield LiveRun(store, made[0], views, pages, driver, returned[0].attrs["launch_report"])
    finally:
        thread.join(60)
        if driver is not None:
            driver.quit()


def test_page_answers_over_http_while_the_sweep_runs(live, client):
    mon = live.monitor
    base = client.dashboard_link.rsplit("/", 1)[0]
    assert mon.url == f"{base}/{PAGE}"
    assert mon.url.startswith("http://127.0.0.1:")
    status, html = live.pages[0]
    assert status == 200, f"{mon.url} answered {status} while the sweep ran"
    assert "Bokeh" in html  # a Bokeh server page
    assert "statics/css/base.css" in html  # inside the Dask dashboard's template
    assert live.views, "state.json never answered while the sweep ran"
    first = live.views[0]
    assert first["sweep"] == "tiny" and first["store"] == str(live.store)
    assert sum(first["counts"][s] for s in ("pending", "running", "converged")) == 8
    assert any(v["counts"]["running"] > 0 for v in live.views), "no cell was seen running"
    done = [v["throughput"]["cells_done"] for v in live.views]
    assert done == sorted(done), f"cells done went backwards: {done}"


def test_state_after_the_sweep_matches_the_cube(live, client):
    view = sweep_state(client)["sweeps"][live.monitor.id]
    assert view == live.monitor.state() | {"throughput": view["throughput"]}
    ds = xr.open_zarr(live.store, group="tiny_fc").load()
    assert bool(ds["done"].all())
    assert view["counts"] == {
        "pending": 0,
        "running": 0,
        "converged": int((ds["outcome"] == CONVERGED).sum()),
        "diverged": int((ds["outcome"] == DIVERGED).sum()),
        "unfinished": int((ds["outcome"] == UNFINISHED).sum()),
        "failed": 0,
    }
    assert len(view["squares"]) == 4
    for sq in view["squares"]:
        cell = ds.sel(alpha=sq["alpha"], T=sq["T"], P=sq["P"])
        converged = cell["outcome"].values == CONVERGED
        assert sq["done"] == sq["seeds"] == 2
        assert sq["converged"] == int(converged.sum())
        if converged.any():
            assert sq["state"] == "converged"
            want = float(cell["test_error"].values[converged].mean())
            assert sq["test_error"] == pytest.approx(want, rel=1e-12)
    tp = view["throughput"]
    assert tp["cells_done"] == 8 and tp["workers"] == 2 and tp["eta_seconds"] == 0
    assert tp["batches"]["done"] == tp["batches"]["total"] == live.report["batches"]
    steps = float(ds["steps"].sum())
    assert tp["steps_per_second_per_worker"] == pytest.approx(
        steps / tp["elapsed_seconds"] / 2, rel=0.05
    )
    later = sweep_state(client)["sweeps"][live.monitor.id]["throughput"]
    assert later["elapsed_seconds"] == tp["elapsed_seconds"]  # the clock stopped at the end
    _, body = get(f"{live.monitor.url}/state.json")
    served = json.loads(body)["sweeps"][live.monitor.id]
    assert served["squares"] == view["squares"] and served["counts"] == view["counts"]


class RecordingMonitor(SweepMonitor):
    """The sweep page, recording the order in which the launch reported each task."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls: list[tuple[str, str]] = []

    def started(self, batch) -> None:
        self.calls.append(("started", batch.key))
        super().started(batch)

    def finished(self, batch, stats=None) -> None:
        self.calls.append(("finished", batch.key))
        super().finished(batch, stats)


def test_every_task_is_seen_starting_even_when_shorter_than_the_polling(client, tmp_path):
    """Tasks of 1 cell at T = 2^-5 (well under a second each) may start and end between two
    of the launch's checks; their start still reaches the monitor (from the task's own
    event), once, before their end."""
    spec = write_sweep(tmp_path / "tiny.toml", T="[0.03125]")
    made: list[RecordingMonitor] = []

    def monitor(*args) -> RecordingMonitor:
        made.append(RecordingMonitor(*args))
        return made[-1]

    tree = launch(
        spec, tmp_path / "s.zarr", client=client, max_members=1, monitor=monitor, progress=False
    )
    report = tree.attrs["launch_report"]
    assert report["batches"] == 4 and report["cells_done"] == 4
    calls = made[0].calls
    keys = {k for _, k in calls}
    assert len(keys) == 4
    for key in keys:
        assert [e for e, k in calls if k == key] == ["started", "finished"], calls
    seconds = xr.open_zarr(tmp_path / "s.zarr", group="tiny_fc")["seconds"].values
    assert np.nanmax(seconds) < 2.0  # each task was shorter than the launch's WRITE_EVERY


def test_page_renders_and_updates_in_chromium(live, tmp_path):
    if live.driver is None:
        pytest.skip(NO_CHROMIUM)
    driver = live.driver
    read = "return Bokeh.documents[0].get_model_by_name('sweep-summary').text"
    wait_for_bokeh(driver)
    end = time.monotonic() + 4 * REFRESH_MS / 1000 + 10
    while "converged 8" not in driver.execute_script(read):  # opened mid-run; not reloaded
        assert time.monotonic() < end, f"the page did not update: {driver.execute_script(read)}"
        time.sleep(0.5)
    time.sleep(1.0)
    shot = tmp_path / "sweep_page.png"
    driver.save_screenshot(str(shot))
    colors = assert_not_blank(shot)
    view = live.monitor.state()
    exp = view["experiments"][0]
    assert_drawn(colors, _columns(view, exp, 64)["color"], "live page")
    assert not severe_errors(driver), severe_errors(driver)
    if os.environ.get("ENSEMBLE_SAVE_SCREENSHOT") == "1":
        (REPO / "docs" / "img").mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, REPO / "docs" / "img" / "sweep_page.png")


# -- the state without a cluster -------------------------------------------------------


def _board_info(prior: list) -> dict:
    """A launch's "open" event: experiment e (P = 8, T = 0.5 and 1, 2 seeds) in batch b1
    (two members at T = 0.5) and b2 (one at T = 1), after the ``prior`` tallies."""
    return {
        "id": "s",
        "sweep": "s",
        "store": "x.zarr",
        "launched": 100.0,
        "experiments": [{"name": "e", "alpha": [1.0], "T": [0.5, 1.0], "P": [8], "seeds": 2}],
        "prior": prior,
        "batches": [
            ("b1", "e", 8, [(1.0, 0.5, 50.0), (1.0, 0.5, 50.0)]),
            ("b2", "e", 8, [(1.0, 1.0, 50.0)]),
        ],
    }


def test_board_counts_running_failed_and_finished_seeds():
    done = {"converged": 1, "diverged": 0, "unfinished": 0, "running": 0, "err_sum": 0.25}
    board = SweepBoard(_board_info(prior=[(["e", 8, 1.0, 1.0], done)]))
    board.started("b1")
    board.started("b2")
    v = board.view(n_workers=2, now=110.0)
    assert v["counts"] == {
        "pending": 0,
        "running": 3,
        "converged": 1,
        "diverged": 0,
        "unfinished": 0,
        "failed": 0,
    }
    assert [s["state"] for s in v["squares"]] == ["running", "converged"]
    board.failed("b2")
    # one member of b1 is written while its task goes on: the square shows it at once
    board.members("b1", "e", 8, [(1.0, 0.5, CONVERGED, 0.5, 300)])
    v = board.view(n_workers=2, now=110.0)
    assert v["counts"]["running"] == 1 and v["counts"]["converged"] == 2
    sq = {s["T"]: s for s in v["squares"]}
    assert sq[0.5]["done"] == 1 and sq[0.5]["running"] == 1
    assert v["throughput"]["batches"]["running"] == 1
    # planned 50 steps for the member left, at 300 / 50 taken per planned, 300 / 10 s
    assert v["throughput"]["eta_seconds"] == pytest.approx(50 * 6 / 30)
    board.members("b1", "e", 8, [(1.0, 0.5, DIVERGED, None, 7)])
    board.finished("b1", {"member_steps": 307, "slot_steps": 600, "busy_steps": 290})
    v = board.view(n_workers=2, now=110.0)
    assert v["counts"] == {
        "pending": 1,
        "running": 0,
        "converged": 2,
        "diverged": 1,
        "unfinished": 0,
        "failed": 1,
    }
    sq = {s["T"]: s for s in v["squares"]}
    assert sq[0.5]["state"] == "converged" and sq[0.5]["test_error"] == 0.5
    assert sq[1.0]["done"] == 1 and sq[1.0]["test_error"] == 0.25
    tp = v["throughput"]
    assert tp["cells_per_minute"] == pytest.approx(60 * 2 / 10)
    assert tp["steps_per_second_per_worker"] == pytest.approx(307 / 10 / 2)
    assert tp["occupancy"] == pytest.approx(290 / 600)
    assert tp["eta_seconds"] == 0  # the failed batch is not waited for
    assert tp["batches"] == {
        "total": 2,
        **{"pending": 0, "running": 0, "done": 1, "failed": 1, "stopped": 0},
    }


def test_board_of_a_stopped_launch_shows_nothing_running_and_no_eta():
    """A launch interrupted while one batch runs and one waits: the page stops counting
    them as running or pending, gives no time to completion and says to rerun."""
    board = SweepBoard(_board_info(prior=[]))
    board.started("b1")
    board.members("b1", "e", 8, [(1.0, 0.5, CONVERGED, 0.5, 300)])
    assert board.view(n_workers=1, now=110.0)["throughput"]["eta_seconds"] > 0
    board.stopped()
    v = board.view(n_workers=1, now=120.0)
    assert v["counts"]["running"] == 0 and v["counts"]["converged"] == 1
    assert v["throughput"]["batches"] == {
        "total": 2,
        **{"pending": 0, "running": 0, "done": 0, "failed": 0, "stopped": 2},
    }
    assert v["throughput"]["eta_seconds"] is None
    assert "the launch stopped, 2 not run: rerun it" in _summary_html(v)


def test_board_counts_a_member_of_a_failed_batch_written_late():
    """A failed task's member whose event arrived after the failure is done, not failed;
    a member reported before its batch was seen starting leaves no seed running."""
    info = {
        "id": "s",
        "sweep": "s",
        "store": "x.zarr",
        "launched": 0.0,
        "experiments": [{"name": "e", "alpha": [1.0], "T": [0.5], "P": [8], "seeds": 2}],
        "prior": [],
        "batches": [("b", "e", 8, [(1.0, 0.5, 10.0), (1.0, 0.5, 10.0)])],
    }
    board = SweepBoard(info)
    board.members("b", "e", 8, [(1.0, 0.5, CONVERGED, 0.25, 12)])  # before "started"
    assert board.view(1, now=1.0)["counts"]["running"] == 1
    board.failed("b")
    assert board.view(1, now=1.0)["counts"]["failed"] == 1
    board.members("b", "e", 8, [(1.0, 0.5, UNFINISHED, 0.5, 10)])
    v = board.view(1, now=1.0)
    assert v["counts"] == {
        "pending": 0,
        "running": 0,
        "converged": 1,
        "diverged": 0,
        "unfinished": 1,
        "failed": 0,
    }


# -- the static page from a cube -------------------------------------------------------


def _result(outcome: int, test_error: float, layers: list[str]) -> dict:
    nan = float("nan")
    r = {
        "outcome": outcome,
        "test_error": test_error,
        "train_loss": 0.0,
        "n_unfitted": 0.0,
        "steps": 100.0,
        "t_star": nan,
        "dw2": 1.0,
        "w0_2": 1.0,
        "rel_change": 1.0,
        "seconds": 2.0,
    }
    r["dw2_layer"] = dict.fromkeys(layers, 0.5)
    r["w0_2_layer"] = dict.fromkeys(layers, 0.5)
    r.update({name: [nan] * N_CHECKPOINTS for name in CHECKPOINT_VARS})
    return r


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory) -> Path:
    """A cube with converged, diverged, unfinished and missing cells, written by
    ensemble.cube (no training, no cluster)."""
    store = tmp_path_factory.mktemp("cube") / "synth.zarr"
    grid = {"alpha": [0.5, 2.0, 8.0], "T": [2.0**-8, 2.0**-6], "P": [32, 128], "seed": [0, 1]}
    layers = ["w0", "w1"]
    attrs = {
        "experiment": "synth",
        "arch": "fc",
        "sweep": "synth_sweep",
        "created": "2026-01-02T03:04:05+00:00",
    }
    cube.ensure_experiment(store, "synth", grid, layers, 8.0, attrs)
    cells = [
        ((0.5, 2.0**-8, 32, 0), _result(CONVERGED, 0.1, layers)),
        ((0.5, 2.0**-8, 32, 1), _result(CONVERGED, 0.2, layers)),
        ((2.0, 2.0**-8, 32, 0), _result(DIVERGED, float("nan"), layers)),
        ((8.0, 2.0**-6, 32, 0), _result(UNFINISHED, 0.4, layers)),
        ((0.5, 2.0**-6, 128, 0), _result(CONVERGED, 0.3, layers)),
        ((0.5, 2.0**-6, 128, 1), _result(DIVERGED, float("nan"), layers)),
    ]
    cube.CubeWriter(store, "synth").write([c for c, _ in cells], [r for _, r in cells])
    return store


def test_status_html_from_a_cube_without_a_cluster(synthetic_store, tmp_path):
    view = cube_view(synthetic_store)
    assert view["sweep"] == "synth_sweep" and view["launched"] == "2026-01-02T03:04:05+00:00"
    assert view["counts"] == {
        "pending": 18,
        "running": 0,
        "converged": 3,
        "diverged": 2,
        "unfinished": 1,
    }
    sq = {(s["alpha"], s["T"], s["P"]): s for s in view["squares"]}
    assert len(sq) == 12
    assert sq[(0.5, 2.0**-8, 32)]["state"] == "converged"
    assert sq[(0.5, 2.0**-8, 32)]["test_error"] == pytest.approx(0.15)
    assert sq[(2.0, 2.0**-8, 32)]["state"] == "diverged" and sq[(2.0, 2.0**-8, 32)]["done"] == 1
    assert sq[(8.0, 2.0**-6, 32)]["state"] == "unfinished"
    assert sq[(0.5, 2.0**-6, 128)]["state"] == "converged"
    assert sq[(0.5, 2.0**-6, 128)]["test_error"] == pytest.approx(0.3)
    assert sq[(8.0, 2.0**-8, 128)]["state"] == "pending"
    assert view["throughput"]["steps_per_slot_second"] == pytest.approx(100 / 2)

    out = write_status_html(synthetic_store, tmp_path / "status" / "synth.html")
    text = out.read_text()
    assert out.exists() and "synth_sweep" in text and "synth.zarr" in text
    assert "cdn.bokeh.org" not in text and len(text) > 500_000  # BokehJS inlined: offline


def test_status_html_renders_offline_in_chromium(synthetic_store, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(NO_CHROMIUM)
    out = write_status_html(synthetic_store, tmp_path / "synth.html")
    driver = chrome(tmp_path / "chromium")
    try:
        driver.get(out.as_uri())
        wait_for_bokeh(driver)
        shot = tmp_path / "status.png"
        driver.save_screenshot(str(shot))
        errors = severe_errors(driver)
    finally:
        driver.quit()
    colors = assert_not_blank(shot)
    view = cube_view(synthetic_store)
    exp = view["experiments"][0]
    assert_drawn(colors, _columns(view, exp, 32)["color"], "static page, P = 32")
    assert_drawn(colors, [STATE_COLORS["diverged"], STATE_COLORS["pending"]], "static page")
    assert not errors, errors
