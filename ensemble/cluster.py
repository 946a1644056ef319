"""Dask clusters and workers: connecting, counting workers, and a worker's device.

``connect`` yields a Client: the one given, one connected to a scheduler address (any
deployment: SSH, Kubernetes, dask-jobqueue on SLURM/PBS), or an embedded
``LocalCluster`` sized for this machine (one worker per GPU, else one per CPU core with
one thread each).
"""

from __future__ import annotations

import asyncio
import atexit
import fcntl
import gc
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster, WorkerPlugin, get_worker

from ensemble.cells import EnsembleError


def default_workers() -> int:
    """One worker per GPU if there are GPUs, else one per CPU core."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return max(1, len(os.sched_getaffinity(0)))


class QuickExit(WorkerPlugin):
    """Skip the interpreter's final garbage collection when a worker process exits
    (``gc.freeze`` at exit): with torch imported it took 2-4 s, past the 4 s the nanny
    waits before it kills the worker and logs "Worker process still alive". Results are
    written before a task returns, so nothing is lost; the OS frees the memory."""

    name = "ensemble-quick-exit"

    def setup(self, worker) -> None:
        atexit.register(gc.freeze)


@contextmanager
def connect(
    client: Client | None = None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    dashboard_address: str = ":8787",
) -> Iterator[Client]:
    """A Client for the sweep; an embedded cluster is closed on exit, a given one is not.
    With a scheduler address, waits for its first worker (the plan depends on them)."""
    with _known_dask_tracebacks_dropped():
        if client is not None:
            yield client
            return
        if scheduler is not None:
            with _client(scheduler) as c:
                if not worker_count(c):  # the plan is cut for the workers there are
                    print(f"waiting for a worker to join {scheduler}", file=sys.stderr, flush=True)
                    c.wait_for_workers(1)
                yield c
            return
        with _workers_ignore_sigint():
            cluster = LocalCluster(
                n_workers=n_workers or default_workers(),
                threads_per_worker=1,
                processes=True,
                dashboard_address=dashboard_address,
            )
        with cluster, Client(cluster) as c:
            c.register_plugin(QuickExit())
            yield c


class _CancelledReconnect(logging.Filter):
    """Drops distributed.client's ERROR record of a reconnection cancelled as the client
    closes (its traceback ends in CancelledError): the launch reports the lost scheduler
    in one line of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, asyncio.CancelledError)


