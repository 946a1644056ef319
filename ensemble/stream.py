"""The member stream: how finished members travel from the Dask tasks into the cube.

A task (``launch.run_batch``) opens its end, ``MemberStream``: it announces that it
started, then publishes each finished member on the launch's Dask event topic
(``Worker.log_event``, the channel ``distributed.print`` uses). The launching process,
subscribed to that topic, hands what arrived to its end, ``Sink``: task starts at once
(every ``launch.POLL_EVERY`` seconds), members every ``launch.WRITE_EVERY`` seconds in
one Zarr write per experiment, values first and ``done`` last. A killed launch or a
failed task therefore loses only its members still training, and a task Dask retries
after its worker died trains only the members its earlier attempt had not published.
The task also returns its results, and the sink writes those no event brought. The
monitor hears of a task's start from its event, so even a task that ends between two of
the launch's checks is seen starting.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from ensemble import cube

if TYPE_CHECKING:
    from ensemble.engine import MemberResult
    from ensemble.launch import LaunchReport
    from ensemble.plan import Batch
    from ensemble.spec import Sweep

logger = logging.getLogger(__name__)

TOPIC_PREFIX = "ensemble-members-"
"""A launch's Dask event topic is this prefix and a random hex id."""

SNAPSHOT_EVERY = 250
"""A task publishes, after every this many members, every index it has published so far
(one bitmap): the scheduler keeps only the last ``distributed.admin.low-level-log-length``
events of a topic (1000 by default), so a retried task reads the last snapshot and the
marks after it (fewer where that setting is under twice this)."""


def _bitmap(indices: set[int]) -> bytes:
    bits = np.zeros(max(indices) + 1, dtype=bool)
    bits[list(indices)] = True
    return np.packbits(bits).tobytes()


def _indices(bitmap: bytes) -> set[int]:
    return set(np.flatnonzero(np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8))).tolist())


def member_record(result: MemberResult) -> dict:
    """``MemberResult`` as the plain dict a task sends and ``CubeWriter.write`` takes
    (no weights; msgpack-able)."""
    d = dataclasses.asdict(result)
    d.pop("weights")
    return d


