"""The engine on the real MNIST / CIFAR-10 files and on perceptron data.

The oracle is the member trained alone: an ensemble member must reproduce it.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble import data as datasets
from ensemble import engine as engine_module
from ensemble.cells import Group, Member, SpecError
from ensemble.engine import Engine, draw_batch, member_streams, train_batch
from ensemble.models import build_model, init_params
from ensemble.schema import CONVERGED, DIVERGED, N_CKPT_TEST, UNFINISHED, checkpoint_steps


def _perceptron_group(
    chi: float, P: int, dtype: str, d: int = 8, max_steps: int = 400_000
) -> Group:
    """Perceptron data, B = 2, pte = 200."""
    return Group(
        dataset="perceptron",
        arch="perceptron",
        P=P,
        B=2,
        pte=200,
        d=d,
        chi=chi,
        max_steps=max_steps,
        dtype=dtype,
    )


DEVICE = os.environ.get("ENSEMBLE_TEST_DEVICE", "cpu")
"""Set ENSEMBLE_TEST_DEVICE=cuda to run these tests on a GPU."""

MEMBERS = [
    Member(alpha=2.0**10, T=2.0**-6, seed=0),
    Member(alpha=1.0, T=2.0**-4, seed=1),
    Member(alpha=2.0**-2, T=2.0**-7, seed=2),
    Member(alpha=2.0**10, T=2.0**-3, seed=3),
]


def _assert_same(a, b, rtol=1e-9):
    assert a.outcome == b.outcome
    assert a.steps == b.steps
    assert a.t_star == pytest.approx(b.t_star, rel=rtol, nan_ok=True)
    assert a.test_error == pytest.approx(b.test_error, abs=1e-12, nan_ok=True)
    assert a.n_unfitted == b.n_unfitted
    for name in a.weights:
        np.testing.assert_allclose(a.weights[name], b.weights[name], rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(a.ckpt_test_error, b.ckpt_test_error, atol=1e-12)


def test_member_equals_member_trained_alone(small_fc):
    ens = train_batch(small_fc, MEMBERS, device=DEVICE, keep_weights=True)
    assert {r.outcome for r in ens} == {CONVERGED}
    for m, r in zip(MEMBERS, ens, strict=True):
        alone = train_batch(small_fc, [m], device=DEVICE, keep_weights=True)[0]
        _assert_same(r, alone)


def test_continuous_batching_gives_same_results(small_fc):
    """Two slots for four members: slots are refilled, results are unchanged."""
    full = train_batch(small_fc, MEMBERS, device=DEVICE, keep_weights=True)
    engine = Engine(small_fc, slots=2, device=DEVICE, keep_weights=True)
    refilled = engine.run(MEMBERS)
    for a, b in zip(full, refilled, strict=True):
        _assert_same(a, b)
    s = engine.stats
    assert 0 < s.occupancy <= 1
    # every member converged through a stopping check; checks and checkpoints are timed
    assert s.checks >= len(MEMBERS)
    assert 0 < s.check_seconds and 0 < s.checkpoint_seconds
    assert s.check_seconds + s.checkpoint_seconds < s.seconds


@pytest.mark.parametrize("arch", ["fc", "perceptron"])
def test_shrinking_the_tail_changes_nothing_but_the_cost(arch, small_fc):
    """Once no member is left to refill a slot, the engine drops its idle slots: every
    member's trajectory stays the same (refills and checkpoints included; bit for bit
    for the perceptron with quiet-step skipping on the CPU, up to float64 rounding of the
    batched matrix products for FC), and fewer slot-steps are spent. On CUDA the
    perceptron matches to float32 rounding: cuBLAS picks its kernels by the batch size
    (seen on an H200: one weight of 8 one ulp apart)."""
    if arch == "fc":
        g, members = small_fc, [*MEMBERS, Member(alpha=2.0**10, T=2.0**-8, seed=5)]
    else:
        g = _perceptron_group(0.0, 128, "float32")
        members = [Member(alpha=2.0**15, T=2.0**-4, seed=s) for s in range(6)]
    fixed = Engine(g, 4, DEVICE, keep_weights=True, shrink=False)
    shrinking = Engine(g, 4, DEVICE, keep_weights=True)
    for a, b in zip(fixed.run(members), shrinking.run(members), strict=True):
        assert a.outcome == CONVERGED
        if arch == "fc":
            _assert_same(a, b)
        elif DEVICE == "cpu":
            _assert_bitwise(a, b)
        else:
            _assert_same(a, b, rtol=1e-6)
    assert fixed.K == 4 and shrinking.K < 4
    assert shrinking.stats.slot_steps < fixed.stats.slot_steps
    assert shrinking.stats.busy_steps == fixed.stats.busy_steps
    assert shrinking.stats.occupancy > fixed.stats.occupancy


def test_test_errors_are_those_of_the_final_weights(small_fc):
    """The test error (all pte points) and the checkpoints frozen after t* (the first
    N_CKPT_TEST points) equal y f <= 0 recomputed from each member's own w and w0, with
    slots refilled and the tail shrunk (the cached F(w0, x_test) follows its member)."""
    g = Group(**{**small_fc.as_dict(), "pte": N_CKPT_TEST + 256, "data_root": small_fc.data_root})
    members = MEMBERS + [Member(alpha=2.0**3, T=2.0**-5, seed=4)]
    res = Engine(g, 2, DEVICE, keep_weights=True).run(members)
    pool = datasets.load_pool("mnist", g.data_root)
    test = torch.from_numpy(datasets.test_indices("mnist", g.pte))
    x, y = pool.x[test].double(), pool.y[test].double()
    converged = 0
    for m, r in zip(members, res, strict=True):
        w0 = init_params(
            build_model(g), member_streams(m.seed)[0], torch.float64, torch.device("cpu")
        )
        w = {n: torch.from_numpy(v) for n, v in r.weights.items()}
        wrong = (y * (_reference_fc(w, x, g.L, g.h) - _reference_fc(w0, x, g.L, g.h)) <= 0).double()
        assert r.test_error == pytest.approx(wrong.mean().item(), abs=1e-12)
        if r.outcome == CONVERGED:
            converged += 1
            after = np.array(checkpoint_steps()) >= r.steps
            sub = wrong[:N_CKPT_TEST].mean().item()
            np.testing.assert_allclose(np.array(r.ckpt_test_error)[after], sub, atol=1e-12)
    assert converged >= 3


@pytest.mark.parametrize("arch", ["fc", "perceptron"])
def test_select_keeps_every_per_slot_tensor(arch, small_fc):
    """Engine._select moves the tensors named in Engine.SLOT_STATE (and the weights and
    training data); a per-slot tensor left out of SLOT_STATE would keep stale rows after
    a shrink, so every tensor attribute with one row per slot must be named there."""
    g = small_fc if arch == "fc" else _perceptron_group(0.0, 128, "float32")
    K = 7
    e = Engine(g, K, DEVICE)
    e._fill(range(K), [Member(alpha=2.0**10, T=2.0**-8, seed=s) for s in range(K)])
    rows = lambda: {  # noqa: E731
        n for n, v in vars(e).items() if isinstance(v, torch.Tensor) and v.dim() and len(v) == e.K
    }
    assert rows() == set(Engine.SLOT_STATE)
    before = {n: getattr(e, n).clone() for n in Engine.SLOT_STATE}
    w = {n: p.clone() for n, p in e.params.items()}
    y = e.data.y.clone()
    e._select([5, 2])
    assert e.K == 2 and rows() == set(Engine.SLOT_STATE)
    for n, v in before.items():
        assert torch.equal(getattr(e, n), v[[5, 2]]), n
    for n, p in w.items():
        assert torch.equal(e.params[n], p[[5, 2]]) and torch.equal(e.params0[n], p[[5, 2]])
    assert torch.equal(e.data.y, y[[5, 2]])


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_fused_fc_step_follows_the_generic_step(activation, small_fc):
    """The FC step written out by hand (default for FC) against vmap(grad) of the model:
    same outcomes and steps, weights and test errors to float64 rounding, with refills
    and 3 hidden layers."""
    g = Group(**{**small_fc.as_dict(), "L": 3, "activation": activation})
    generic = Engine(g, 3, DEVICE, keep_weights=True, fused=False).run(MEMBERS)
    fast_engine = Engine(g, 3, DEVICE, keep_weights=True)
    assert fast_engine.fused
    for a, b in zip(generic, fast_engine.run(MEMBERS), strict=True):
        assert a.outcome == CONVERGED
        _assert_same(a, b, rtol=1e-8)
    with pytest.raises(ValueError, match="written for arch 'fc'"):
        Engine(_perceptron_group(1.0, 16, "float64"), 1, DEVICE, fused=True)


def test_fused_fc_step_leaves_a_diverging_member_alone(small_fc):
    """float32, FC-5L: a member that diverges stops at the same step in both steps, and
    its non-finite activations do not reach its batch-mates' weights."""
    g = Group(**{**small_fc.as_dict(), "L": 5, "dtype": "float32"})
    members = [MEMBERS[0], Member(alpha=1.0, T=2.0**4, seed=7), MEMBERS[1]]
    generic = Engine(g, 3, DEVICE, keep_weights=True, fused=False).run(members)
    fast = Engine(g, 3, DEVICE, keep_weights=True).run(members)
    assert generic[1].outcome == fast[1].outcome == DIVERGED
    assert generic[1].steps == fast[1].steps
    for a, b in zip(generic[::2], fast[::2], strict=True):
        assert a.outcome == b.outcome == CONVERGED
        assert abs(a.steps - b.steps) <= max(2, 0.01 * a.steps)
        assert all(np.isfinite(w).all() for w in b.weights.values())