class _InterruptBeforeSync(logging.Filter):
    """Drops tornado's ERROR record of distributed's ``sync`` cancelling a coroutine that
    had not started: a KeyboardInterrupt (Ctrl-C, or SIGTERM under the CLI) that lands
    before the loop ran the call makes ``sync``'s ``cancel`` read its unassigned
    ``future`` (distributed 2026.8: NameError, logged with a traceback). There was
    nothing to cancel; the launch reports the interrupt in one line of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, NameError) or exc.__traceback__ is None:
            return True
        *_, last = traceback.extract_tb(exc.__traceback__)
        return not (last.name == "cancel" and last.filename.endswith("distributed/utils.py"))


@contextmanager
def _known_dask_tracebacks_dropped() -> Iterator[None]:
    """Filters for the two harmless tracebacks Dask logs when a launch is interrupted
    or loses its scheduler (above), removed on exit."""
    filters = [
        (logging.getLogger("distributed.client"), _CancelledReconnect()),
        (logging.getLogger("tornado.application"), _InterruptBeforeSync()),
    ]
    for log, f in filters:
        log.addFilter(f)
    try:
        yield
    finally:
        for log, f in filters:
            log.removeFilter(f)


CONNECT_SECONDS = 60.0
"""Longest wait for a scheduler's answer: Client() itself waits forever on an address
that accepts connections but does not speak Dask (e.g. the dashboard's port)."""


def _client(address: str) -> Client:
    """Client(address) or, where the address is malformed, does not answer within
    CONNECT_SECONDS or fails otherwise, an EnsembleError naming it."""
    box: dict = {}

    def make() -> None:
        try:
            box["client"] = Client(address)
        except BaseException as exc:  # noqa: BLE001  reported below, whatever it is
            box["error"] = f"{type(exc).__name__}: {exc}"
        if "error" in box:
            # The half-built Client is cyclic garbage (its traceback holds it) whose
            # __del__ closes it, taking distributed's class-wide LoopRunner lock. Left to
            # the collector it can be finalised inside another Client's LoopRunner.start,
            # which holds that lock: that thread deadlocks, and with it every later
            # Client or LocalCluster of the process. Finalise it here, holding no lock.
            gc.collect()

    # a daemon thread: one stuck in a handshake does not hold up the exit
    thread = threading.Thread(target=make, name="ensemble-connect", daemon=True)
    thread.start()
    thread.join(CONNECT_SECONDS)
    where = f"cannot reach the Dask scheduler at {address}"
    if thread.is_alive():
        raise EnsembleError(
            f"{where}: no Dask answer within {CONNECT_SECONDS:g} s (a scheduler listens on"
            " port 8786 unless told otherwise; 8787 is its dashboard)"
        )
    if "error" in box:
        raise EnsembleError(f"{where}: {box['error']}")
    return box["client"]


@contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """Start worker processes with SIGINT ignored (they inherit it; Python then installs
    no KeyboardInterrupt handler): a terminal's Ctrl-C reaches the whole process group,
    and the launching process alone should stop, write what arrived and close the
    cluster, without every worker printing its own traceback. Only in the main thread
    (where signal handlers live); the handler is restored once the workers started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def workers(client: Client) -> dict[str, dict]:
    """The scheduler's record of each worker of ``client`` (address -> info), asked now.

    Not ``client.scheduler_info()``: it returns the client's cached identity, which a
    periodic refresh without per-worker details overwrites, so under load it showed no
    workers about one read in three."""
    return client.sync(client.scheduler.identity, n_workers=-1)["workers"]


def worker_count(client: Client) -> int:
    return len(workers(client))


def _sees_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu_workers(client: Client, device: str | None) -> bool:
    """Whether a launch's tasks train on GPUs: ``device`` if given, else whether any
    worker of ``client`` sees CUDA (``worker_device``'s default)."""
    if device:
        return device.startswith("cuda")
    answers = client.run(_sees_cuda, on_error="ignore")
    return any(v is True for v in answers.values())


def _host_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def worker_memory(client: Client) -> int:
    """The least memory any worker of ``client`` may use, in bytes: its Dask
    ``memory_limit`` (an embedded cluster's share of this machine), or its host's total
    memory where it has none."""
    info = workers(client)
    unlimited = [a for a, w in info.items() if not w.get("memory_limit")]
    hosts = client.run(_host_memory, workers=unlimited) if unlimited else {}
    return min(int(w.get("memory_limit") or hosts[a]) for a, w in info.items())


def task_memory() -> int:
    """The memory a task in this process may use, in bytes: on a Dask worker its
    ``memory_limit`` (where set), elsewhere the host's available memory."""
    import psutil

    try:
        limit = get_worker().memory_manager.memory_limit
    except ValueError:  # not on a worker
        limit = None
    return int(limit or psutil.virtual_memory().available)


def worker_device(device: str | None) -> str:
    """The device a task on this worker trains on: ``device`` if given, else a GPU, else
    the CPU. A worker named by an integer (an embedded ``LocalCluster``'s) takes GPU
    name % count; any other (the ``dask worker`` command names its workers by address)
    claims a GPU of its host that no other live worker process has (``claim_gpu``)."""
    if device:
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    n = torch.cuda.device_count()
    try:
        name = str(get_worker().name)
    except ValueError:  # not on a worker
        return "cuda"
    return f"cuda:{int(name) % n if name.isdigit() else claim_gpu(n)}"


_CLAIM: list[tuple[int, int]] = []
"""This process's GPU claim, (GPU index, its lock's descriptor), held for the process's life."""


def claim_gpu(n: int, lock_dir: str | None = None) -> int:
    """The index of a GPU of this host (of ``n``) that no other live process has claimed:
    the first whose lock file ``sgd-ensemble-gpu-<i>.lock`` in ``lock_dir`` (default: the
    temporary directory) this process can ``flock``. The kernel releases a claim when its
    process dies. Claimed once per process; with every GPU claimed, pid % n."""
    if _CLAIM:
        return _CLAIM[0][0]
    lock_dir = lock_dir or tempfile.gettempdir()
    for i in range(n):
        path = os.path.join(lock_dir, f"sgd-ensemble-gpu-{i}.lock")
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _CLAIM.append((i, fd))
        return i
    return os.getpid() % n
