"""The results cube: one Zarr group per experiment, laid out as ``ensemble.schema`` says.

Writing is done by one process (the launcher), which receives each member's results as
the member stops (streamed from its Dask task). Each write's values are written first and
its cells' ``done`` flags last, and every Zarr chunk is written atomically
(``zarr.storage.LocalStore`` writes to a temporary file and renames it), so a process
killed at any moment leaves a store that opens and whose ``done`` cells are complete.
Growing a grid rewrites the (small) group under a temporary name and swaps it in with a
directory rename; in a remote store, which has no rename, it writes a complete staged copy
first (``_write_group``). Either way ``recover``, the first thing a launch does, repairs
what a kill interrupted.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from ensemble.cells import EnsembleError, SpecError
from ensemble.schema import (
    CELL_VARS,
    CHECKPOINT_DIM,
    CHECKPOINT_VARS,
    COORDS,
    DIMS,
    LAUNCHES_ATTR,
    LAYER_DIM,
    LAYER_VARS,
    MISSING,
    N_CHECKPOINTS,
    NTK_VARS,
    OUTCOME_FLAGS,
    PERCEPTRON_VARS,
    SETTING_DEFAULTS,
    checkpoint_steps,
)

LOCK_SUFFIX = ".lock"
"""The lock of store ``x.zarr`` is the file ``x.zarr.lock`` beside it."""


class StoreBusyError(EnsembleError, RuntimeError):
    """Another launch holds the store."""


@contextmanager
def _quiet_zarr() -> Iterator[None]:
    """Silence zarr's notice that consolidated metadata is not in the v3 spec, and its
    notice, to a reader beside a running launch, that a chunk being written (LocalStore's
    temporary ``*.partial`` file) "is not recognized as a component"."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata")
        warnings.filterwarnings("ignore", message=r".*\.partial is not recognized")
        yield


def is_local(store: str | os.PathLike) -> bool:
    """Whether ``store`` is a path on this machine (or a file:// URL), not a remote URL."""
    return "://" not in str(store) or str(store).startswith("file://")


def _local_path(store: str | os.PathLike) -> Path:
    return Path(str(store).removeprefix("file://"))


def check_store(store: str | os.PathLike) -> None:
    """Raise SpecError where a local ``store`` cannot be a cube: a file, or a folder that
    holds something other than a Zarr store (no ``zarr.json``), which a launch would fill."""
    if not is_local(store):
        return
    path = _local_path(store)
    if path.exists() and not path.is_dir():
        raise SpecError(f"store {store} is a file: give a new path or an existing cube")
    if path.is_dir() and any(path.iterdir()) and not (path / "zarr.json").exists():
        raise SpecError(
            f"store {store} is a folder that holds no Zarr store (no zarr.json): give a new"
            " path or an existing cube"
        )


@contextmanager
def store_lock(store: str | os.PathLike) -> Iterator[None]:
    """Hold the store for one launch; a second launch on the same store is refused.

    The lock is an advisory ``flock`` on the file ``x.zarr.lock`` beside the store, which
    names its holder (host, pid). The kernel releases it when the holder dies, so a
    killed launch leaves no stale lock and two launches can never both hold it (on a
    network file system, as far as it supports ``flock``). Remote (fsspec URL) stores are
    not locked: coordinate launches on them yourself.
    """
    if not is_local(store):
        yield
        return
    root = _local_path(store)
    root.parent.mkdir(parents=True, exist_ok=True)
    root = root.resolve()  # one lock for every path (symbolic links) to the store
    path = root.with_name(root.name + LOCK_SUFFIX)
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.read(fd, 4096) or b"{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            os.close(fd)
            raise StoreBusyError(
                f"store {root} is in use by another launch (host {holder.get('host')}, pid "
                f"{holder.get('pid')}); wait for it to finish"
            ) from None
        try:  # the last holder may have removed the file between our open and flock
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding it
        os.close(fd)


def _variables(attrs: dict) -> dict[str, tuple[str, str]]:
    """The per-cell variables of a group with settings ``attrs``."""
    perceptron = PERCEPTRON_VARS if attrs.get("arch") == "perceptron" else {}
    ntk = NTK_VARS if attrs.get("ntk_points", SETTING_DEFAULTS["ntk_points"]) else {}
    return {**CELL_VARS, **perceptron, **ntk}