@pytest.mark.parametrize("arch", ["fc", "perceptron"])
def test_filling_many_slots_at_once_equals_one_at_a_time(arch, small_fc, monkeypatch):
    """The batched, threaded fill (in chunks of FILL_CHUNK) puts exactly what filling one
    slot at a time puts: weights, training sets, per-slot settings."""
    monkeypatch.setattr(engine_module, "FILL_CHUNK", 3)
    g = small_fc if arch == "fc" else _perceptron_group(1.0, 32, "float32")
    members = [Member(alpha=2.0 ** (s % 4), T=2.0 ** -(s % 3 + 4), seed=s) for s in range(7)]
    slots = [6, 0, 3, 1, 5, 2, 4]
    together = Engine(g, 7, DEVICE)
    together._fill(slots, members)
    apart = Engine(g, 7, DEVICE)
    for k, m in zip(slots, members, strict=True):
        apart._fill([k], [m])
    for name in ("alpha", "dt", "key", "step", "last_active", "status"):
        assert torch.equal(getattr(together, name), getattr(apart, name)), name
    for params in ("params", "params0"):
        for n, p in getattr(together, params).items():
            assert torch.equal(p, getattr(apart, params)[n]), n
    for name in ("src", "rows", "y"):
        assert torch.equal(getattr(together.data, name), getattr(apart.data, name)), name


def test_slots_filled_while_training_give_the_same_results(small_fc, monkeypatch):
    """With draws of one member at a time, the run starts stepping after the first and
    loads the others into their slots as their host draws finish (``_Feeder``): every
    member's trajectory is the one it has when all slots are filled before the first step."""
    members = [*MEMBERS, Member(alpha=2.0**10, T=2.0**-8, seed=5)]
    at_once = Engine(small_fc, 5, DEVICE, keep_weights=True, shrink=False).run(members)
    monkeypatch.setattr(engine_module, "FILL_CHUNK", 1)
    engine = Engine(small_fc, 5, DEVICE, keep_weights=True, shrink=False)
    for a, b in zip(at_once, engine.run(members), strict=True):
        _assert_same(a, b)
    assert engine.stats.busy_steps == sum(r.steps for r in at_once)


