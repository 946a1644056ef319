"""Sweep + store + Dask client -> results cube.

``launch`` validates the sweep and the data before any compute, creates or grows one
Zarr group per experiment, plans the cells not yet done into ensemble batches, submits
one Dask task per batch, and writes each member's results as soon as the member stops
(values first, ``done`` last). Rerunning the same sweep computes only the missing cells;
adding grid values computes only the new ones.

Members stream from the workers as they stop (``ensemble.stream``): a killed launch or
a failed task loses only its members still training, and a retried task trains only the
members its earlier attempt had not published.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import multiprocessing
import os
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import xarray as xr

import ensemble
from ensemble import cube
from ensemble.cells import Cell, EnsembleError, Group, SpecError
from ensemble.plan import (
    CPU_MEMORY_FRACTION,
    Batch,
    compile_break_even,
    format_plan,
    members_that_fit,
    plan_batches,
)
from ensemble.provenance import git_commit
from ensemble.schema import DIMS, KILLED, RUNNING, launch_end
from ensemble.spec import Experiment, Sweep, load_sweep
from ensemble.stream import TOPIC_PREFIX, MemberStream, Sink, member_record

TASKS_PER_WORKER = 4
"""Cells of a P are cut into at least this many tasks per worker (load balance)."""
MAX_MEMBERS = 256
"""Members per task on CPU workers by default (a CPU ensemble gains nothing past ~64 slots)."""
GPU_MAX_MEMBERS = 65536
"""Members per task on GPU workers by default: one task per worker and P, so the ensemble
is as large as the device's memory allows (``engine.default_slots``) and the sweep has
one tail per P rather than one per task (the H200 bench gains up to K = 16384)."""
MIN_MEMBERS_PER_TASK = 8
"""Load balance never cuts tasks below this many members (an ensemble of 8 is already
about 5x as fast per network as one network on a CPU core; see the README's bench)."""
REFILL_FACTOR = 2
"""A task's members per engine slot on the CPU, where a step's cost grows with K: the
slots are refilled as members stop. On a GPU every member gets a slot (within memory)."""
WRITE_EVERY = 2.0
"""Seconds between the launch's writes of the members streamed in (``stream.Sink``)."""
WORKER_CHECK_EVERY = 5.0
"""Seconds between the launch's counts of the cluster's workers: with none left it says
that it waits for workers to join (and again when they are back)."""
GATHER_TIMEOUT = 30.0
"""Seconds the launch waits for a finished task's results to come over: a task whose
worker died before they did is computed again by Dask, and meanwhile the launch goes on
watching the cluster (it used to block in the fetch, silent while no worker was left)."""
POLL_EVERY = 0.25
"""Seconds between the launch's looks at the stream and the tasks: starts reach the
progress bar and the sweep page within this, finished tasks are written at once."""
COMPILE_COST = {
    "fc": (25.4, 1_195.0, 1_343.0),
    "perceptron": (20.4, 4_151.0, 30_417.0),
    "mnas": (221.3, 3.26, 3.19),
}
"""Per architecture: (C, r_e, r_c) = the first compiled step of a process in seconds, and
the eager and compiled network-steps/s, from ``python -m ensemble bench --compile-cost
--threads 1 --K 8`` (K = 4 and 3 timed steps for MNAS) on this project's 2-core CPU,
2026-11-26; FC with its fused step (the generic one gained 2.6x from compiling), MNAS
with its channels-last convolutions (the NCHW ones gained about 2x)."""
COMPILE_SECONDS = {a: compile_break_even(*cost)[0] for a, cost in COMPILE_COST.items()}
"""Eager seconds after which a task that did not compile at once compiles
(``Engine.compile_after``): C r_c / (r_c - r_e), the time whose loss against compiled
steps equals C (ski rental: at most twice the best choice when the planned work was
underestimated). FC 230 s, perceptron 24 s, MNAS never (infinite: no gain)."""
COMPILE_BREAK_EVEN = {a: compile_break_even(*cost)[1] for a, cost in COMPILE_COST.items()}
"""Planned member-steps (``plan.estimate_steps`` summed over a task's members) above which
``compile`` repays the first compiled step at once: C r_e r_c / (r_c - r_e). FC 275,400,
perceptron 98,000, MNAS infinite."""


_compiled: set[tuple] = set()
"""Groups (settings) whose step this worker process has already compiled."""


def compile_policy(batch: Batch, compile: bool, device: str) -> tuple[bool, float | None]:
    """How a task of ``batch`` on ``device`` uses ``--compile`` (the CPU fast path):
    (compile at once, else compile after this many seconds eager, or None: never).

    At once when this process already compiled the group's step (free) or when the
    batch's planned work reaches `COMPILE_BREAK_EVEN` of its architecture; otherwise
    eager, compiling once the task has run `COMPILE_SECONDS`, so a sweep of many short
    tasks is not spent compiling and a long one the planner underestimated still is.
    Never for an architecture whose compiled step is no faster (MNAS)."""
    arch = batch.group.arch
    if not compile or device.split(":")[0] != "cpu" or math.isinf(COMPILE_SECONDS[arch]):
        return False, None
    if _group_key(batch.group) in _compiled or batch.work >= COMPILE_BREAK_EVEN[arch]:
        return True, None
    return False, COMPILE_SECONDS[arch]


def note_compiled(group: Group) -> None:
    """Record that this process compiled ``group``'s step (its later tasks compile at once)."""
    _compiled.add(_group_key(group))


def _group_key(group: Group) -> tuple:
    return tuple(sorted(group.as_dict().items()))


def check_shares(check_seconds: float, checkpoint_seconds: float, seconds: float) -> str:
    """The stopping checks' and the checkpoints' shares of ``seconds`` of engine time."""
    if not seconds:
        return "no engine time"
    return (
        f"stopping checks {check_seconds / seconds:.1%},"
        f" checkpoints {checkpoint_seconds / seconds:.1%} of engine time"
    )


@dataclasses.dataclass
class LaunchReport:
    """What one launch did: counts, wall time and throughput."""

    cells_total: int = 0
    cells_pending: int = 0
    cells_done: int = 0
    cells_failed: int = 0
    batches: int = 0
    seconds: float = 0.0
    member_steps: int = 0
    slot_steps: int = 0
    busy_steps: int = 0
    engine_seconds: float = 0.0
    check_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    """Engine counters summed over the tasks (``engine.EngineStats``)."""
    dashboard: str | None = None
    n_workers: int = 0
    devices: list[str] = dataclasses.field(default_factory=list)
    """Devices the finished tasks reported (GPU name or "cpu (N cores)"), sorted."""
    trained: dict[str, int] = dataclasses.field(default_factory=dict)
    """Cells written per experiment."""
    failed: dict[str, int] = dataclasses.field(default_factory=dict)
    """Cells per experiment whose task failed."""
    compiled_tasks: int = 0
    """Finished tasks that compiled their step (``compile_policy``)."""
    not_started: int = 0
    """Cells whose task spent its ``max_seconds`` before they got a slot: still missing,
    a rerun trains them."""
    stalled: int = 0
    """Members stopped as converged once stalled (``engine.STALL_EPOCHS``): their final
    training loss is positive at the rounding level."""
    skipped: int = 0
    """Members that retried tasks (their worker died) did not train again: an earlier
    attempt had published them (``MemberStream``)."""

    @property
    def cells_per_minute(self) -> float:
        return 60 * self.cells_done / self.seconds if self.seconds else math.nan

    @property
    def occupancy(self) -> float:
        return self.busy_steps / self.slot_steps if self.slot_steps else math.nan

    @property
    def shares(self) -> str:
        return check_shares(self.check_seconds, self.checkpoint_seconds, self.engine_seconds)

    def summary(self) -> str:
        return (
            f"{self.cells_done} cells trained in {self.seconds:.1f} s"
            f" ({self.cells_per_minute:.1f} cells/min, {self.member_steps} network-steps,"
            f" {self.member_steps / max(self.seconds, 1e-9):.0f} network-steps/s,"
            f" slot occupancy {self.occupancy:.0%}; {self.shares});"
            f" {self.cells_failed} failed;"
            f" {self.cells_total - self.cells_pending} were already done"
            + (
                f"; {self.compiled_tasks} of {self.batches} tasks compiled"
                if self.compiled_tasks
                else ""
            )
            + (
                f"; {self.not_started} cells not started within their task's max_seconds"
                " (still missing: a rerun trains them)"
                if self.not_started
                else ""
            )
            + (
                f"; {self.stalled} converged members stalled (a rounding-level training"
                " loss: ensemble.engine.STALL_EPOCHS)"
                if self.stalled
                else ""
            )
            + (
                f"; {self.skipped} cells not retrained by tasks retried after a worker died"
                if self.skipped
                else ""
            )
        )


def _settings(exp: Experiment) -> dict:
    """The group attributes that say what an experiment computes (a rerun must match)."""
    settings = {k: v for k, v in exp.group(exp.P[0]).as_dict().items() if k != "P"}
    return {"experiment": exp.name, **settings}


def _attrs(sweep: Sweep, exp: Experiment, git_commit: str) -> dict:
    """Flat group attributes: the experiment's settings and the launch's provenance
    (``git_commit`` from ``ensemble.provenance.git_commit``, asked once per launch)."""
    import torch

    return {
        **_settings(exp),
        "sweep": sweep.name,
        "package_version": ensemble.__version__,
        "git_commit": git_commit,
        "torch_version": torch.__version__,
        "device": _device_name(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _device_name(device: str | None = None) -> str:
    """Human-readable ``device`` (default: the first GPU if any, else the CPU)."""
    import torch

    if device is None:
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    if device == "cpu":
        return f"cpu ({os.cpu_count()} cores)"
    return device


def _layers(exp: Experiment) -> list[str]:
    from ensemble.models import build_model

    return list(build_model(exp.group(exp.P[0])).shapes)


def check_options(
    n_workers: int | None = None,
    device: str | None = None,
    slots: int | None = None,
    max_members: int | None = None,
    local: bool = False,
) -> None:
    """Raise SpecError, before any compute, for a launch option out of range: the counts
    must be integers >= 1 (or None, the default), ``device`` a torch device name; with
    ``local`` (an embedded cluster, whose workers run on this machine) a CUDA device must
    exist here."""
    counts = (
        ("n_workers (--workers)", n_workers),
        ("slots (--slots)", slots),
        ("max_members (--max-members)", max_members),
    )
    for name, value in counts:
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise SpecError(f"{name} must be an integer >= 1 (or unset), got {value!r}")
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise SpecError(
            f"device (--device) must be a torch device such as 'cpu' or 'cuda:0': {exc}"
        ) from None
    if dev.type not in ("cpu", "cuda"):
        raise SpecError(f"device (--device) must be 'cpu' or 'cuda[:N]', got {device!r}")
    if local and dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0 or (dev.index or 0) >= n:
            raise SpecError(
                f"device {device!r}: this machine has {n} CUDA device(s), and the embedded"
                " cluster's workers run here (use device 'cpu', or a scheduler whose workers"
                " have GPUs)"
            )


def preflight(
    spec: Sweep | str | os.PathLike,
    store: str | os.PathLike | None,
    n_workers: int | None,
    device: str | None,
    slots: int | None,
    max_members: int | None,
    data_root: str | None,
    local: bool,
) -> Sweep:
    """The sweep, once every check a launch makes before it touches the store or starts a
    cluster has passed (SpecError or DataError naming the problem otherwise): the options
    (`check_options`), the sweep file, the store path (`cube.check_store`) and, for an
    embedded cluster (``local``), its datasets here (`check_data`) and on this machine's
    CPUs each member's memory (`check_memory`); a given cluster's workers check theirs
    once connected (`check_workers`), so the launching machine needs no data.
    ``launch`` and ``dry_run`` both make them."""
    check_options(n_workers, device, slots, max_members, local=local)
    sweep = spec if isinstance(spec, Sweep) else load_sweep(spec)
    if local:
        check_data(sweep, data_root)
    if store is not None:
        cube.check_store(store)
    if local and not _local_gpus(device):
        from ensemble.cluster import default_workers

        # a given cluster's workers are checked once connected (check_workers)
        check_memory(sweep, _local_worker_memory(n_workers or default_workers()))
    return sweep


def check_memory(sweep: Sweep, worker_memory: int) -> None:
    """Raise SpecError, before any compute, where one member of a group needs more than
    CPU_MEMORY_FRACTION of a CPU worker's ``worker_memory`` (bytes; `plan.member_bytes`)."""
    budget = int(CPU_MEMORY_FRACTION * worker_memory)
    for exp in sweep.experiments:
        for P in exp.P:
            members_that_fit(exp.group(P), budget, True, f"{exp.name} (P={P})")


def check_workers(
    sweep: Sweep, client, device: str | None, data_root: str | None, commit: str
) -> None:
    """The checks a given cluster's workers need before the store changes: each finds the
    sweep's datasets (`check_data` run there, with ``data_root`` or the worker's own
    ENSEMBLE_DATA; DataError naming the worker otherwise), and `check_memory` against the
    least memory of the workers where they train on CPUs (`cluster.worker_memory`; GPU
    workers size their slots from the device memory). Workers that run other code than
    ``commit`` (this process's git commit) get a warning on stderr: the cube's launch
    record names ``commit``."""
    from ensemble.cluster import gpu_workers, worker_memory
    from ensemble.data import DataError

    answers = client.run(_worker_report, sweep, data_root)
    for address, (problem, theirs) in sorted(answers.items()):
        if problem:
            where = "--data-root" if data_root else "ENSEMBLE_DATA in the worker's environment"
            raise DataError(f"worker {address}: {problem} (the worker looks under {where})")
        if "unknown" not in (theirs, commit) and theirs != commit:
            print(
                f"warning: worker {address} runs ensemble at {theirs}, this launch at {commit};"
                " the cube's launch record names the latter",
                file=sys.stderr,
            )
    if not gpu_workers(client, device):
        check_memory(sweep, worker_memory(client))


def _worker_report(sweep: Sweep, data_root: str | None) -> tuple[str | None, str]:
    """On a worker: (why the sweep's data cannot be read there, or None; its git commit)."""
    try:
        check_data(sweep, data_root)
        problem = None
    except EnsembleError as exc:
        problem = str(exc)
    return problem, git_commit(Path(ensemble.__file__).parent)


def check_data(sweep: Sweep, data_root: str | None = None) -> None:
    """Raise DataError before any compute when a dataset of the sweep is missing."""
    from ensemble import data

    for name in sorted({e.settings["dataset"] for e in sweep.experiments} - {"perceptron"}):
        data.load_raw(name, data_root)


def check_settings(sweep: Sweep, store: str | os.PathLike) -> None:
    """Raise SpecError when an experiment of ``sweep`` is stored in ``store`` with other
    settings (`ensemble.cube.check_settings`)."""
    for exp in sweep.experiments:
        cube.check_settings(store, exp.name, _settings(exp))


def pending_cells(sweep: Sweep, store: str | os.PathLike) -> dict[str, list[Cell]]:
    """Cells of each experiment not yet done in ``store`` (all of them if it is new)."""
    out = {}
    for exp in sweep.experiments:
        done = cube.done_cells(store, exp.name)
        out[exp.name] = [c for c in exp.cells() if (c.alpha, c.T, c.P, c.seed) not in done]
    return out


def plan(
    sweep: Sweep,
    pending: dict[str, list[Cell]],
    n_workers: int,
    max_members: int | None,
    gpu: bool = False,
    worker_memory: int | None = None,
) -> list[Batch]:
    """Batches of the pending cells. CPU workers: at most ``max_members`` members (default
    MAX_MEMBERS) and at least TASKS_PER_WORKER tasks per worker for each P where there are
    enough cells (but no fewer than MIN_MEMBERS_PER_TASK members per task), and no more
    than CPU_MEMORY_FRACTION of ``worker_memory`` (bytes; None: unbounded) holds
    (`plan.member_bytes`; SpecError before any compute where one member does not fit).
    GPU workers (``gpu``): one task per worker for each P, of at most ``max_members``
    (default GPU_MAX_MEMBERS); the engine sizes its slots from the device's free memory."""
    tasks = 1 if gpu else TASKS_PER_WORKER
    cap = max_members or (GPU_MAX_MEMBERS if gpu else MAX_MEMBERS)
    memory = None if gpu or worker_memory is None else int(CPU_MEMORY_FRACTION * worker_memory)
    batches = []
    for exp in sweep.experiments:
        cells = pending[exp.name]
        for P in sorted({c.P for c in cells}):
            at_P = [c for c in cells if c.P == P]
            per_task = math.ceil(len(at_P) / (tasks * max(n_workers, 1)))
            size = max(1, min(cap, max(per_task, MIN_MEMBERS_PER_TASK)))
            batches += plan_batches(exp, at_P, max_members=size, memory_bytes=memory, host=True)
    return batches


def run_batch(
    batch: Batch,
    device: str | None,
    slots: int | None,
    data_root: str | None,
    compile: bool,
    topic: str | None = None,
):
    """Dask task: train one batch on this worker's device; returns plain dicts in the
    batch's member order (None for a member an earlier attempt of the task published and
    this one skipped) and the engine's counters, with ``"device"`` (readable name) and
    ``"skipped"``. Each member is also published on the Dask event ``topic`` as it stops
    (``stream.MemberStream``), after an event that says the task started.

    Continuous batching: on the CPU the engine gets fewer slots than members (half, by
    default) and refills a slot as soon as its member stops; members run in the batch's
    order, which the planner makes slowest first, so the batch does not end waiting for
    one of them. On a GPU every member gets a slot within the device's memory (more
    members than fit are refilled likewise). Either way the engine drops idle slots in
    the tail (``Engine(shrink=True)``).
    """
    import torch

    from ensemble.cluster import worker_device
    from ensemble.engine import Engine, EngineStats, default_slots

    group = batch.group
    if data_root is not None:
        group = Group(**{**group.as_dict(), "data_root": data_root})
    dev = worker_device(device)
    stream = MemberStream.open(topic, batch.key)
    if stream is not None:
        stream.started(_device_name(dev))
    skip = stream.published() if stream is not None else set()
    todo = [i for i in range(len(batch.members)) if i not in skip]
    records: list[dict | None] = [None] * len(batch.members)
    info = {"device": _device_name(dev), "compiled": False, "skipped": len(skip)}
    if not todo:
        return records, {**dataclasses.asdict(EngineStats()), **info}
    n = len(todo)
    if slots is None:  # a GPU step costs about the same for any K up to thousands
        gpu = torch.device(dev).type == "cuda"
        slots = default_slots(group, dev, n if gpu else math.ceil(n / REFILL_FACTOR))
    at_once, later = compile_policy(batch, compile, dev)
    engine = Engine(group, min(slots, n), dev, compile=at_once, compile_after=later)
    on_result = None
    if stream is not None:
        on_result = lambda j, r: stream.publish(todo[j], r)  # noqa: E731
    results = engine.run([batch.members[i] for i in todo], on_result)
    if engine.compiled:
        note_compiled(batch.group)
    for i, r in zip(todo, results, strict=True):
        records[i] = None if r is None else member_record(r)  # None: not started in time
    return records, {**dataclasses.asdict(engine.stats), **info, "compiled": engine.compiled}


def launch(
    spec: Sweep | str | os.PathLike,
    store: str | os.PathLike,
    client=None,
    scheduler: str | None = None,
    *,
    n_workers: int | None = None,
    device: str | None = None,
    slots: int | None = None,
    max_members: int | None = None,
    data_root: str | None = None,
    compile: bool = False,
    dashboard_address: str = ":8787",
    progress: bool = True,
    monitor: Callable | None = None,
    command: str | None = None,
) -> xr.DataTree:
    """Run a sweep into ``store`` and return the cube (one group per experiment); the
    returned tree's ``attrs["launch_report"]`` says what this launch did (LaunchReport).

    spec        : a Sweep, a .toml path or the name of a shipped sweep
    store       : Zarr store path (or fsspec URL); created or grown in place
    client      : an existing distributed.Client; else ``scheduler`` (address); else an
                  embedded LocalCluster with ``n_workers`` workers (default: one per GPU,
                  else one per core)
    device      : torch device for every task (default: the worker's GPU, else CPU)
    slots       : members trained at once per task (default from device memory, CPU 64)
    max_members : most members per task (continuous batching refills the slots); default
                  MAX_MEMBERS on CPU workers, GPU_MAX_MEMBERS (one task per P) on GPUs
    compile     : CPU workers compile the step with torch.compile (see ``Engine``) at
                  once in the tasks whose planned work repays it (`compile_policy`), in
                  the others once they have run `COMPILE_SECONDS`
    monitor     : factory ``monitor(client, sweep, store, batches)`` of an object with
                  ``started(batch)``, ``members(batch, results)`` (members just written),
                  ``finished(batch, stats)``, ``failed(batch)`` and, optionally,
                  ``stopped()`` (the launch stopped before its batches ended)
                  (``ensemble.monitor.SweepMonitor`` serves a page in the dashboard)
    command     : command line recorded in the launch records (default "python API")

    Each experiment with cells to train gets a launch record in its group attribute
    ``launches`` (``ensemble.schema.LAUNCHES_ATTR``), marked running before training and
    closed with the launch's numbers after its cells were written; a launch that
    neither trains nor fails a cell of an experiment removes its record there. Records
    a killed launch left running are settled by the next launch (`settle_launches`). A
    KeyboardInterrupt (Ctrl-C, or SIGTERM under the CLI) while training is raised after
    the cells that arrived are written, with ``cells_written`` set on it.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise EnsembleError(
            "launch() ran while a new process imported the main script (Dask starts its"
            " workers that way): put the script's launch under `if __name__ == '__main__':`"
        )
    if n_workers is not None and (client is not None or scheduler):
        raise SpecError(
            "n_workers (--workers) sizes the embedded cluster; a launch on a scheduler"
            " (--scheduler) or a client uses that cluster's workers: give one of the two"
        )
    local = client is None and not scheduler
    sweep = preflight(spec, store, n_workers, device, slots, max_members, data_root, local)
    report = LaunchReport()
    record = {
        "id": uuid.uuid4().hex[:12],
        "command": command or "python API",
        "sweep": sweep.name if isinstance(spec, Sweep) else str(spec),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "compile": compile,
        "git_commit": git_commit(Path(ensemble.__file__).parent),
    }
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if not local:  # reach the cluster and check its workers before the store changes
            from ensemble.cluster import connect

            client = stack.enter_context(connect(client=client, scheduler=scheduler))
            check_workers(sweep, client, device, data_root, record["git_commit"])
        with cube.store_lock(store):
            cube.recover(store)
            settle_launches(store)
            check_settings(sweep, store)  # every experiment's, before any group changes
            for exp in sweep.experiments:
                g = exp.group(exp.P[0])
                grid = {d: getattr(exp, d) for d in DIMS}
                cube.ensure_experiment(
                    store,
                    exp.name,
                    grid,
                    _layers(exp),
                    g.h * g.B,
                    _attrs(sweep, exp, record["git_commit"]),
                )
            pending = pending_cells(sweep, store)
            report.cells_total = len(sweep.cells())
            report.cells_pending = sum(len(v) for v in pending.values())
            if report.cells_pending == 0:
                if progress:
                    print(
                        f"{sweep.name}: all {report.cells_total} cells are already done in {store}"
                    )
            else:
                task = TaskOptions(device, slots, max_members, data_root, compile)
                cluster = dict(
                    client=client,
                    scheduler=None,
                    n_workers=n_workers,
                    dashboard_address=dashboard_address,
                )
                completed = False
                opened = _open_launch(store, pending, record)
                try:
                    _execute(sweep, store, pending, cluster, task, progress, monitor, report)
                    completed = True
                except KeyboardInterrupt as exc:  # the CLI's message says what was kept
                    exc.cells_written = sum(report.trained.values())
                    raise
                finally:
                    report.seconds = time.perf_counter() - t0
                    _record_launch(store, report, {**record, "completed": completed}, opened)
    report.seconds = time.perf_counter() - t0
    if progress and report.cells_pending:
        print(report.summary())
    tree = xr.open_datatree(store, engine="zarr")
    tree.attrs["launch_report"] = {**dataclasses.asdict(report), "summary": report.summary()}
    return tree


def _open_launch(
    store: str | os.PathLike, pending: dict[str, list[Cell]], record: dict
) -> dict[str, int]:
    """Record the launch as running in every group it has cells of, with the cells done
    before it, so that a launch killed before it can close its records leaves a trace
    (store lock held). Returns those groups' cells done before it, by group."""
    opened = {}
    for name, cells in pending.items():
        if cells:
            opened[name] = before = len(cube.done_cells(store, name))
            cube.append_launch(
                store,
                name,
                {**record, "completed": None, "ended": RUNNING, "cells_done_before": before},
            )
    return opened


def _record_launch(
    store: str | os.PathLike, report: LaunchReport, record: dict, opened: dict[str, int]
) -> None:
    """Close this launch's running records (``opened``, from ``_open_launch``) with its
    numbers in every group that got cells from it or had cells fail in it, and remove
    them from the others (called after the cells are written, store lock held)."""
    devices = ", ".join(report.devices) or "unknown"  # known once a task started
    for name, before in opened.items():
        n, failed = report.trained.get(name, 0), report.failed.get(name, 0)
        final = {
            **record,
            "cells_done_before": before,
            "wall_s": round(report.seconds, 3),
            "device": devices,
            "n_workers": report.n_workers,
            "cells_trained": n,
            "cells_failed": failed,
        }
        cube.replace_launch(store, name, record["id"], final if n or failed else None)


def settle_launches(store: str | os.PathLike) -> None:
    """Close the launch records still marked running: their launch died (SIGKILL, a lost
    machine) before closing them. Holding the store lock proves it, so this runs only on
    local stores, from a launch that holds it. A settled record says ``ended`` = KILLED,
    ``completed`` False, no wall time, and the cells written since it opened."""
    if not cube.is_local(store):
        return
    try:
        names = cube.experiment_names(store)
    except FileNotFoundError:  # a new store
        return
    for name in names:
        running = [r for r in cube.launches(store, name) if r.get("ended") == RUNNING]
        done = len(cube.done_cells(store, name)) if running else 0
        for r in running:
            trained = max(done - int(r.get("cells_done_before") or 0), 0)
            settled = {**r, "completed": False, "ended": KILLED, "wall_s": None}
            settled |= {"cells_trained": trained}
            cube.replace_launch(store, name, r["id"], settled)


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """How each Dask task trains its batch (see ``launch``)."""

    device: str | None = None
    slots: int | None = None
    max_members: int | None = None
    data_root: str | None = None
    compile: bool = False


def _execute(sweep, store, pending, cluster: dict, task: TaskOptions, progress, monitor, report):
    from distributed import wait
    from tqdm.auto import tqdm

    from ensemble.cluster import connect, gpu_workers, worker_count, worker_memory

    with connect(**cluster) as c:
        report.dashboard = c.dashboard_link
        report.n_workers = worker_count(c)
        gpu = gpu_workers(c, task.device)
        memory = None if gpu else worker_memory(c)
        batches = plan(sweep, pending, report.n_workers, task.max_members, gpu, memory)
        report.batches = len(batches)
        mon = monitor(c, sweep, store, batches) if monitor else None
        if progress:
            n, tasks = report.cells_pending, len(batches)
            print(
                f"{sweep.name}: {n} cell{'s' * (n != 1)} to train in {tasks}"
                f" task{'s' * (tasks != 1)}"
            )
            print(f"Dask dashboard: {c.dashboard_link}")
            if mon is not None and getattr(mon, "url", None):
                print(f"Sweep page:     {mon.url}")
        bar = tqdm(total=report.cells_pending, unit="cell", disable=not progress, smoothing=0)
        sink = Sink(store, sweep, batches, report, bar, mon)
        launch_id = uuid.uuid4().hex[:12]
        topic = TOPIC_PREFIX + launch_id
        inbox: deque = deque()  # appended to by the client's event loop thread
        c.subscribe_topic(topic, lambda event: inbox.append(event[1]))
        futures: dict = {}
        try:
            futures = {
                c.submit(
                    run_batch,
                    b,
                    task.device,
                    task.slots,
                    task.data_root,
                    task.compile,
                    topic,
                    # unique to this launch: a key an earlier launch left on the cluster
                    # would hand back that launch's result without training
                    key=f"{b.key}-{launch_id}",
                    pure=False,
                    # the most planned work first, so no long task starts last and runs alone
                    priority=int(b.work),
                ): b
                for b in batches
            }
            remaining = set(futures)
            last_write, shown = time.monotonic(), None
            last_count, orphaned = time.monotonic(), False
            while remaining:
                if time.monotonic() - last_count >= WORKER_CHECK_EVERY:
                    last_count = time.monotonic()
                    if orphaned != (worker_count(c) == 0):
                        orphaned = not orphaned
                        news = (
                            f"no workers left on {c.scheduler.address}: waiting for workers"
                            " to join (Ctrl-C stops; a rerun resumes)"
                            if orphaned
                            else "workers joined: training goes on"
                        )
                        if progress:
                            tqdm.write(news, file=sys.stderr)
                try:
                    finished, remaining = wait(
                        remaining, timeout=POLL_EVERY, return_when="FIRST_COMPLETED"
                    )
                except TimeoutError:
                    finished = set()
                sink.receive(inbox)
                new = 0
                if finished or time.monotonic() - last_write >= WRITE_EVERY:
                    new, last_write = sink.flush(), time.monotonic()
                for f in finished:
                    try:
                        results, stats = f.result(timeout=GATHER_TIMEOUT)
                    except TimeoutError:  # its worker died with them: Dask computes it again
                        remaining.add(f)
                        continue
                    except Exception as exc:  # noqa: BLE001  a failed batch loses only itself
                        new += sink.lost(futures[f], exc)
                    else:
                        new += sink.finished(futures[f], results, stats)
                running = sum(
                    len(futures[f].members) - len(sink.written[futures[f].key])
                    for f in remaining
                    if futures[f].key in sink.started
                )
                if new or (running, report.cells_failed) != shown:
                    shown = running, report.cells_failed
                    bar.set_postfix(running=running, failed=report.cells_failed, refresh=False)
                    if new:
                        bar.update(new)
                    else:
                        bar.refresh()
        except BaseException as exc:  # interrupted (Ctrl-C) or failed: the cluster drops its tasks
            with contextlib.suppress(Exception):
                c.cancel(list(futures))
            if mon is not None and hasattr(mon, "stopped") and c.status == "running":
                with contextlib.suppress(Exception):
                    mon.stopped()
            if isinstance(exc, Exception) and c.status != "running":
                raise EnsembleError(
                    f"lost the Dask scheduler ({type(exc).__name__}); the cells that arrived"
                    " are written: rerun the same command to train the rest"
                ) from exc
            raise
        finally:
            try:  # what already arrived is written, also when the launch is interrupted
                sink.receive(inbox)
                bar.update(sink.flush())
            finally:
                bar.close()
                with contextlib.suppress(Exception):  # a closing client drops its topics
                    c.unsubscribe_topic(topic)


def _local_worker_memory(n_workers: int) -> int:
    """Bytes each of ``n_workers`` workers of an embedded cluster gets: its share of this
    machine's memory, as Dask's ``memory_limit="auto"`` divides it."""
    return psutil.virtual_memory().total // n_workers


def _local_gpus(device: str | None) -> bool:
    """Whether workers on this machine train on GPUs: ``device`` if given, else whether
    this machine has CUDA (as ``cluster.gpu_workers`` decides for a running cluster)."""
    if device is not None:
        return device.startswith("cuda")
    import torch

    return torch.cuda.is_available()


def dry_run(
    spec: Sweep | str | os.PathLike,
    store: str | os.PathLike | None,
    n_workers: int,
    max_members: int | None = None,
    device: str | None = None,
    slots: int | None = None,
    data_root: str | None = None,
) -> str:
    """The plan of the cells still missing in ``store`` (all cells without a store), as
    ``launch`` with the same options would cut it: for GPU workers if ``device`` is a CUDA
    one (without it, if this machine has CUDA), else for CPU workers sharing this
    machine's memory; then the sweep file's ``expected_cost``. Refuses what the launch
    refuses before any compute (`preflight`, changed stored settings); a CUDA ``device``
    is planned for even where this machine has none (for a launch on a scheduler)."""
    sweep = preflight(spec, store, n_workers, device, slots, max_members, data_root, False)
    check_data(sweep, data_root)  # as a launch on an embedded cluster would
    if store is None:
        pending = {e.name: e.cells() for e in sweep.experiments}
    else:
        check_settings(sweep, store)
        pending = pending_cells(sweep, store)  # all cells where the store is new
    n_pending = sum(len(v) for v in pending.values())
    if n_pending == 0:
        return f"{sweep.name}: all {len(sweep.cells())} cells are already done in {store}"
    batches = plan(
        sweep, pending, n_workers, max_members, _local_gpus(device), _local_worker_memory(n_workers)
    )
    return (
        f"{sweep.name}: {n_pending} cells pending\n{format_plan(batches)}\n"
        f"Expected cost of the whole sweep (sweep file): {sweep.expected_cost}"
    )


def store_status(store: str | os.PathLike, estimates: bool = False) -> str:
    """Per experiment: cells done / total and counts per outcome, and its launch records
    (how many; the last one's start, end and cells); with ``estimates``, also how the
    planner's step estimates compare with the steps taken (`estimate_ratios`)."""
    from ensemble.schema import OUTCOME_FLAGS

    try:
        names = cube.experiment_names(store)
        groups = {
            n: xr.open_zarr(store, group=n, consolidated=False, chunks=None) for n in sorted(names)
        }
    except (FileNotFoundError, KeyError) as exc:
        raise EnsembleError(
            f"store {store} is not a results cube ({type(exc).__name__}: {exc})"
        ) from None
    lines = [f"{store}"]
    for name, ds in groups.items():
        done = int(ds["done"].sum())
        total = int(ds["done"].size)
        counts = {OUTCOME_FLAGS[k]: int((ds["outcome"] == k).sum()) for k in OUTCOME_FLAGS if k}
        missing = total - done
        lines.append(
            f"  {name}: {done}/{total} done, {missing} missing; "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + f"  [sweep {ds.attrs.get('sweep')}, {dict(ds.sizes)}]"
        )
        records = cube.launches(store, name)
        if records:
            last = records[-1]
            killed = sum(r.get("ended") == KILLED for r in records)
            lines.append(
                f"    launches: {len(records)} recorded{f' ({killed} killed)' if killed else ''};"
                " the last started"
                f" {last.get('started', '?')}, {launch_end(last)},"
                f" {last.get('cells_trained', '?')} cells trained,"
                f" {last.get('cells_failed', '?')} failed"
            )
        if estimates:
            r = estimate_ratios(ds)
            lines.append(
                "    steps / planner estimate (seed means of converged cells): "
                + (
                    f"geometric mean {math.exp(float(np.log(r).mean())):.2f},"
                    f" range {r.min():.2f}-{r.max():.2f}, rms"
                    f" {math.exp(math.sqrt(float((np.log(r) ** 2).mean()))):.2f}x"
                    f" over {r.size} (alpha, T, P)"
                    if r.size
                    else "no converged cell yet"
                )
            )
    return "\n".join(lines)


def estimate_ratios(ds: xr.Dataset) -> np.ndarray:
    """Measured / estimated steps (``plan.estimate_steps``) of one experiment's group, per
    (alpha, T, P) with a converged seed: the geometric mean of its converged seeds' steps
    over the estimate for its settings (read from the group's attributes). What a
    researcher checks the dry run's expected cost against, and what refits the cost model."""
    from ensemble.cells import Member
    from ensemble.plan import estimate_steps
    from ensemble.schema import CONVERGED

    fields = {f.name for f in dataclasses.fields(Group)} - {"P", "data_root"}
    settings = {k: v for k, v in ds.attrs.items() if k in fields}
    converged = (ds["done"] & (ds["outcome"] == CONVERGED)).values  # (alpha, T, P, seed)
    steps = np.where(converged, ds["steps"].values, np.nan)
    out = []
    for i, alpha in enumerate(ds["alpha"].values):
        for j, T in enumerate(ds["T"].values):
            for k, P in enumerate(ds["P"].values):
                s = steps[i, j, k]
                s = s[np.isfinite(s) & (s > 0)]
                if s.size:
                    group = Group(**settings, P=int(P))
                    est = estimate_steps(group, Member(float(alpha), float(T), 0))
                    out.append(math.exp(float(np.log(s).mean())) / est)
    return np.array(out)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m ensemble run ...")