def empty_experiment(
    alpha: Sequence[float],
    T: Sequence[float],
    P: Sequence[int],
    seed: Sequence[int],
    layers: Sequence[str],
    dt_per_T: float,
    attrs: dict,
) -> xr.Dataset:
    """A group with every cell missing: done False, outcome 0, values NaN.

    dt_per_T : h * B, so that the derived coordinate is dt = T * h * B
    attrs    : the experiment's settings and provenance (flat JSON-able values)
    """
    shape = (len(alpha), len(T), len(P), len(seed))
    coords = {
        "alpha": np.asarray(alpha, dtype=np.float64),
        "T": np.asarray(T, dtype=np.float64),
        "P": np.asarray(P, dtype=np.int64),
        "seed": np.asarray(seed, dtype=np.int64),
        LAYER_DIM: np.asarray(list(layers), dtype=object),  # variable-length strings
        CHECKPOINT_DIM: np.arange(N_CHECKPOINTS),
    }
    ds = xr.Dataset(coords=coords)
    ds = ds.assign_coords(
        dt=("T", coords["T"] * dt_per_T),
        checkpoint_step=(CHECKPOINT_DIM, np.asarray(checkpoint_steps(), dtype=np.int64)),
    )
    ds["done"] = (DIMS, np.zeros(shape, dtype=bool))
    ds["done"].attrs = {"long_name": "cell computed and written", "units": "1"}
    ds["outcome"] = (DIMS, np.full(shape, MISSING, dtype=np.int8))
    ds["outcome"].attrs = {
        "long_name": "how training stopped",
        "units": "1",
        "flag_values": list(OUTCOME_FLAGS),
        "flag_meanings": " ".join(OUTCOME_FLAGS.values()),
    }
    for name, (long_name, units) in _variables(attrs).items():
        ds[name] = (DIMS, np.full(shape, np.nan))
        ds[name].attrs = {"long_name": long_name, "units": units}
    for name, (long_name, units) in LAYER_VARS.items():
        ds[name] = (DIMS + (LAYER_DIM,), np.full(shape + (len(layers),), np.nan))
        ds[name].attrs = {"long_name": long_name, "units": units}
    for name, (long_name, units) in CHECKPOINT_VARS.items():
        ds[name] = (DIMS + (CHECKPOINT_DIM,), np.full(shape + (N_CHECKPOINTS,), np.nan))
        ds[name].attrs = {"long_name": long_name, "units": units}
    for name, a in COORDS.items():
        ds[name].attrs = dict(a)
    ds.attrs = dict(attrs)
    return ds


def _encoding(ds: xr.Dataset) -> dict:
    """Chunks of one (P, seed) slice of the (alpha, T) plane: a batch touches few chunks."""
    enc = {}
    for name, var in ds.data_vars.items():
        chunks = tuple(
            1 if d in ("P", "seed") else n for d, n in zip(var.dims, var.shape, strict=True)
        )
        enc[name] = {"chunks": chunks}
    enc["outcome"]["_FillValue"] = None
    enc["done"]["_FillValue"] = None
    return enc


SWAP_READY = "swap_ready"
"""Attribute of a remote store's staged group ``<name>.__new`` once it is complete."""


def _write_group(ds: xr.Dataset, store: str | os.PathLike, name: str) -> None:
    """Write a whole group so that a kill at any moment keeps the old group or the new
    one: locally a temporary group swapped in by a directory rename; in a remote store
    (no rename there) a complete staged copy ``<name>.__new``, marked ``SWAP_READY``,
    before the group is overwritten, which ``recover`` copies over a half-written group."""
    with _quiet_zarr():
        if not is_local(store):
            staged = f"{name}.__new"
            ds.to_zarr(store, group=staged, mode="w", encoding=_encoding(ds), consolidated=False)
            zarr.open_group(store, path=staged, mode="a").attrs[SWAP_READY] = True
            ds.to_zarr(store, group=name, mode="w", encoding=_encoding(ds), consolidated=False)
            del zarr.open_group(store, mode="a")[staged]
            _set_experiments(store)
            return
        root = _local_path(store)
        tmp, old = root / f"{name}.__new", root / f"{name}.__old"
        shutil.rmtree(tmp, ignore_errors=True)
        ds.to_zarr(store, group=tmp.name, mode="w", encoding=_encoding(ds), consolidated=False)
        if (root / name).exists():
            os.replace(root / name, old)
        os.replace(tmp, root / name)
        _set_experiments(store)  # before the old group goes: recover() redoes it after a kill
        shutil.rmtree(old, ignore_errors=True)


def _set_experiments(store: str | os.PathLike) -> None:
    with _quiet_zarr():
        root = zarr.open_group(store, mode="a", use_consolidated=False)  # not the stale copy
        root.attrs["experiments"] = sorted(_group_names(root))
        zarr.consolidate_metadata(store)


def _group_names(root: zarr.Group) -> set[str]:
    """The root's experiment groups: child groups, less the writer's temporary ones (names
    with a dot, such as ``name.__new`` and ``name.__old`` of `_write_group`)."""
    return {str(k) for k in root.group_keys() if "." not in str(k)}