def test_feeder_hands_out_drawn_members_in_order_and_waits_only_when_asked():
    from ensemble.engine import _Feeder

    gate = threading.Event()
    calls: list[list[int]] = []

    def draw(ms):
        gate.wait(30)
        calls.append([m.seed for m in ms])
        return [f"drawn {m.seed}" for m in ms]

    members = [Member(alpha=1.0, T=0.1, seed=s) for s in range(5)]
    with _Feeder(members, draw, chunk=2) as feeder:
        assert len(feeder) == 5
        assert feeder.take(3, wait=False) == []  # the first chunk is still being drawn
        gate.set()
        got = feeder.take(3, wait=True)  # only the first chunk's two are ready
        assert [(i, m, d) for i, m, d in got] == [(i, members[i], f"drawn {i}") for i in (0, 1)]
        assert len(feeder) == 3
        assert [i for i, _, _ in feeder.take(1, wait=True)] == [2]
        assert [i for i, _, _ in feeder.take(9, wait=True)] == [3]
        assert [i for i, _, _ in feeder.take(9, wait=True)] == [4]
        assert not feeder and feeder.take(9, wait=True) == []
    assert calls == [[0, 1], [2, 3], [4]]

    def broken(ms):
        raise datasets.DataError("mnist: checksum mismatch")

    with (
        _Feeder(members, broken, chunk=2) as feeder,
        pytest.raises(datasets.DataError, match="checksum"),
    ):
        feeder.take(2, wait=True)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 12),
    chunk=st.integers(1, 5),
    takes=st.lists(st.tuples(st.integers(0, 6), st.booleans()), max_size=12),
)
def test_feeder_hands_out_every_member_once_in_order(n, chunk, takes):
    """For any chunk size and any sequence of takes: members come out in input order,
    each once, at most as many as asked; a waiting take of at least one gets at least
    one while any is left; ``len`` counts those not yet taken."""
    from ensemble.engine import _Feeder

    members = [Member(alpha=1.0, T=0.1, seed=s) for s in range(n)]
    out: list[int] = []

    def take(feeder: _Feeder, k: int, wait: bool) -> None:
        left = len(feeder)
        got = feeder.take(k, wait)
        assert len(got) <= k and len(feeder) == left - len(got)
        if wait and k and left:
            assert got
        assert all(d == members[i].seed and m is members[i] for i, m, d in got)
        out.extend(i for i, _, _ in got)

    with _Feeder(members, lambda ms: [m.seed for m in ms], chunk) as feeder:
        for k, wait in takes:
            take(feeder, k, wait)
        while feeder:  # each waiting take gets at least one, so this ends
            take(feeder, n, True)
    assert out == list(range(n))


def test_float32_member_matches_alone(small_fc):
    g = Group(**{**small_fc.as_dict(), "dtype": "float32", "data_root": small_fc.data_root})
    ens = train_batch(g, MEMBERS[:2], device=DEVICE, keep_weights=True)
    for m, r in zip(MEMBERS[:2], ens, strict=True):
        alone = train_batch(g, [m], device=DEVICE, keep_weights=True)[0]
        assert r.outcome == alone.outcome == CONVERGED
        assert abs(r.steps - alone.steps) <= max(2, 0.01 * alone.steps)
        assert r.test_error == pytest.approx(alone.test_error, abs=0.02)


def _reference_fc(params: dict, x: torch.Tensor, L: int, h: int) -> torch.Tensor:
    """FC-L written out independently in float64: sqrt(2) relu, 1/sqrt(fan_in), 1/h."""
    z = x.reshape(x.shape[0], -1).double()
    for layer in range(L):
        W = params[f"W{layer}"].double()
        z = math.sqrt(2.0) * torch.clamp(z @ W.T / math.sqrt(W.shape[1]), min=0)
    return z @ params["w_out"].double() / h


def test_zero_prediction_at_init_and_first_step_matches_reference(small_fc):
    g = Group(**{**small_fc.as_dict(), "max_steps": 1, "data_root": small_fc.data_root})
    m = Member(alpha=8.0, T=0.01, seed=5)
    engine = Engine(g, slots=1, device=DEVICE, keep_weights=True)
    r = engine.run([m])[0]
    # init: reproduce w0 and the training set independently
    init_seed, key = member_streams(m.seed)
    w0 = init_params(build_model(g), init_seed, torch.float64, torch.device("cpu"))
    pool = datasets.load_pool("mnist", g.data_root)
    train = torch.from_numpy(datasets.train_indices("mnist", g.P, g.pte, m.seed))
    x, y = pool.x[train].double(), pool.y[train].double()
    # the centred prediction is exactly zero at init, so every hinge is 1 and loss 1/alpha
    f_init = _reference_fc(w0, x, g.L, g.h) - _reference_fc(w0, x, g.L, g.h)
    assert torch.all(f_init == 0)
    # one SGD step on the batch drawn at step 0
    local = draw_batch(torch.tensor([key]), torch.tensor([0]), g.P, g.B)[0]
    w = {n: p.clone().requires_grad_(True) for n, p in w0.items()}
    f = _reference_fc(w, x[local], g.L, g.h) - _reference_fc(w0, x[local], g.L, g.h)
    loss = torch.clamp(1 - m.alpha * f * y[local], min=0).mean() / m.alpha
    assert loss.item() == pytest.approx(1 / m.alpha, rel=1e-12)
    loss.backward()
    dt = m.T * g.h * g.B
    assert r.outcome == UNFINISHED and r.steps == 1
    for n in w0:
        expected = (w0[n] - dt * w[n].grad).numpy()
        np.testing.assert_allclose(r.weights[n], expected, rtol=1e-10, atol=1e-12)
    assert r.dw2 == pytest.approx(sum(float((dt * w[n].grad).pow(2).sum()) for n in w0), rel=1e-9)