class MemberStream:
    """A task's end of its launch's event stream (``launch.run_batch`` on a Dask worker).

    ``started(device)`` sends ``{"key": key, "started": True, "device": device}`` on
    ``topic`` as the task begins.
    ``publish(index, result)`` (``Engine.run``'s ``on_result``) sends the member's record
    as ``{"key": key, "index": index, "result": member_record}`` on ``topic``, which the
    launching process writes, then the bare index on ``topic/key`` (and, every
    `SNAPSHOT_EVERY` members, all of them so far). ``published()`` reads those indices
    back: a task that Dask retries after its worker died skips the members an earlier
    attempt already sent (the records went out first, so every index read back has its
    record on its way to the launching process)."""

    def __init__(self, topic: str, key: str):
        import dask
        from distributed import get_worker

        self.worker = get_worker()  # ValueError outside a worker
        self.topic, self.key = topic, key
        self.marks = f"{topic}/{key}"
        self.sent: set[int] = set()  # every index published, by this attempt or earlier
        kept = int(dask.config.get("distributed.admin.low-level-log-length", 1000))
        self.every = max(1, min(SNAPSHOT_EVERY, kept // 2))
        self._warned = False

    @classmethod
    def open(cls, topic: str | None, key: str) -> MemberStream | None:
        """The stream of task ``key``; None without a topic or outside a Dask worker (the
        results then reach the launch with the task's return only)."""
        if topic is None:
            return None
        try:
            return cls(topic, key)
        except ValueError:
            return None

    def published(self) -> set[int]:
        """Indices of the members an earlier attempt of this task published: the last
        snapshot and the marks after it."""
        from distributed import get_client

        try:
            events = get_client().get_events(self.marks)
        except Exception as exc:  # noqa: BLE001  then retrain them all (the launch dedups)
            logger.warning("task %s: could not read its earlier members (%r)", self.key, exc)
            return set()
        done: set[int] = set()
        for _, msg in events:
            if isinstance(msg, dict):  # a snapshot: every index up to here
                done = _indices(msg["published"])
            else:
                done.add(int(msg))
        self.sent = set(done)
        return done

    def started(self, device: str) -> None:
        """Announce that this task began on ``device`` (a readable name), before its data
        and engine are set up."""
        try:
            msg = {"key": self.key, "started": True, "device": device}
            self.worker.log_event(self.topic, msg)
        except Exception as exc:  # noqa: BLE001  its first member will say so instead
            logger.warning("task %s: start not streamed (%r)", self.key, exc)

    def publish(self, index: int, result: MemberResult) -> None:
        try:
            record = member_record(result)
            self.worker.log_event(self.topic, {"key": self.key, "index": index, "result": record})
            self.worker.log_event(self.marks, index)
            self.sent.add(index)
            if len(self.sent) % self.every == 0:
                self.worker.log_event(self.marks, {"published": _bitmap(self.sent)})
        except Exception as exc:  # noqa: BLE001  the task's return still carries the member
            if not self._warned:
                self._warned = True
                logger.warning("task %s: member %d not streamed (%r)", self.key, index, exc)


class Sink:
    """The launching process's end of a launch: writes each member into the cube once
    (from the event stream or from its task's return, whichever comes first), and counts
    it in the report and the monitor; each call returns the cells it wrote. ``started``
    holds the keys of the tasks that announced their start."""

    def __init__(self, store, sweep: Sweep, batches: list[Batch], report: LaunchReport, bar, mon):
        """``bar``: the progress bar, for messages; ``mon``: the monitor or None."""
        self.writers = {e.name: cube.CubeWriter(store, e.name) for e in sweep.experiments}
        self.batches = {b.key: b for b in batches}
        self.written: dict[str, set[int]] = {b.key: set() for b in batches}
        self.failed: set[str] = set()
        self.started: set[str] = set()
        self.pending: list[tuple[str, int, dict]] = []  # received, not yet written
        self.report, self.bar, self.mon = report, bar, mon

    def _device(self, device: str | None) -> None:
        r = self.report
        if device and device not in r.devices:
            r.devices = sorted([*r.devices, device])

    def _count_failed(self, b: Batch, n: int) -> None:
        """Count ``n`` cells of ``b`` as failed (negative: a late one arrived after all)."""
        self.failed.add(b.key)
        self.report.cells_failed += n
        self.report.failed[b.experiment] = self.report.failed.get(b.experiment, 0) + n

    def receive(self, inbox: deque) -> None:
        """Take the events that arrived (``MemberStream.started`` and ``publish``): mark
        the tasks that started at once, keep the members for the next ``flush``."""
        while inbox:
            msg = inbox.popleft()
            if not isinstance(msg, dict) or msg.get("key") not in self.batches:
                continue
            if msg.get("started"):
                self.start(msg["key"], msg.get("device"))
            else:
                self.pending.append((msg["key"], int(msg["index"]), msg["result"]))

    def flush(self) -> int:
        """Write the members received since the last flush."""
        n = self.write(self.pending)  # kept until written: an interrupted write is redone
        self.pending = []
        return n

    def start(self, key: str, device: str | None = None) -> None:
        """Task ``key`` began training on ``device`` (once per task, a retried one
        included); the device is the launch record's at once, should the launch stop
        before the task returns."""
        self._device(device)
        if key not in self.started:
            self.started.add(key)
            if self.mon is not None:
                self.mon.started(self.batches[key])

    def write(self, items: Iterable[tuple[str, int, dict]]) -> int:
        """Write members (batch key, member index, record) not written before: one Zarr
        write per experiment, ``done`` last; then count them."""
        fresh: dict[str, dict[int, dict]] = {}
        for key, i, record in items:
            if i not in self.written[key]:
                fresh.setdefault(key, {})[i] = record
        by_exp: dict[str, tuple[list, list]] = {}
        for key, members in fresh.items():
            b = self.batches[key]
            cells, records = by_exp.setdefault(b.experiment, ([], []))
            for i, record in members.items():
                m = b.members[i]
                cells.append((m.alpha, m.T, b.group.P, m.seed))
                records.append(record)
        for exp, (cells, records) in by_exp.items():
            self.writers[exp].write(cells, records)
        r = self.report
        for key, members in fresh.items():
            b, n = self.batches[key], len(members)
            self.written[key].update(members)
            r.cells_done += n
            r.trained[b.experiment] = r.trained.get(b.experiment, 0) + n
            if key in self.failed:  # a failed task's member whose event came late
                self._count_failed(b, -n)
            if self.mon is not None:
                self.mon.members(b, list(members.values()))
        return sum(len(members) for members in fresh.values())

    def finished(self, b: Batch, results: list[dict | None], stats: dict) -> int:
        """The task of ``b`` returned (``flush`` first): write the members no event
        brought; add its counters. A member neither streamed nor returned (published by an
        attempt that died, its record lost on the way) counts as failed, one that never
        started (the task's ``max_seconds`` was spent) as not started: both stay missing."""
        n = self.write((b.key, i, rec) for i, rec in enumerate(results) if rec is not None)
        r = self.report
        not_started = int(stats.get("not_started", 0))
        r.not_started += not_started
        # not_started can include members an earlier attempt wrote, where the retry could
        # not read back what that attempt published and trained them again
        lost = max(0, len(b.members) - len(self.written[b.key]) - not_started)
        if lost:
            self._count_failed(b, lost)
            self.bar.write(f"batch {b.key}: {lost} cells published but not received stay missing")
        r.skipped += int(stats.get("skipped", 0))
        r.stalled += int(stats.get("stalled", 0))
        self._device(stats.get("device"))
        r.member_steps += stats["member_steps"]
        r.slot_steps += stats["slot_steps"]
        r.busy_steps += stats["busy_steps"]
        r.engine_seconds += stats["seconds"]
        r.check_seconds += stats["check_seconds"]
        r.checkpoint_seconds += stats["checkpoint_seconds"]
        r.compiled_tasks += bool(stats.get("compiled"))
        if self.mon is not None:
            self.mon.finished(b, stats)
        return n

    def lost(self, b: Batch, exc: BaseException) -> int:
        """The task of ``b`` raised: its members not yet written stay missing."""
        n = len(b.members) - len(self.written[b.key])
        self._count_failed(b, n)
        self.bar.write(
            f"batch {b.key} failed: {exc!r}; its {n} unfinished cells stay missing"
            f" ({len(self.written[b.key])} finished ones were written)"
        )
        if self.mon is not None:
            self.mon.failed(b)
        return 0