def experiment_names(store: Any) -> list[str]:
    """Names of the experiment groups of a cube (a path or any store zarr accepts).

    The groups named by the root attribute ``experiments``, in that order, then any
    other child group of the root in alphabetical order (the attribute can lag behind
    the groups, e.g. when a writer read stale consolidated metadata), leaving out the
    writer's temporary groups. The listing reads the store itself, not its consolidated
    metadata, which can be stale. Raises FileNotFoundError (zarr's GroupNotFoundError is
    one) where there is no Zarr group.
    """
    with _quiet_zarr():
        root = zarr.open_group(store, mode="r", use_consolidated=False)
    present = _group_names(root)
    named = [str(n) for n in root.attrs.get("experiments", []) if str(n) in present]
    return named + sorted(present - set(named))


def recover(store: str | os.PathLike) -> None:
    """Finish or undo a group swap interrupted by a kill (``_write_group``), and rewrite
    the consolidated metadata from the groups (a kill between a swap and its
    consolidation leaves the old shapes there, which readers that trust it cannot open)."""
    if not is_local(store):
        _recover_remote(store)
        return
    if not (_local_path(store) / "zarr.json").exists():
        return
    root = _local_path(store)
    for old in root.glob("*.__old"):
        name = old.name.removesuffix(".__old")
        if (root / name).exists():
            shutil.rmtree(old)
        else:
            os.replace(old, root / name)
    for tmp in root.glob("*.__new"):
        shutil.rmtree(tmp)
    _set_experiments(store)


def _recover_remote(store: str | os.PathLike) -> None:
    """``recover`` for a remote store: a complete staged group is copied over its group
    (whose overwrite a kill may have cut short), an incomplete one is dropped."""
    with _quiet_zarr():
        try:
            root = zarr.open_group(store, mode="a", use_consolidated=False)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return
        for key in [k for k in root.group_keys() if k.endswith(".__new")]:
            if not root[key].attrs.get(SWAP_READY):
                del root[key]
                _set_experiments(store)
                continue
            ds = xr.open_zarr(store, group=key, consolidated=False, chunks=None).load()
            ds.attrs.pop(SWAP_READY)
            for var in ds.variables.values():
                var.encoding = {}
            _write_group(ds, store, key.removesuffix(".__new"))  # the swap, again


def open_experiment(store: str | os.PathLike, name: str) -> xr.Dataset | None:
    """The experiment's group as a lazily read Dataset, or None if the store lacks it. Not
    dask-backed: it is read in this process, also while a launch's Dask client is the
    default scheduler (whose workers may not see the store, and are busy training)."""
    with _quiet_zarr():
        try:
            root = zarr.open_group(store, mode="r", use_consolidated=False)  # the truth
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            return None
        if name not in root.group_keys():
            return None
        return xr.open_zarr(store, group=name, consolidated=False, chunks=None)


def ensure_experiment(
    store: str | os.PathLike,
    name: str,
    grid: dict[str, Sequence],
    layers: Sequence[str],
    dt_per_T: float,
    attrs: dict,
) -> None:
    """Create the group, or grow it to the union of its grid and ``grid``; values of
    cells already there are kept. Settings that differ from the stored ones are refused
    (a different experiment needs a different name)."""
    old = open_experiment(store, name)
    if old is None:
        _write_group(
            empty_experiment(**grid, layers=layers, dt_per_T=dt_per_T, attrs=attrs), store, name
        )
        return
    _check_settings(old, store, name, attrs)
    union = {d: np.union1d(old[d].values, np.asarray(grid[d])) for d in DIMS}
    if all(len(union[d]) == old.sizes[d] for d in DIMS):
        return
    new = empty_experiment(**union, layers=layers, dt_per_T=dt_per_T, attrs=dict(old.attrs))
    loaded = old.load()
    sel = {d: loaded[d].values for d in DIMS}
    for var in loaded.data_vars:
        new[var].loc[sel] = loaded[var].values
    _write_group(new, store, name)


def check_settings(store: str | os.PathLike, name: str, attrs: dict) -> None:
    """Raise SpecError when the group ``name`` of ``store`` exists with settings (its
    attributes other than PROVENANCE) that differ from ``attrs``."""
    old = open_experiment(store, name)
    if old is not None:
        _check_settings(old, store, name, attrs)


def _check_settings(old: xr.Dataset, store: str | os.PathLike, name: str, attrs: dict) -> None:
    fixed = {k: v for k, v in attrs.items() if k not in PROVENANCE}
    stored = {k: old.attrs.get(k, SETTING_DEFAULTS.get(k)) for k in fixed}
    if stored != fixed:
        diff = {k: (stored[k], fixed[k]) for k in fixed if stored[k] != fixed[k]}
        raise SpecError(
            f"experiment {name!r} in {store} was run with other settings (stored, new): {diff};"
            " give the changed experiment another name or use another store"
        )