def test_fc_ensemble_fits_mnist_parity(data_root):
    g = Group(
        dataset="mnist",
        arch="fc",
        P=256,
        B=16,
        pte=2048,
        h=64,
        L=3,
        max_steps=20000,
        data_root=str(data_root),
    )
    members = [Member(alpha=2.0**12, T=T, seed=s) for T in (2.0**-8, 2.0**-5) for s in (0, 1)]
    members.append(Member(alpha=1.0, T=2.0**-6, seed=0))
    res = train_batch(g, members, device=DEVICE)
    for r in res:
        assert r.outcome == CONVERGED
        assert r.train_loss == 0 and r.n_unfitted == 0
        assert r.t_star == pytest.approx(g.dt(r.member.T) * r.steps)
    lazy = [r.test_error for r in res if r.member.alpha > 1]
    assert max(lazy) < 0.25, lazy
    # lazy members barely move their weights; the feature member moves them much more
    assert max(r.rel_change for r in res[:4]) < res[4].rel_change


def test_diverging_member_does_not_disturb_batch_mates(small_fc):
    """science.md: FC-5L diverges (NaN within ~20 steps) at dt >= 1024. The hinge's
    gradient is bounded, so it takes depth (output ~ w^(L+1)) and float32 to overflow."""
    g = Group(**{**small_fc.as_dict(), "L": 5, "dtype": "float32", "data_root": small_fc.data_root})
    bad = Member(alpha=1.0, T=2.0**4, seed=7)  # dt = 2^4 * 32 * 8 = 4096
    members = [MEMBERS[0], bad, MEMBERS[1]]
    res = train_batch(g, members, device=DEVICE, keep_weights=True)
    assert res[1].outcome == DIVERGED and res[1].steps < 20
    assert math.isnan(res[1].t_star) and math.isnan(res[1].test_error)
    assert res[0].outcome == res[2].outcome == CONVERGED
    alone = train_batch(g, [MEMBERS[0], MEMBERS[1]], device=DEVICE, keep_weights=True)
    for a, b in ((res[0], alone[0]), (res[2], alone[1])):
        assert a.steps == b.steps and a.test_error == b.test_error
        for n in a.weights:
            np.testing.assert_allclose(a.weights[n], b.weights[n], rtol=1e-5, atol=1e-6)


def test_budget_gives_unfinished(small_fc):
    g = Group(**{**small_fc.as_dict(), "max_steps": 20, "data_root": small_fc.data_root})
    (r,) = train_batch(g, [MEMBERS[2]], device=DEVICE)
    assert r.outcome == UNFINISHED and r.steps == 20 and math.isnan(r.t_star)
    assert r.train_loss > 0 and r.n_unfitted > 0


def test_time_budget_stops_the_running_members_and_starts_no_more(small_fc):
    """Once ``max_seconds`` is spent, the member in the only slot stops unfinished after
    the steps it made, and the two still waiting never start: their results are None
    (missing cells, which a later run trains), not unfinished at step 0."""
    g = Group(**{**small_fc.as_dict(), "max_steps": 10**9, "max_seconds": 1.0})
    members = [Member(alpha=1.0, T=2.0**-18, seed=s) for s in range(3)]
    engine = Engine(g, 1, DEVICE)
    first, *rest = engine.run(members)
    assert first.outcome == UNFINISHED and first.steps > 0
    assert rest == [None, None] and engine.stats.not_started == 2


def test_checkpoint_times_are_exact_in_float32():
    """t at a checkpoint is dt * steps in double precision, as t*, also when the engine
    steps in float32 and dt = T B is not a float32 number (T = 0.3)."""
    g = _perceptron_group(0.0, 64, "float32", max_steps=300)
    (r,) = train_batch(g, [Member(alpha=1.0, T=0.3, seed=0)], device=DEVICE)
    steps = np.array([16 * 4**k for k in range(3)])
    assert r.ckpt_t[:3] == (g.dt(0.3) * steps).tolist()


def test_checkpoints_are_log_spaced_and_frozen_after_t_star(small_fc):
    (r,) = train_batch(small_fc, [MEMBERS[0]], device=DEVICE)
    steps = np.array([16 * 4**k for k in range(len(r.ckpt_t))])
    dt = small_fc.dt(MEMBERS[0].T)
    assert r.outcome == CONVERGED
    evaluated = steps <= small_fc.max_steps
    np.testing.assert_allclose(np.array(r.ckpt_t)[evaluated], dt * steps[evaluated])
    after = steps >= r.steps
    assert np.all(np.array(r.ckpt_train_loss)[after] == 0)
    before = steps < r.steps
    assert np.all(np.array(r.ckpt_train_loss)[before] > 0)


def test_perceptron_observables():
    g = Group(
        dataset="perceptron",
        arch="perceptron",
        P=128,
        B=2,
        pte=1000,
        d=16,
        chi=1.0,
        max_steps=200_000,
        dtype="float64",
    )
    members = [Member(alpha=2.0**15, T=T, seed=s) for T in (0.01, 0.1) for s in (0, 1)]
    res = train_batch(g, members, device=DEVICE, keep_weights=True)
    for r in res:
        assert r.outcome == CONVERGED
        w = r.weights["w"]
        assert r.perceptron["w_par"] == pytest.approx(w[0])
        assert r.perceptron["noise"] == pytest.approx((w[1:] ** 2).sum() / 15)
        assert math.isnan(r.perceptron["x1_unfitted"])  # every point fitted
        assert r.test_error < 0.5


def test_perceptron_member_equals_alone():
    g = _perceptron_group(0.0, 64, "float64", max_steps=100_000)
    members = [Member(alpha=2.0**15, T=0.05, seed=s) for s in range(3)]
    ens = train_batch(g, members, device=DEVICE, keep_weights=True)
    for m, r in zip(members, ens, strict=True):
        _assert_same(r, train_batch(g, [m], device=DEVICE, keep_weights=True)[0])


