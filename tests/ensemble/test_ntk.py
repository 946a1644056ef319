"""The empirical NTK and its change (``ensemble.ntk``), on real MNIST / CIFAR-10 points,
against a plain autograd computation, through the engine and into the cube."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from distributed import Client
from tiny_sweep import write_sweep

from ensemble import data as datasets
from ensemble.cells import Group, Member, SpecError
from ensemble.engine import Engine, member_streams, train_batch
from ensemble.launch import launch
from ensemble.models import build_model, init_params
from ensemble.ntk import empirical_ntk, jacobian_ntk, ntk_change
from ensemble.schema import CONVERGED

GROUPS = {
    "fc": dict(dataset="mnist", arch="fc", h=16, L=3, activation="gelu"),
    "mnas": dict(dataset="cifar10", arch="mnas", h=2),
    "perceptron": dict(dataset="perceptron", arch="perceptron", d=12),
}


def _points(group: Group, n: int) -> torch.Tensor:
    if group.arch == "perceptron":
        return torch.randn(n, group.d, generator=torch.Generator().manual_seed(0)).double()
    return datasets.load_pool(group.dataset, group.data_root).x[:n].double()


def _kernel_by_loops(model, params, x) -> torch.Tensor:
    """K_ab = dF(x_a)/dw . dF(x_b)/dw with one torch.autograd.grad per point."""
    w = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    rows = []
    for xi in x:
        out = model.forward(w, xi.unsqueeze(0))[0]
        grads = torch.autograd.grad(out, list(w.values()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    J = torch.stack(rows)
    return J @ J.T


@pytest.mark.parametrize("arch", list(GROUPS))
def test_kernel_equals_the_one_from_per_point_gradients(arch, data_root):
    g = Group(**GROUPS[arch], P=16, B=4, pte=64, dtype="float64", data_root=str(data_root))
    model = build_model(g)
    params = init_params(model, 3, torch.float64, torch.device("cpu"))
    x = _points(g, 10)
    K = empirical_ntk(model, params, x)
    assert K.shape == (10, 10) and K.dtype == torch.float64
    torch.testing.assert_close(K, _kernel_by_loops(model, params, x), rtol=1e-10, atol=1e-12)
    assert torch.allclose(K, K.T) and torch.linalg.eigvalsh(K).min() > -1e-9 * K.abs().max()
    assert ntk_change(model, params, params, x) == 0.0
    moved = {n: p * 1.1 for n, p in params.items()}
    change = ntk_change(model, moved, params, x)
    if arch == "perceptron":  # linear in w: the kernel is x x^T / d, whatever w is
        assert change == 0.0
    else:
        assert change > 0


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fc_kernel_by_layer_equals_the_jacobian_kernel(activation, dtype, rtol, data_root):
    """FC's own ``Model.ntk`` (factorised by layer) against J J^T from vmap(jacrev), on
    trained-looking weights (the init moved by noise of its own size), MNIST points."""
    g = Group(dataset="mnist", arch="fc", h=32, L=5, activation=activation, P=16, B=4, pte=64)
    model = build_model(g)
    w = init_params(model, 1, torch.float64, torch.device("cpu"))
    w = {
        n: (p + init_params(model, 2, torch.float64, torch.device("cpu"))[n]).to(dtype)
        for n, p in w.items()
    }
    x = datasets.load_pool("mnist", str(data_root)).x[:24].to(dtype)
    K = empirical_ntk(model, w, x)
    assert model.ntk is not None and K.dtype == torch.float64
    torch.testing.assert_close(K, jacobian_ntk(model, w, x), rtol=rtol, atol=0)


LAZY = Member(alpha=2.0**10, T=2.0**-6, seed=0)
FEATURE = Member(alpha=2.0**-2, T=2.0**-7, seed=2)


def test_the_kernel_barely_moves_in_the_lazy_regime_and_moves_in_the_feature_regime(small_fc):
    """The paper's two regimes, told apart by the kernel: at alpha = 2^10 the NTK of a
    network trained to zero loss on MNIST parity stays put (change < 1 %), at
    alpha = 2^-2 it changes by more than its own size. Each member of the ensemble
    measures what it measures trained alone."""
    g = dataclasses.replace(small_fc, ntk_points=32)
    lazy, feature = train_batch(g, [LAZY, FEATURE])
    assert lazy.outcome == feature.outcome == CONVERGED
    assert 0 < lazy.ntk_change < 1e-2
    assert feature.ntk_change > 1.0
    alone = train_batch(g, [FEATURE], slots=1)[0]
    assert alone.ntk_change == pytest.approx(feature.ntk_change, rel=1e-9)
    assert np.isnan(train_batch(small_fc, [LAZY])[0].ntk_change)


def test_members_of_a_seed_share_one_initial_kernel(small_fc):
    """K0 depends only on a member's seed (its w0): an engine computes it once per seed,
    and each member's change is still the one it measures trained alone."""
    g = dataclasses.replace(small_fc, ntk_points=16)
    members = [LAZY, dataclasses.replace(FEATURE, seed=LAZY.seed), FEATURE]
    engine = Engine(g, len(members), "cpu")
    res = engine.run(members)
    assert sorted(engine.ntk0) == sorted({m.seed for m in members})
    for m, r in zip(members, res, strict=True):
        alone = train_batch(g, [m], slots=1)[0]
        assert r.ntk_change == pytest.approx(alone.ntk_change, rel=1e-9)
        w0 = init_params(
            engine.model, member_streams(m.seed)[0], torch.float64, torch.device("cpu")
        )
        x = engine.data.x_test[: g.ntk_points]
        assert torch.equal(engine.ntk0[m.seed], empirical_ntk(engine.model, w0, x))


