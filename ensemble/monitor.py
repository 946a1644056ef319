"""The sweep page: a running sweep's grid in the Dask dashboard, and the same view as a
standalone HTML file built from a cube.

Live page. ``SweepMonitor`` (the ``monitor=`` factory of ``ensemble.launch.launch``)
registers ``SweepPagePlugin`` on the scheduler with ``Client.register_plugin``. The
plugin's ``start`` adds a Bokeh application at ``<dashboard>/ensemble`` and a JSON view
at ``<dashboard>/ensemble/state.json`` to the scheduler's own HTTP server, the way
distributed adds its own dashboard (``distributed.dashboard.core.BokehApplication``
passed to ``scheduler.http_application.add_application``); the page uses the
dashboard's template, so it carries the Dask navigation bar. The sweep's state lives in
the plugin, on the scheduler: the launching process pushes small events (a batch's key,
a few numbers per member as the members are written) with ``Client.run_on_scheduler``,
never arrays. The page refreshes every ``REFRESH_MS``. The scheduler needs this package
importable (it is, in the launching process, with the embedded LocalCluster).

Static page. ``write_status_html(store, path)`` builds the same view from the cube
alone (``done``, ``outcome``, ``test_error``) and writes one HTML file with Bokeh's
JavaScript inlined, so it opens offline.

A grid square is one (experiment, P, alpha, T) with all its seeds. Its state is the
first of these that some seed is in: converged (the square is coloured by the mean test
error of its converged seeds done so far), diverged, unfinished, running, else pending.
The square's label is ``seeds done / seeds``; an orange outline marks squares with seeds
still training. Counts per state on the page are of networks (cells), seed by seed.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import numpy as np
from distributed.diagnostics.plugin import SchedulerPlugin
from tornado import web
from tornado.ioloop import IOLoop

from ensemble.schema import CONVERGED, DIVERGED, UNFINISHED

__all__ = [
    "PAGE",
    "STATES",
    "SweepMonitor",
    "SweepPagePlugin",
    "cube_view",
    "sweep_state",
    "write_status_html",
]

PAGE = "ensemble"
"""Route of the sweep page under the dashboard (its JSON view: ``ensemble/state.json``)."""
PLUGIN_NAME = "ensemble-sweep-page"
REFRESH_MS = 2000
"""The live page re-reads the scheduler-side state this often."""

STATES: tuple[str, ...] = ("pending", "running", "converged", "diverged", "unfinished")
STATE_COLORS: dict[str, str] = {
    "pending": "#d9d9d9",
    "running": "#fdae61",
    "diverged": "#b2182b",
    "unfinished": "#8073ac",
}
"""Fill of a square by state; converged squares take the test-error colour map."""
RUNNING_OUTLINE = "#f46d43"
_OUTCOMES = {CONVERGED: "converged", DIVERGED: "diverged", UNFINISHED: "unfinished"}

Square = tuple[str, int, float, float]
"""(experiment, P, alpha, T): one grid square; its seeds aggregate."""


# -- the state: per square, how many seeds are in each state ----------------------------


def _tally() -> dict[str, float]:
    return {"converged": 0, "diverged": 0, "unfinished": 0, "running": 0, "err_sum": 0.0}


def _square_state(t: dict[str, float]) -> str:
    for state in ("converged", "diverged", "unfinished", "running"):
        if t[state] > 0:
            return state
    return "pending"


def _records(experiments: Sequence[dict], tallies: dict[Square, dict]) -> list[dict]:
    """One JSON-able record per grid square, in (experiment, P, alpha, T) order."""
    out = []
    for e in experiments:
        for P in e["P"]:
            for alpha in e["alpha"]:
                for T in e["T"]:
                    t = tallies.get((e["name"], P, alpha, T), _tally())
                    done = int(t["converged"] + t["diverged"] + t["unfinished"])
                    err = t["err_sum"] / t["converged"] if t["converged"] else None
                    out.append(
                        {
                            "experiment": e["name"],
                            "P": P,
                            "alpha": alpha,
                            "T": T,
                            "seeds": e["seeds"],
                            "done": done,
                            "running": int(t["running"]),
                            "converged": int(t["converged"]),
                            "diverged": int(t["diverged"]),
                            "unfinished": int(t["unfinished"]),
                            "state": _square_state(t),
                            "test_error": err,
                        }
                    )
    return out


def _cell_counts(records: Iterable[dict]) -> dict[str, int]:
    """Networks (cells, seeds counted one by one) per state."""
    counts = dict.fromkeys(STATES, 0)
    for r in records:
        for state in ("running", "converged", "diverged", "unfinished"):
            counts[state] += r[state]
        counts["pending"] += r["seeds"] - r["done"] - r["running"]
    return counts


def _tallies_from_cube(
    store: str | os.PathLike, grids: dict[str, dict] | None = None
) -> tuple[list[dict], dict[Square, dict], dict]:
    """Experiments, per-square tallies of the done cells, and summed steps and seconds.

    grids : per experiment name, the alpha/T/P/seed values to keep (a sweep's grid);
            None reads every experiment group (`cube.experiment_names`), whole.
    """
    import xarray as xr

    from ensemble.cube import experiment_names

    try:
        names = experiment_names(store)
    except FileNotFoundError:
        names = []
    if grids is not None:
        names = [n for n in grids if n in names]
    experiments: list[dict] = []
    tallies: dict[Square, dict] = {}
    totals = {"steps": 0.0, "seconds": 0.0, "created": None, "sweep": None}
    for name in names:
        ds = xr.open_zarr(str(store), group=name, consolidated=False, chunks=None)
        if grids is not None:  # the sweep's part of the group (ensure_experiment grew it)
            ds = ds.sel({d: grids[name][d] for d in ("alpha", "T", "P", "seed")})
        ds = ds[["done", "outcome", "test_error", "steps", "seconds"]].load()
        done = ds["done"].values  # (alpha, T, P, seed)
        outcome = np.where(done, ds["outcome"].values, 0)
        err = np.where(done & (outcome == CONVERGED), ds["test_error"].values, 0.0)
        alpha, T, P = (ds[d].values.tolist() for d in ("alpha", "T", "P"))
        experiments.append(
            {"name": name, "alpha": alpha, "T": T, "P": P, "seeds": int(ds.sizes["seed"])}
        )
        n = {flag: (outcome == flag).sum(axis=3) for flag in _OUTCOMES}
        err_sum = np.nan_to_num(err).sum(axis=3)
        for i, a in enumerate(alpha):
            for j, t_ in enumerate(T):
                for k, p in enumerate(P):
                    t = _tally()
                    for flag, state in _OUTCOMES.items():
                        t[state] = int(n[flag][i, j, k])
                    t["err_sum"] = float(err_sum[i, j, k])
                    tallies[(name, int(p), a, t_)] = t
        totals["steps"] += float(np.nansum(np.where(done, ds["steps"].values, 0.0)))
        totals["seconds"] += float(np.nansum(np.where(done, ds["seconds"].values, 0.0)))
        created = ds.attrs.get("created")
        if created and (totals["created"] is None or created < totals["created"]):
            totals["created"] = created
        totals["sweep"] = totals["sweep"] or ds.attrs.get("sweep")
    return experiments, tallies, totals


class SweepBoard:
    """Scheduler-side state of one launch: per square, its seeds in each state; batches
    and throughput counters. Fed by ``SweepMonitor`` events; read by the page."""

    def __init__(self, info: dict):
        self.id: str = info["id"]
        self.name: str = info["sweep"]
        self.store: str = info["store"]
        self.launched: float = info["launched"]  # epoch seconds
        self.experiments: list[dict] = info["experiments"]
        self.tallies: dict[Square, dict] = {tuple(k): dict(v) for k, v in info["prior"]}
        self.batches: dict[str, dict] = {}
        for key, exp, P, members in info["batches"]:
            left: dict[Square, int] = {}  # members not yet reported, per square
            est: dict[Square, float] = {}  # planned steps of one member of the square
            for alpha, T, steps in members:
                sq = (exp, P, alpha, T)
                left[sq] = left.get(sq, 0) + 1
                est[sq] = steps
            self.batches[key] = {"left": left, "est": est, "state": "pending"}
        self.cells_done = 0
        self.cells_failed = 0
        self.steps = 0.0  # network-steps of the members finished in this launch
        self.est_finished = 0.0  # planned member-steps of the members finished
        self.member_steps = 0  # engine counters (occupancy), when launch passes them
        self.slot_steps = 0
        self.busy_steps = 0
        self.version = 0
        self.ended: float | None = None  # when the last batch finished or failed

    def _changed(self) -> None:
        self.version += 1
        if self.batches and all(b["state"] in ("done", "failed") for b in self.batches.values()):
            self.ended = self.ended or time.time()

    def _add_running(self, key: str, sign: int) -> None:
        for sq, n in self.batches[key]["left"].items():
            self.tallies.setdefault(sq, _tally())["running"] += sign * n

    def started(self, key: str) -> None:
        b = self.batches.get(key)
        if b is None or b["state"] != "pending":
            return
        b["state"] = "running"
        self._add_running(key, +1)
        self._changed()

    def members(self, key: str, exp: str, P: int, rows: list) -> None:
        """Members of batch ``key`` written to the cube; rows: (alpha, T, outcome,
        test_error, steps) per member. A batch still shown pending starts running."""
        b = self.batches.get(key)
        if b is not None and b["state"] == "pending":
            self.started(key)
        for alpha, T, outcome, err, steps in rows:
            sq = (exp, P, alpha, T)
            t = self.tallies.setdefault(sq, _tally())
            if b is not None and b["left"].get(sq, 0) > 0:
                b["left"][sq] -= 1
                self.est_finished += b["est"][sq]
                if b["state"] == "running":
                    t["running"] -= 1
                elif b["state"] == "failed":  # its event came after the failure
                    self.cells_failed -= 1
            state = _OUTCOMES.get(int(outcome))
            if state is None:
                continue
            t[state] += 1
            if state == "converged" and err is not None and math.isfinite(err):
                t["err_sum"] += err
            if steps is not None and math.isfinite(steps):
                self.steps += steps
            self.cells_done += 1
        self._changed()

    def finished(self, key: str, stats: dict | None) -> None:
        """Batch ``key``'s task ended (its members were reported by ``members``);
        ``stats``: the engine's counters (member_steps, slot_steps, busy_steps)."""
        b = self.batches.get(key)
        if b is not None:
            if b["state"] == "running":
                self._add_running(key, -1)
            b["state"] = "done"
        if stats:
            self.member_steps += int(stats.get("member_steps", 0))
            self.slot_steps += int(stats.get("slot_steps", 0))
            self.busy_steps += int(stats.get("busy_steps", 0))
        self._changed()

    def failed(self, key: str) -> None:
        """Batch ``key``'s task raised: its members not reported stay missing."""
        b = self.batches.get(key)
        if b is None:
            return
        if b["state"] == "running":
            self._add_running(key, -1)
        b["state"] = "failed"
        self.cells_failed += sum(b["left"].values())
        self._changed()

    def stopped(self) -> None:
        """The launch stopped (interrupted, or it failed) before its batches ended: the
        cluster dropped them, so the page counts nothing as running and gives no ETA."""
        for key, b in self.batches.items():
            if b["state"] == "running":
                self._add_running(key, -1)
            if b["state"] in ("pending", "running"):
                b["state"] = "stopped"
        self.ended = self.ended or time.time()
        self._changed()

    def view(self, n_workers: int, now: float | None = None) -> dict:
        """The page's data: JSON-able, small (one record per square).

        Rates are over the time since launch (until the last batch ended). The time to
        completion is the planner's estimated steps of the members not yet done (in
        pending or running batches), scaled by (steps taken / steps estimated) of the
        finished members, over the network-steps per second so far."""
        now = time.time() if now is None else now
        if self.ended is not None:  # rates and elapsed time stop with the last batch
            now = min(now, self.ended)
        elapsed = max(now - self.launched, 1e-9)
        records = _records(self.experiments, self.tallies)
        counts = _cell_counts(records)
        counts["failed"] = self.cells_failed
        by_state = {s: 0 for s in ("pending", "running", "done", "failed", "stopped")}
        remaining_est = 0.0
        for b in self.batches.values():
            by_state[b["state"]] += 1
            if b["state"] in ("pending", "running"):
                remaining_est += sum(n * b["est"][sq] for sq, n in b["left"].items())
        rate = self.steps / elapsed  # network-steps per second, all workers
        eta = None
        if self.est_finished > 0 and rate > 0 and not by_state["stopped"]:
            eta = (
                0.0
                if remaining_est == 0
                else remaining_est * (self.steps / self.est_finished) / rate
            )
        return {
            "id": self.id,
            "sweep": self.name,
            "store": self.store,
            "launched": _iso(self.launched),
            "live": True,
            "experiments": self.experiments,
            "squares": records,
            "counts": counts,
            "throughput": {
                "elapsed_seconds": elapsed,
                "cells_done": self.cells_done,
                "cells_per_minute": 60 * self.cells_done / elapsed,
                "workers": n_workers,
                "steps_per_second_per_worker": rate / n_workers if n_workers else None,
                "occupancy": self.busy_steps / self.slot_steps if self.slot_steps else None,
                "eta_seconds": eta,
                "batches": {"total": len(self.batches), **by_state},
            },
        }


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat(timespec="seconds")


def cube_view(store: str | os.PathLike) -> dict:
    """The page's data from the cube alone: not done = pending; no live throughput.

    ``steps_per_slot_second`` is the sum of ``steps`` over the sum of ``seconds`` (each
    member's time in its slot), i.e. the sequential SGD steps per second of a batch.
    """
    experiments, tallies, totals = _tallies_from_cube(store)
    records = _records(experiments, tallies)
    counts = _cell_counts(records)
    seconds = totals["seconds"]
    return {
        "id": str(store),
        "sweep": totals["sweep"] or "?",
        "store": str(store),
        "launched": totals["created"] or "?",
        "live": False,
        "experiments": experiments,
        "squares": records,
        "counts": counts,
        "throughput": {
            "cells_done": counts["converged"] + counts["diverged"] + counts["unfinished"],
            "steps_per_slot_second": totals["steps"] / seconds if seconds else None,
        },
    }


# -- the view as Bokeh models (shared by the live page and the HTML file) ---------------


def _log2_label(v: float) -> str:
    k = math.log2(v)
    return f"2^{k:g}" if k == round(k) else f"{v:g}"


def _edges(values: Sequence[float]) -> list[tuple[float, float]]:
    """(lo, hi) of each grid value's square in log2 coordinates: halfway to neighbours."""
    x = [math.log2(v) for v in values]
    if len(x) == 1:
        return [(x[0] - 0.5, x[0] + 0.5)]
    mids = [(a + b) / 2 for a, b in zip(x, x[1:], strict=False)]
    lo = [2 * x[0] - mids[0], *mids]
    hi = [*mids, 2 * x[-1] - mids[-1]]
    return list(zip(lo, hi, strict=True))


def _error_range(view: dict) -> tuple[float, float]:
    """Colour-bar range of the seed-mean test error: 0 to the largest, in steps of 0.05."""
    errs = [r["test_error"] for r in view["squares"] if r["test_error"] is not None]
    return 0.0, max(0.05, math.ceil(max(errs, default=0.0) * 20) / 20)


def _error_color(err: float, low: float, high: float) -> str:
    from bokeh.palettes import Viridis256

    i = int(round((err - low) / (high - low) * 255)) if high > low else 0
    return Viridis256[min(max(i, 0), 255)]


def _columns(view: dict, exp: dict, P: int) -> dict[str, list]:
    """ColumnDataSource data of one (experiment, P) figure."""
    xe = dict(zip(exp["alpha"], _edges(exp["alpha"]), strict=True))
    ye = dict(zip(exp["T"], _edges(exp["T"]), strict=True))
    low, high = _error_range(view)
    cols: dict[str, list] = {
        k: []
        for k in (
            "left",
            "right",
            "bottom",
            "top",
            "x",
            "y",
            "alpha",
            "T",
            "state",
            "color",
            "line",
            "label",
            "seeds",
            "done",
            "running",
            "converged",
            "diverged",
            "unfinished",
            "err",
        )
    }
    for r in view["squares"]:
        if r["experiment"] != exp["name"] or r["P"] != P:
            continue
        (x0, x1), (y0, y1) = xe[r["alpha"]], ye[r["T"]]
        err = r["test_error"]
        cols["left"].append(x0)
        cols["right"].append(x1)
        cols["bottom"].append(y0)
        cols["top"].append(y1)
        cols["x"].append((x0 + x1) / 2)
        cols["y"].append((y0 + y1) / 2)
        cols["alpha"].append(r["alpha"])
        cols["T"].append(r["T"])
        cols["state"].append(r["state"])
        cols["color"].append(
            _error_color(err, low, high) if r["state"] == "converged" else STATE_COLORS[r["state"]]
        )
        cols["line"].append(RUNNING_OUTLINE if r["running"] else "white")
        cols["label"].append(f"{r['done']}/{r['seeds']}")
        for k in ("seeds", "done", "running", "converged", "diverged", "unfinished"):
            cols[k].append(r[k])
        cols["err"].append(float("nan") if err is None else err)
    return cols


def _fmt(x: float | None, spec: str = ".3g", unit: str = "") -> str:
    return "—" if x is None or not math.isfinite(x) else f"{x:{spec}}{unit}"


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _summary_html(view: dict) -> str:
    """The header and the numbers: sweep, store, launch time, counts, throughput, ETA."""
    c, tp = view["counts"], view["throughput"]
    e = html.escape
    rows = [
        ("sweep", e(view["sweep"])),
        ("store", f"<code>{e(view['store'])}</code>"),
        ("launched", e(view["launched"])),
    ]
    states = ", ".join(
        f"<span style='color:{STATE_COLORS.get(s, '#35b779')}'>&#9632;</span> {s} {c[s]}"
        for s in STATES
    )
    if c.get("failed"):
        states += f"; {c['failed']} failed (back to pending)"
    rows.append(("cells", states))
    if view["live"]:
        b = tp["batches"]
        rows += [
            (
                "batches",
                f"{b['done']} done, {b['running']} running, {b['pending']} pending,"
                f" {b['failed']} failed of {b['total']}"
                + (
                    f"; the launch stopped, {b['stopped']} not run: rerun it to train them"
                    if b.get("stopped")
                    else ""
                ),
            ),
            ("elapsed", _duration(tp["elapsed_seconds"])),
            ("cells per minute", _fmt(tp["cells_per_minute"])),
            (
                "network-steps / s / worker",
                f"{_fmt(tp['steps_per_second_per_worker'], ',.0f')} ({tp['workers']} workers)",
            ),
            ("slot occupancy", _fmt(tp["occupancy"], ".0%")),
            ("estimated time to completion", _duration(tp["eta_seconds"])),
        ]
    else:
        rows += [
            ("network-steps / slot-second", _fmt(tp["steps_per_slot_second"], ",.0f")),
            ("throughput, ETA", "shown on the live page only (not recorded in the cube)"),
        ]
    body = "".join(
        f"<tr><th style='text-align:left;padding-right:1em'>{k}</th><td>{v}</td></tr>"
        for k, v in rows
    )
    title = f"Sweep {e(view['sweep'])}" + ("" if view["live"] else " (from the cube)")
    return f"<h2 style='margin:0.2em 0'>{title}</h2><table>{body}</table>"


def _grid_figure(exp: dict, P: int, source: Any, mapper: Any) -> Any:
    """The (alpha, T) grid of one experiment at one P: squares, labels, legend, colour bar."""
    from bokeh.models import (
        ColorBar,
        ColumnDataSource,
        FixedTicker,
        HoverTool,
        Legend,
        LegendItem,
    )
    from bokeh.palettes import Viridis256
    from bokeh.plotting import figure

    xs = [math.log2(a) for a in exp["alpha"]]
    ys = [math.log2(t) for t in exp["T"]]
    xe, ye = _edges(exp["alpha"]), _edges(exp["T"])
    p = figure(
        title=f"{exp['name']}   P = {P}   ({exp['seeds']} seeds per square)",
        width=560,
        height=380,
        x_range=(xe[0][0], xe[-1][1]),
        y_range=(ye[0][0], ye[-1][1]),
        x_axis_label="alpha (log2 axis)",
        y_axis_label="T (log2 axis)",
        tools="hover,save",
        toolbar_location="above",
    )
    p.xaxis.ticker = FixedTicker(ticks=xs)
    p.yaxis.ticker = FixedTicker(ticks=ys)
    p.xaxis.major_label_overrides = dict(zip(xs, map(_log2_label, exp["alpha"]), strict=True))
    p.yaxis.major_label_overrides = dict(zip(ys, map(_log2_label, exp["T"]), strict=True))
    p.grid.visible = False
    p.quad(
        left="left",
        right="right",
        bottom="bottom",
        top="top",
        source=source,
        fill_color="color",
        line_color="line",
        line_width=2,
    )
    p.text(
        x="x",
        y="y",
        text="label",
        source=source,
        text_align="center",
        text_baseline="middle",
        text_font_size="9pt",
        text_color="black",
    )
    p.select_one(HoverTool).tooltips = [
        ("alpha, T", "@alpha, @T"),
        ("state", "@state"),
        ("seeds done", "@done / @seeds (running @running)"),
        ("converged / diverged / unfinished", "@converged / @diverged / @unfinished"),
        ("mean test error (converged)", "@err{0.0000}"),
    ]
    labels = ["pending", "running", "converged (colour: test error)", "diverged", "unfinished"]
    colors = [*(STATE_COLORS[s] for s in ("pending", "running")), Viridis256[128]]
    colors += [STATE_COLORS[s] for s in ("diverged", "unfinished")]
    nan = [float("nan")] * len(labels)  # legend swatches only: nothing is drawn
    swatches = p.scatter(
        "x",
        "y",
        marker="square",
        size=12,
        fill_color="color",
        line_color=None,
        source=ColumnDataSource({"x": nan, "y": nan, "color": colors}),
    )
    items = [LegendItem(label=s, renderers=[swatches], index=i) for i, s in enumerate(labels)]
    legend = Legend(
        items=items,
        orientation="horizontal",
        label_text_font_size="8pt",
        spacing=4,
        padding=4,
        click_policy="none",
    )
    p.add_layout(legend, "below")
    p.add_layout(ColorBar(color_mapper=mapper, title="seed-mean test error", width=12), "right")
    return p


class SweepLayout:
    """Bokeh models of one view: a summary and one grid figure per (experiment, P)."""

    def __init__(self, view: dict):
        from bokeh.layouts import column, row
        from bokeh.models import ColumnDataSource, Div, LinearColorMapper
        from bokeh.palettes import Viridis256

        self.summary = Div(text=_summary_html(view), name="sweep-summary")
        low, high = _error_range(view)
        self.mapper = LinearColorMapper(palette=Viridis256, low=low, high=high)
        self.sources: dict[tuple[str, int], ColumnDataSource] = {}
        figures = []
        for exp in view["experiments"]:
            for P in exp["P"]:
                src = ColumnDataSource(_columns(view, exp, P))
                self.sources[(exp["name"], P)] = src
                figures.append(_grid_figure(exp, P, src, self.mapper))
        rows = [row(*figures[i : i + 2]) for i in range(0, len(figures), 2)]
        if not rows:
            rows = [Div(text="<p>This sweep has no experiments.</p>")]
        self.root = column(self.summary, *rows)

    def update(self, view: dict) -> None:
        """Refresh every model from a newer view of the same sweep."""
        self.summary.text = _summary_html(view)
        self.mapper.low, self.mapper.high = _error_range(view)
        for exp in view["experiments"]:
            for P in exp["P"]:
                src = self.sources.get((exp["name"], P))
                if src is not None:
                    src.data = _columns(view, exp, P)


def write_status_html(store: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the sweep page of ``store``, from the cube alone, as one standalone HTML
    file (Bokeh's JavaScript inlined: it opens offline). Returns the path."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    view = cube_view(store)
    layout = SweepLayout(view)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(file_html(layout.root, INLINE, title=f"Sweep {view['sweep']}"))
    return out


# -- the scheduler side: a plugin that owns the state and serves the page ---------------


class SweepPagePlugin(SchedulerPlugin):
    """Scheduler plugin: holds the boards of the sweeps launched on this cluster and
    serves them at ``<dashboard>/ensemble`` (Bokeh) and ``<dashboard>/ensemble/state.json``.

    Idempotent: registering it again on a scheduler that has it keeps the first one.
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(self) -> None:
        self.boards: dict[str, SweepBoard] = {}
        self.latest: str | None = None
        self.scheduler: Any = None

    def start(self, scheduler: Any) -> None:
        """Add the page and its JSON view to the scheduler's HTTP server (the dashboard),
        as distributed adds its own pages, under the dashboard's prefix."""
        self.scheduler = scheduler
        http = getattr(scheduler, "http_application", None)
        if http is None:  # a scheduler without an HTTP server
            return
        try:
            from bokeh.server.tornado import BokehTornado
            from distributed.dashboard.core import BokehApplication
            from distributed.dashboard.scheduler import template_variables
        except ImportError:  # no bokeh on the scheduler: the JSON view only
            BokehApplication = None  # noqa: N806
            prefix = ""
        else:
            dashboards = [a for a in http.applications if isinstance(a, BokehTornado)]
            prefix = dashboards[0].prefix.rstrip("/") if dashboards else ""
        http.add_application(
            web.Application([(rf"{prefix}/{PAGE}/state\.json", _StateHandler, {"plugin": self})])
        )
        if BokehApplication is None:
            return
        variables = dict(template_variables(scheduler))
        variables["pages"] = [*variables.get("pages", []), PAGE]
        bokeh_app = BokehApplication(
            {f"/{PAGE}": self._document}, scheduler, prefix=prefix, template_variables=variables
        )
        http.add_application(bokeh_app)
        bokeh_app.initialize(IOLoop.current())
        bokeh_app.start()

    def n_workers(self) -> int:
        return len(getattr(self.scheduler, "workers", {}) or {})

    def views(self) -> dict:
        """Every board's view, and the id of the latest launch."""
        n = self.n_workers()
        return {"latest": self.latest, "sweeps": {k: b.view(n) for k, b in self.boards.items()}}

    def _document(self, scheduler: Any, extra: dict, doc: Any) -> None:
        """Bokeh document of one page session: the latest sweep (or ?sweep=<id>)."""
        from bokeh.models import Div
        from distributed.dashboard.components.scheduler import env

        doc.title = "Dask: sweep"
        doc.template = env.get_template("simple.html")
        doc.template_variables.update(extra)
        args = doc.session_context.request.arguments if doc.session_context else {}
        wanted = args.get("sweep", [b""])[0].decode() or self.latest
        board = self.boards.get(wanted) if wanted else None
        if board is None:
            doc.add_root(
                Div(
                    text="<p>No sweep has been launched on this cluster yet;"
                    " reload this page once one runs.</p>"
                )
            )
            return
        layout = SweepLayout(board.view(self.n_workers()))
        seen = {"version": board.version}

        def refresh() -> None:
            view = board.view(self.n_workers())
            if board.version != seen["version"]:
                seen["version"] = board.version
                layout.update(view)
            else:  # only the clock moved: summary and ETA
                layout.summary.text = _summary_html(view)

        doc.add_periodic_callback(refresh, REFRESH_MS)
        doc.add_root(layout.root)


class _StateHandler(web.RequestHandler):
    """GET: the plugin's views as JSON (``{"latest": id, "sweeps": {id: view}}``)."""

    def initialize(self, plugin: SweepPagePlugin) -> None:
        self.plugin = plugin

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(self.plugin.views(), allow_nan=False))


def _on_scheduler(event: str, sweep_id: str, payload: Any, dask_scheduler: Any = None) -> Any:
    """Run by ``Client.run_on_scheduler``: apply one event to the plugin's boards."""
    plugin: SweepPagePlugin = dask_scheduler.plugins[PLUGIN_NAME]
    if event == "open":
        plugin.boards[sweep_id] = SweepBoard(payload)
        plugin.latest = sweep_id
        return None
    if event == "views":
        return plugin.views()
    board = plugin.boards[sweep_id]
    if event == "started":
        board.started(payload)
    elif event == "members":
        board.members(*payload)
    elif event == "finished":
        board.finished(*payload)
    elif event == "failed":
        board.failed(payload)
    elif event == "stopped":
        board.stopped()
    else:
        raise ValueError(
            f"unknown sweep page event {event!r}; expected open, started, members, finished,"
            " failed, stopped or views"
        )
    return None


def sweep_state(client: Any) -> dict:
    """The scheduler-side views of every sweep launched on ``client``'s cluster:
    ``{"latest": id, "sweeps": {id: view}}`` (the same as ``ensemble/state.json``)."""
    return client.run_on_scheduler(_on_scheduler, "views", "", None)


# -- the client side: what launch() calls -----------------------------------------------


class SweepMonitor:
    """Pushes a launch's progress to the sweep page on the scheduler.

    client  : the launch's distributed.Client
    sweep   : the ensemble.spec.Sweep being run
    store   : the cube (its done cells show as done from the start)
    batches : the ensemble.plan.Batch list submitted, one Dask task each

    ``url`` is the page's address (empty when the cluster has no dashboard). A failure
    to reach the page is warned about once and never stops the sweep.
    """

    def __init__(self, client: Any, sweep: Any, store: str | os.PathLike, batches: Sequence):
        self.client = client
        self._warned = False
        launched = time.time()
        self.id = f"{sweep.name}@{_iso(launched)}#{id(self):x}"
        grids = {
            e.name: {"alpha": list(e.alpha), "T": list(e.T), "P": list(e.P), "seed": list(e.seed)}
            for e in sweep.experiments
        }
        try:
            _, prior, _ = _tallies_from_cube(store, grids)
        except Exception as exc:  # noqa: BLE001  an unreadable cube shows as all pending
            warnings.warn(
                f"sweep page: could not read {store} ({exc!r}); done cells of"
                " earlier launches show as pending",
                stacklevel=2,
            )
            prior = {}
        info = {
            "id": self.id,
            "sweep": sweep.name,
            "store": str(store),
            "launched": launched,
            "experiments": [
                {
                    "name": e.name,
                    "alpha": list(e.alpha),
                    "T": list(e.T),
                    "P": list(e.P),
                    "seeds": len(e.seed),
                }
                for e in sweep.experiments
            ],
            "prior": [
                (list(sq), t) for sq, t in prior.items() if any(t[k] for k in _OUTCOMES.values())
            ],
            "batches": [
                (
                    b.key,
                    b.experiment,
                    b.group.P,
                    [(m.alpha, m.T, est) for m, est in zip(b.members, b.estimates, strict=True)],
                )
                for b in batches
            ],
        }
        link = getattr(client, "dashboard_link", None) or ""
        self.url = urljoin(link, PAGE) if link else ""
        try:
            client.register_plugin(SweepPagePlugin())
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)
            self.url = ""
            return
        self._push("open", info)

    def _warn(self, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"sweep page: the scheduler did not take an update ({exc!r});"
                " the sweep goes on without the page",
                stacklevel=3,
            )

    def _push(self, event: str, payload: Any) -> None:
        try:
            self.client.run_on_scheduler(_on_scheduler, event, self.id, payload)
        except Exception as exc:  # noqa: BLE001  the page never stops a sweep
            self._warn(exc)

    def started(self, batch: Any) -> None:
        """The batch's cells are training."""
        self._push("started", batch.key)

    def members(self, batch: Any, results: Sequence[dict]) -> None:
        """Members of ``batch`` (``MemberResult`` dicts) were written to the cube."""
        rows = [
            (
                r["member"]["alpha"],
                r["member"]["T"],
                int(r["outcome"]),
                _finite(r.get("test_error")),
                _finite(r.get("steps")),
            )
            for r in results
        ]
        self._push("members", (batch.key, batch.experiment, batch.group.P, rows))

    def finished(self, batch: Any, stats: dict | None = None) -> None:
        """The batch's task ended, all its members written; ``stats`` are the engine's
        counters of the task (member_steps, slot_steps, busy_steps) if launch passes them."""
        small = None
        if stats:
            keys = ("member_steps", "slot_steps", "busy_steps")
            small = {k: int(stats[k]) for k in keys if k in stats}
        self._push("finished", (batch.key, small))

    def failed(self, batch: Any) -> None:
        """The batch's task raised: its cells stay missing."""
        self._push("failed", batch.key)

    def stopped(self) -> None:
        """The launch stopped before its batches ended (Ctrl-C, a signal, an error)."""
        self._push("stopped", None)

    def state(self) -> dict:
        """This launch's view as the page shows it (read from the scheduler)."""
        return sweep_state(self.client)["sweeps"][self.id]


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None