@settings(max_examples=40, deadline=None)
@given(
    P=st.integers(1, 300),
    data=st.data(),
    keys=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=5),
    step=st.integers(0, 2**40),
)
def test_draw_batch_distinct_in_range_and_pure(P, data, keys, step):
    B = data.draw(st.integers(1, P))
    key = torch.tensor(keys)
    steps = torch.full((len(keys),), step)
    out = draw_batch(key, steps, P, B)
    assert out.shape == (len(keys), B)
    assert int(out.min()) >= 0 and int(out.max()) < P
    for row in out:
        assert len(set(row.tolist())) == B
    # a member's draw does not depend on its batch-mates
    alone = draw_batch(key[-1:], steps[-1:], P, B)
    assert torch.equal(alone[0], out[-1])


def _floyd_in_sequence(t: list[int], P: int) -> list[int]:
    """Floyd's algorithm on the uniforms t, one i after the other (the oracle)."""
    B, chosen = len(t), []
    for i, ti in enumerate(t):
        chosen.append(P - B + i if ti in chosen else ti)
    return chosen


def _assert_floyd(rows: list[list[int]], P: int) -> None:
    j = P - len(rows[0]) + torch.arange(len(rows[0]))
    out = engine_module._floyd(torch.tensor(rows), j).tolist()
    assert out == [_floyd_in_sequence(t, P) for t in rows]


@settings(max_examples=80, deadline=None)
@given(P=st.integers(1, 300), data=st.data())
def test_floyds_choices_all_at_once_equal_them_in_sequence(P, data):
    """``engine._floyd`` (pointer doubling over the links t_i = j_k) against Floyd's
    algorithm in sequence, on uniforms t_i in [0, P - B + i] chosen adversarially (B
    close to P and small t make long chains of collisions), for B on both sides of the
    switch from comparisons to a sort (64), two members at once."""
    B = data.draw(st.integers(max(1, P - 8), P) | st.integers(1, P), label="B")

    def uniform(i: int):
        return st.integers(0, P - B + i) | st.integers(0, min(3, P - B + i))

    rows = [[data.draw(uniform(i)) for i in range(B)] for _ in range(2)]
    _assert_floyd(rows, P)


def test_floyds_choices_follow_a_chain_of_collisions_to_its_end():
    """B = P = 8, t = (0, 0, 1, .., 6): t_7 = 6 = j_6 is taken only because t_6, t_5, ..
    were, back to t_1 = t_0: a chain of 7 links, which needs all 3 doubling rounds."""
    _assert_floyd([[0, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7]], 8)


def test_draw_batch_is_uniform_and_independent_across_steps():
    P, B, n = 10, 3, 20000
    key = torch.full((n,), 12345)
    out = draw_batch(key, torch.arange(n), P, B)
    counts = np.bincount(out.flatten().numpy(), minlength=P)
    expected = n * B / P
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 30  # 9 dof: p ~ 4e-4
    # consecutive steps are not correlated: overlap of successive batches ~ B^2 / P
    overlap = (out[1:, :, None] == out[:-1, None, :]).any(-1).sum(-1).double().mean()
    assert float(overlap) == pytest.approx(B * B / P, rel=0.05)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(alpha=0.0, T=0.1, seed=0), "alpha"),
        (dict(alpha=-1.0, T=0.1, seed=0), "alpha"),
        (dict(alpha=1.0, T=0.0, seed=0), "T"),
        (dict(alpha=1.0, T=float("nan"), seed=0), "T"),
        (dict(alpha=float("nan"), T=0.1, seed=0), "alpha"),
        (dict(alpha=1.0, T=0.1, seed=-1), "seed"),
    ],
)
def test_bad_member_rejected(kwargs, field):
    with pytest.raises(SpecError, match=field):
        Member(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(B=65, P=64), "B"),
        (dict(arch="resnet"), "arch"),
        (dict(dataset="imagenet"), "dataset"),
        (dict(activation="tanh"), "activation"),
        (dict(P=69_000, pte=2000), "P \\+ pte"),
        (dict(dtype="float16"), "dtype"),
        (dict(h=0), "h"),
    ],
)
def test_bad_group_rejected(kwargs, field):
    base = dict(dataset="mnist", arch="fc", P=64, B=8)
    with pytest.raises(SpecError, match=field):
        Group(**{**base, **kwargs})


@pytest.mark.parametrize("arch", ["perceptron", "fc"])
def test_compiled_step_matches_plain_engine(arch, data_root):
    """The CPU fast path (torch.compile of the step) follows the plain engine's
    trajectories up to float rounding."""
    if arch == "perceptron":
        g = _perceptron_group(1.0, 64, "float64", max_steps=50_000)
    else:
        g = Group(
            dataset="mnist",
            arch="fc",
            P=64,
            B=8,
            pte=256,
            h=16,
            L=2,
            max_steps=3000,
            dtype="float64",
            data_root=str(data_root),
        )
    members = [Member(alpha=2.0**10, T=T, seed=s) for T in (2.0**-6, 2.0**-4) for s in (0, 1)]
    plain = Engine(g, 4, "cpu", keep_weights=True, skip_quiet=False).run(members)
    fast = Engine(g, 4, "cpu", keep_weights=True, compile=True).run(members)
    # another ensemble size in the same process (dynamic shapes) and slot refills
    refilled = Engine(g, 3, "cpu", keep_weights=True, compile=True).run(members)
    # eager first, compiled from the first chunk after 0 s
    late = Engine(g, 4, "cpu", keep_weights=True, compile_after=0.0)
    switched = late.run(members)
    assert late.compiled
    pairs = [*zip(plain, fast, strict=True), *zip(plain, refilled, strict=True)]
    for a, b in [*pairs, *zip(plain, switched, strict=True)]:
        assert a.outcome == b.outcome == CONVERGED
        assert abs(a.steps - b.steps) <= max(2, 0.01 * a.steps)
        assert a.test_error == pytest.approx(b.test_error, abs=0.02)
        for n in a.weights:
            np.testing.assert_allclose(a.weights[n], b.weights[n], rtol=1e-6, atol=1e-8)