@pytest.mark.parametrize(("value", "message"), [(-1, "integer >= 0"), (257, "from 0 to pte = 256")])
def test_ntk_points_outside_0_to_pte_refused(small_fc, value, message):
    with pytest.raises(SpecError, match=f"ntk_points must be an? ?.*{message}"):
        dataclasses.replace(small_fc, ntk_points=value)


def test_a_sweep_with_ntk_points_stores_the_change_and_old_cubes_keep_working(
    tmp_path, data_root, monkeypatch
):
    """A sweep that sets ntk_points gets an ``ntk_change`` variable; a cube written
    without the setting (before it existed) holds ntk_points = 0, so the same sweep
    resumes there and a sweep that asks for the kernel is refused, naming the field."""
    monkeypatch.setenv("ENSEMBLE_DATA", str(data_root))
    spec = write_sweep(tmp_path / "tiny.toml", seeds=1)
    text = spec.read_text().replace("max_steps = 3000", "max_steps = 3000\nntk_points = 16")
    with_ntk = tmp_path / "ntk.toml"
    with_ntk.write_text(text)
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as c:
        launch(with_ntk, tmp_path / "n.zarr", client=c, progress=False)
        ds = xr.open_zarr(tmp_path / "n.zarr", group="tiny_fc")
        assert ds.attrs["ntk_points"] == 16
        change = ds["ntk_change"].values[ds["done"].values]
        assert change.size == 4 and np.isfinite(change).all() and (change > 0).all()

        old = tmp_path / "old.zarr"
        launch(spec, old, client=c, progress=False)
        group = zarr.open_group(old, mode="r+", path="tiny_fc")
        del group.attrs["ntk_points"]  # as a cube written before the setting existed
        with warnings.catch_warnings():  # zarr: consolidated metadata is not in Zarr 3
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(old)
        assert "ntk_change" not in xr.open_zarr(old, group="tiny_fc")
        grown = write_sweep(tmp_path / "grown.toml", seeds=2)
        report = launch(grown, old, client=c, progress=False).attrs["launch_report"]
        assert report["cells_done"] == 4
        with pytest.raises(SpecError, match=r"other settings .*'ntk_points': \(0, 16\)"):
            launch(with_ntk, old, client=c, progress=False)