PROVENANCE = (
    "package_version",
    "git_commit",
    "torch_version",
    "device",
    "created",
    "sweep",
    LAUNCHES_ATTR,
)
"""Attributes that record where results came from, not what was computed."""


def append_launch(store: str | os.PathLike, name: str, record: dict) -> None:
    """Append ``record`` (JSON-able, see ``ensemble.schema.LAUNCHES_ATTR``) to the
    group's launch records, then refresh the store's consolidated metadata."""
    _edit_launches(store, name, lambda records: [*records, _json_record(name, record)])


def replace_launch(
    store: str | os.PathLike, name: str, launch_id: str, record: dict | None
) -> None:
    """Replace the group's launch record with id ``launch_id`` by ``record`` (None: remove
    it), then refresh the store's consolidated metadata."""
    new = None if record is None else _json_record(name, record)

    def edit(records: list[dict]) -> list[dict]:
        out = [new if r.get("id") == launch_id else r for r in records]
        return [r for r in out if r is not None]

    _edit_launches(store, name, edit)


def _json_record(name: str, record: dict) -> dict:
    try:
        return json.loads(json.dumps(record, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"launch record of {name!r} is not JSON-able: {record!r}") from exc


def _edit_launches(
    store: str | os.PathLike, name: str, edit: Callable[[list[dict]], list[dict]]
) -> None:
    with _quiet_zarr():
        group = zarr.open_group(store, mode="r+", path=name, use_consolidated=False)
        group.attrs[LAUNCHES_ATTR] = edit(list(group.attrs.get(LAUNCHES_ATTR, [])))
        zarr.consolidate_metadata(store)


def launches(store: str | os.PathLike, name: str) -> list[dict]:
    """The group's launch records, oldest first ([] when none were recorded)."""
    with _quiet_zarr():
        group = zarr.open_group(store, mode="r", path=name, use_consolidated=False)
        return list(group.attrs.get(LAUNCHES_ATTR, []))


class CubeWriter:
    """Writes member results into one experiment's group; ``done`` last."""

    def __init__(self, store: str | os.PathLike, name: str):
        with _quiet_zarr():
            self.group = zarr.open_group(store, mode="r+", path=name)
        self.index = {d: {v: i for i, v in enumerate(self.group[d][:].tolist())} for d in DIMS}
        self.layers = [str(x) for x in self.group[LAYER_DIM][:]]
        self.perceptron = "w_par" in self.group.array_keys()
        self.ntk = "ntk_change" in self.group.array_keys()

    def cell_index(self, alpha: float, T: float, P: int, seed: int) -> tuple[int, ...]:
        return (
            self.index["alpha"][alpha],
            self.index["T"][T],
            self.index["P"][P],
            self.index["seed"][seed],
        )

    def write(
        self, cells: Sequence[tuple[float, float, int, int]], results: Sequence[dict]
    ) -> None:
        """Write ``results`` (``MemberResult`` as dicts) of ``cells`` (alpha, T, P, seed),
        then mark the cells done."""
        if not cells:
            return
        idx = np.array([self.cell_index(*c) for c in cells]).T  # (4, n)
        cols = {name: np.array([r[name] for r in results], dtype=np.float64) for name in CELL_VARS}
        if self.perceptron:
            for name in PERCEPTRON_VARS:
                cols[name] = np.array([r["perceptron"][name] for r in results])
        if self.ntk:
            cols["ntk_change"] = np.array([r["ntk_change"] for r in results], dtype=np.float64)
        with _quiet_zarr():
            for name, values in cols.items():
                self.group[name].vindex[tuple(idx)] = values
            for name, key in (("dw2_layer", "dw2_layer"), ("w0_2_layer", "w0_2_layer")):
                vals = np.array([[r[key][layer] for layer in self.layers] for r in results])
                self._write_trailing(name, idx, vals)
            for name in CHECKPOINT_VARS:
                self._write_trailing(
                    name, idx, np.array([r[name] for r in results], dtype=np.float64)
                )
            self.group["outcome"].vindex[tuple(idx)] = np.array(
                [r["outcome"] for r in results], dtype=np.int8
            )
            self.group["done"].vindex[tuple(idx)] = True

    def _write_trailing(self, name: str, idx: np.ndarray, vals: np.ndarray) -> None:
        n, m = vals.shape
        full = tuple(np.repeat(i, m) for i in idx) + (np.tile(np.arange(m), n),)
        self.group[name].vindex[full] = vals.reshape(-1)


def done_cells(store: str | os.PathLike, name: str) -> set[tuple[float, float, int, int]]:
    """(alpha, T, P, seed) of the cells already computed and written."""
    ds = open_experiment(store, name)
    if ds is None:
        return set()
    done = ds["done"].values
    coords = [ds[d].values.tolist() for d in DIMS]
    return {tuple(coords[k][i[k]] for k in range(4)) for i in zip(*np.nonzero(done), strict=True)}