def _assert_bitwise(a, b):
    assert (a.outcome, a.steps) == (b.outcome, b.steps)
    assert a.t_star == b.t_star or (math.isnan(a.t_star) and math.isnan(b.t_star))
    for n in a.weights:
        np.testing.assert_array_equal(a.weights[n], b.weights[n])
    # evaluations batch the slots due at the same time, so they may round differently
    np.testing.assert_allclose(a.ckpt_train_loss, b.ckpt_train_loss, rtol=1e-5)
    np.testing.assert_array_equal(a.ckpt_test_error, b.ckpt_test_error)
    assert a.test_error == b.test_error or math.isnan(a.test_error)


@pytest.mark.parametrize("chi,dtype", [(0.0, "float32"), (1.0, "float64"), (3.0, "float32")])
def test_skipping_quiet_steps_gives_the_plain_trajectory_bit_for_bit(chi, dtype):
    """The look-ahead only jumps over steps whose gradient is exactly zero, so every
    member's steps, t*, weights and checkpoints equal the plain engine's exactly,
    with continuous batching (3 slots for 6 members) too."""
    g = _perceptron_group(chi, 128, dtype)
    members = [Member(alpha=2.0**15, T=T, seed=s) for T in (2.0**-8, 2.0**-2) for s in range(3)]
    plain = Engine(g, 6, DEVICE, keep_weights=True, skip_quiet=False)
    skip = Engine(g, 3, DEVICE, keep_weights=True, skip_quiet=True)
    plain_results = plain.run(members)
    for a, b in zip(plain_results, skip.run(members), strict=True):
        assert a.outcome == CONVERGED
        _assert_bitwise(a, b)
    if chi == 0:  # the slowest case, where nearly every late step is a no-op
        assert skip.stats.slot_steps < plain.stats.slot_steps / 4
    # occupancy counts executed steps: the skipping slots were busy while members ran
    # (K shrinks in the tail, when no member is left to refill a slot)
    s = skip.stats
    assert s.real_steps * skip.K <= s.slot_steps <= s.real_steps * s.slots
    assert 0 < s.busy_steps <= s.slot_steps
    assert (
        plain.stats.busy_steps
        == plain.stats.member_steps
        == sum(r.steps for r in plain.run(members))
    )


def test_skipping_stops_exactly_at_the_step_budget():
    g = _perceptron_group(0.0, 512, "float32", max_steps=1000)
    members = [Member(alpha=2.0**15, T=2.0**-4, seed=s) for s in range(2)]
    plain = Engine(g, 2, DEVICE, keep_weights=True, skip_quiet=False).run(members)
    skip = Engine(g, 2, DEVICE, keep_weights=True, skip_quiet=True).run(members)
    for a, b in zip(plain, skip, strict=True):
        assert a.outcome == UNFINISHED and a.steps == 1000
        _assert_bitwise(a, b)


@pytest.mark.parametrize("max_steps", [4, 16])
def test_a_member_at_its_step_budget_does_not_diverge_while_skipping(data_root, max_steps):
    """Skip mode steps every slot until the last reaches its limit: a member whose first
    non-finite loss is at step 4 ends unfinished with a budget of 4 steps, as in the plain
    engine (it was marked diverged there), and diverged at step 4 with more."""
    g = Group(dataset="mnist", arch="fc", L=2, h=16, P=64, B=4, pte=64, max_steps=max_steps,
              data_root=str(data_root))  # fmt: skip
    members = [Member(alpha=1.0, T=2.0**12, seed=1), Member(alpha=1.0, T=2.0**-6, seed=0)]
    plain = Engine(g, 2, DEVICE, skip_quiet=False).run(members)
    skip = Engine(g, 2, DEVICE, skip_quiet=True).run(members)
    assert (plain[0].outcome, plain[0].steps) == (
        UNFINISHED if max_steps == 4 else DIVERGED,
        4,
    )
    for a, b in zip(plain, skip, strict=True):
        assert (a.outcome, a.steps) == (b.outcome, b.steps)


def test_skipping_works_for_deep_networks(small_fc):
    """Skipping is on by default only for the perceptron, but it is exact for any model:
    FC members (one of them diverging) follow the plain engine bit for bit."""
    g = Group(**{**small_fc.as_dict(), "L": 5, "dtype": "float32", "data_root": small_fc.data_root})
    members = [MEMBERS[0], Member(alpha=1.0, T=2.0**4, seed=7), MEMBERS[1], MEMBERS[3]]
    plain = Engine(g, 4, DEVICE, keep_weights=True).run(members)
    skip = Engine(g, 4, DEVICE, keep_weights=True, skip_quiet=True).run(members)
    assert plain[1].outcome == DIVERGED
    for a, b in zip(plain, skip, strict=True):
        assert (a.outcome, a.steps) == (b.outcome, b.steps)
        if a.outcome == CONVERGED:
            _assert_bitwise(a, b)


@settings(max_examples=6, deadline=None)
@given(
    chi=st.sampled_from([0.0, 1.0, 3.0]),
    P=st.integers(8, 64),
    seed=st.integers(0, 2**20),
    log2_dt=st.integers(-10, 2),
)
def test_skipping_is_exact_for_any_member(chi, P, seed, log2_dt):
    g = _perceptron_group(chi, P, "float32", d=4)
    m = [Member(alpha=2.0**15, T=2.0**log2_dt / 2, seed=seed)]
    a = Engine(g, 1, DEVICE, keep_weights=True, skip_quiet=False).run(m)[0]
    b = Engine(g, 1, DEVICE, keep_weights=True, skip_quiet=True).run(m)[0]
    _assert_bitwise(a, b)


def test_compile_after_waits():
    g = _perceptron_group(1.0, 64, "float64", max_steps=2000)
    engine = Engine(g, 2, "cpu", compile_after=3600.0)
    engine.run([Member(alpha=2.0**10, T=2.0**-6, seed=s) for s in (0, 1)])
    assert not engine.compiled
    with pytest.raises(ValueError, match="compile_after must be >= 0"):
        Engine(g, 2, "cpu", compile_after=-1.0)


@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_setting_holds_for_the_whole_run(tf32, small_fc):
    """Group.tf32 sets TF32 for matmuls and cuDNN for the whole of Engine.run, evaluation
    and harvest included (cuDNN's own default allows TF32 convolutions), and the previous
    settings come back afterwards."""
    g = Group(**{**small_fc.as_dict(), "tf32": tf32, "max_steps": 40})
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    seen = []

    def on_result(index, result):  # called as each member is harvested
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))

    Engine(g, 2, DEVICE).run(MEMBERS[:2], on_result)
    assert seen == [(tf32, tf32)] * 2
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_compile_is_refused_on_cuda():
    g = Group(dataset="perceptron", arch="perceptron", P=16, B=2, d=4)
    with pytest.raises(ValueError, match="CPU fast path"):
        Engine(g, 1, "cuda", compile=True)


def test_mnas_trains_and_reports_every_observable(data_root):
    """MNAS through the engine, harvest included (its readout bias is a 0-d parameter;
    the NTK change through the channels-last model)."""
    g = Group(
        **dict(dataset="mnist", arch="mnas", P=32, B=8, pte=64, h=2, max_steps=40),
        ntk_points=8,
        data_root=str(data_root),
    )
    members = [Member(alpha=2.0**10, T=2.0**-6, seed=s) for s in (0, 1, 2)]
    res = train_batch(g, members, device=DEVICE, slots=2, keep_weights=True)
    alone = train_batch(g, members[1:2], device=DEVICE, keep_weights=True)[0]
    assert (res[1].outcome, res[1].steps) == (alone.outcome, alone.steps)
    for n in alone.weights:  # the CPU gradient runs member by member (MEMBER_CHUNK)
        np.testing.assert_allclose(res[1].weights[n], alone.weights[n], rtol=1e-5, atol=1e-6)
    for r in res:
        assert r.outcome in (CONVERGED, UNFINISHED)
        assert set(r.dw2_layer) == set(build_model(g).shapes)
        assert r.dw2 > 0 and math.isfinite(r.rel_change) and 0 <= r.test_error <= 1
        assert r.weights["b_out"].shape == ()
        assert math.isfinite(r.ntk_change) and r.ntk_change > 0


def test_mnas_members_batched_all_at_once_equal_them_alone(data_root, monkeypatch):
    """The GPU arrangement of MNAS on the CPU: every member's gradient in one vmap (its
    convolutions become grouped ones; MEMBER_CHUNK off, no channels-last), float64: each
    member reproduces itself trained alone, in steps, weights, test error and NTK change."""
    monkeypatch.setattr(engine_module, "MEMBER_CHUNK", {})
    g = Group(
        **dict(dataset="mnist", arch="mnas", P=16, B=8, pte=64, h=2, max_steps=150),
        ntk_points=8,
        dtype="float64",
        data_root=str(data_root),
    )
    members = [
        Member(alpha=a, T=2.0**-3, seed=s) for a, s in ((1.0, 1), (2.0**10, 0), (2.0**10, 1))
    ]
    engine = Engine(g, len(members), DEVICE, keep_weights=True)
    assert engine.member_chunk is None
    res = engine.run(members)
    assert [r.outcome for r in res] == [CONVERGED] * 3  # stopping included
    for m, r in zip(members, res, strict=True):
        alone = Engine(g, 1, DEVICE, keep_weights=True).run([m])[0]
        assert (r.outcome, r.steps) == (alone.outcome, alone.steps)
        assert r.test_error == alone.test_error
        assert r.ntk_change == pytest.approx(alone.ntk_change, rel=1e-9)
        for n in alone.weights:
            np.testing.assert_allclose(r.weights[n], alone.weights[n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("dtype", "B", "activation"),
    [("float32", 16, "relu"), ("float32", 10, "gelu"), ("float64", 5, "relu")],
)
def test_fused_engine_evaluates_with_the_step_forward_pass(
    dtype, B, activation, data_root, monkeypatch
):
    """On the CPU the FC engine's F(w0) and stopping check use the step's own forward
    pass, and a point's F does not depend on its batch: the step's margins and the
    check's agree bit for bit (so the step sees f(w0) = 0 exactly), whatever the batch
    and its size (B = 10 and 5 leave partial vector tails), and in a one-thread process
    (a Dask worker) whatever the number of members checked together and however the
    check splits the training set (into P - 1 points and one: joined)."""
    from ensemble import fused

    g = Group(
        dataset="mnist", arch="fc", P=256, B=B, h=128, L=5, pte=256, dtype=dtype,
        activation=activation, data_root=str(data_root),
    )  # fmt: skip
    e = Engine(g, 3, "cpu")
    e._fill([0, 1, 2], [Member(alpha=2.0**15, T=2.0**-10, seed=s) for s in range(3)])
    e._init_f0(torch.arange(3))
    e._run_steps(20)
    x = e.data.points(e.data.rows).flatten(2)
    assert torch.equal(fused.fc_forward(e.params0, x, g.L, g.activation)[0], e.f0)
    check = e._F(e.params, torch.arange(3), "train")
    torch.manual_seed(0)
    for _ in range(4):
        rows = torch.randperm(g.P)[: g.B]
        step = fused.fc_forward(e.params, x[:, rows], g.L, g.activation)[0]
        assert torch.equal(step, check[:, rows])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k in range(3):
            assert torch.equal(e._F(e.params, torch.tensor([k]), "train")[0], check[k])
        monkeypatch.setattr(engine_module, "EVAL_BUDGET_CPU", (g.P - 1) * x.shape[2])
        assert torch.equal(e._F(e.params, torch.arange(3), "train"), check)
    finally:
        torch.set_num_threads(threads)


class _OtherKernels(Engine):
    """An engine whose evaluation rounds differently from its step, as on a GPU, where
    cuBLAS picks kernels by shape: F(w0) and the stopping check use the generic forward
    pass (vmap of the model), the step the fused one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fwd_own = torch.func.vmap(self.model.forward)


def test_member_whose_step_and_check_disagree_stops_as_stalled(data_root):
    """float32 at alpha = 2^15, evaluation rounding differently from the step
    (``_OtherKernels``). From weights where one point's margin is > 0 for the check and
    <= 0 for the step, the step never trains again and the check never passes: the
    member is stopped as converged (at s* = last_active + 1 = 0, as it never stepped)
    after STALL_EPOCHS quiet epochs, instead of idling to its step budget."""
    from ensemble import fused

    g = Group(
        dataset="mnist", arch="fc", P=256, B=16, h=128, L=5, pte=256, max_steps=20_000,
        data_root=str(data_root),
    )  # fmt: skip
    m = Member(alpha=2.0**15, T=2.0**-10, seed=3)
    e = _OtherKernels(g, 1, "cpu")
    e._fill([0], [m])
    e._init_f0(torch.arange(1))
    y, f0 = e.data.y[0], e.f0[0]

    def margins(params) -> tuple[torch.Tensor, torch.Tensor]:
        """(the check's margins, the step's largest over 3 batch compositions), (P,)."""
        check = 1 - 2.0**15 * (e._F(params, torch.arange(1), "train")[0] - f0) * y
        step = torch.full((3, g.P), -math.inf)
        for c, order in enumerate([torch.arange(g.P), *(torch.randperm(g.P) for _ in "ab")]):
            for rows in order.split(g.B):
                x = e.data.points(e.data.rows[:, rows]).flatten(2)
                F = fused.fc_forward(params, x, g.L, g.activation)[0][0]
                step[c, rows] = 1 - 2.0**15 * (F - f0[rows]) * y[rows]
        return check, step.amax(0)

    torch.manual_seed(0)
    while True:  # train until the step sees every point fitted
        e._run_steps(50)
        check, step = margins(e.params)
        if (step <= 0).all():
            break
    # the point nearest the boundary among those whose two margins differ by > 0.002
    near = [j for j in torch.argsort(check, descending=True).tolist() if check[j] - step[j] > 2e-3]
    assert near, "the two forward passes agree to 0.002 on every point here"
    i = near[0]
    # move w_out along point i's last-layer features until its check margin is just > 0
    x = e.data.points(e.data.rows[:, i : i + 1]).flatten(2)
    u = fused.fc_forward(e.params, x, g.L, g.activation)[1][-1][0, :, 0]

    def moved(c: float) -> dict[str, torch.Tensor]:
        p = {n: t.clone() for n, t in e.params.items()}
        p["w_out"][0] -= c * float(y[i]) * u
        return p

    lo, hi = 0.0, 1e-9
    while margins(moved(hi))[0][i] <= 0:
        lo, hi = hi, 2 * hi
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if margins(moved(mid))[0][i] > 0 else (mid, hi)
    crafted = moved(hi)
    check, step = margins(crafted)
    assert int((check > 0).sum()) == 1 and bool((step <= 0).all())

    class FromCrafted(_OtherKernels):
        def _load(self, slots, members, drawn):
            super()._load(slots, members, drawn)
            for n, p in self.params.items():
                p[0] = crafted[n][0]

    stalled = FromCrafted(g, 1, "cpu", keep_weights=True)
    (r,) = stalled.run([m])
    assert (r.outcome, r.steps, r.n_unfitted) == (CONVERGED, 0, 1)
    assert 0 < r.train_loss < 1e-9
    assert stalled.stats.stalled == 1
    epoch = math.ceil(g.P / g.B)
    assert stalled.stats.real_steps <= (1 + engine_module.STALL_EPOCHS) * epoch + e.sync_every
    assert all(np.array_equal(r.weights[n], crafted[n][0].numpy()) for n in crafted)


def test_cpu_slots_fit_the_memory_a_task_may_use():
    """On the CPU the default ensemble holds at most CPU_SLOTS members, fewer where their
    slots and host draws (`plan.member_bytes`) would pass CPU_MEMORY_FRACTION of the
    memory a task may use; a member that alone passes it is refused naming P."""
    from ensemble.cluster import task_memory
    from ensemble.plan import CPU_MEMORY_FRACTION, member_bytes

    def perceptron(P: int, d: int) -> Group:
        return Group(dataset="perceptron", arch="perceptron", P=P, B=2, d=d)

    assert engine_module.default_slots(perceptron(64, 16), "cpu", 1000) == engine_module.CPU_SLOTS
    assert engine_module.default_slots(perceptron(64, 16), "cpu", 5) == 5
    # members of budget / 16 to budget / 8: 8 to 16 slots, give or take the memory in use
    budget = CPU_MEMORY_FRACTION * task_memory()
    P = 2
    while member_bytes(perceptron(2 * P, 128), host=True) <= budget / 8:
        P *= 2
    assert 4 <= engine_module.default_slots(perceptron(P, 128), "cpu", 1000) <= 24
    with pytest.raises(SpecError, match=r"P=67108864.*one member needs .* lower P, pte or d"):
        engine_module.default_slots(perceptron(2**26, 4096), "cpu", 1)


def test_explicit_slots_beyond_the_memory_are_refused_before_any_allocation():
    """An Engine (or ``--slots``) asking for more slots than `engine.slots_that_fit` says
    how many fit, before it allocates them, instead of running out of memory."""
    from ensemble.plan import member_bytes

    need = member_bytes(Group(dataset="perceptron", arch="perceptron", P=2**16, B=2, d=128), True)
    P = 2**16
    while need * 4 <= engine_module.slot_budget(torch.device("cpu")):  # 1 to 3 members fit
        P *= 2
        need = member_bytes(Group(dataset="perceptron", arch="perceptron", P=P, B=2, d=128), True)
    g = Group(dataset="perceptron", arch="perceptron", P=P, B=2, d=128)
    fit = engine_module.slots_that_fit(g, "cpu")
    assert 1 <= fit <= 4
    with pytest.raises(SpecError, match=rf"slots \(--slots\) = 64: perceptron, P={P}.*at most"):
        Engine(g, 64, "cpu")
