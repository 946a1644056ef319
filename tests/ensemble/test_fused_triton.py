"""The Triton kernels of the fused FC step (``ensemble.fused_triton``) against the torch
fused step (``ensemble.fused``), itself tested against vmap(grad).

They run where Triton can run them: on CUDA (``ENSEMBLE_TEST_DEVICE=cuda``) or, on the
CPU, under Triton's interpreter, which must be switched on before the kernels are
defined: there ``test_kernels_under_the_interpreter`` runs this file again in a
subprocess with ``TRITON_INTERPRET=1`` (slow: about a quarter second per launch). On the
CPU the kernels are also compiled for Hopper (sm_90) with Triton's own ptxas, which the
interpreter never does, and their register use is checked.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble import fused
from ensemble.cells import Group, Member
from ensemble.engine import Engine

DEVICE = os.environ.get("ENSEMBLE_TEST_DEVICE", "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
runs_here = pytest.mark.skipif(
    not HAS_TRITON or not (INTERPRETED or DEVICE == "cuda"),
    reason="Triton kernels run on CUDA, or here under test_kernels_under_the_interpreter",
)


def _params(K: int, h: int, d_in: int, L: int, dtype, gen) -> dict:
    p = {"W0": torch.randn(K, h, d_in, dtype=dtype, generator=gen)}
    for layer in range(1, L):
        p[f"W{layer}"] = torch.randn(K, h, h, dtype=dtype, generator=gen)
    p["w_out"] = torch.randn(K, h, dtype=dtype, generator=gen)
    return {n: v.to(DEVICE) for n, v in p.items()}


def _first_layer(params, B: int, gen, n_pool: int = 300):
    """A FirstLayer over a random pool of n_pool points: distinct rows per member for
    this step and the next, steps 5, 6, .., nothing carried."""
    from ensemble.fused_triton import FirstLayer

    K, h, d_in = params["W0"].shape
    dtype = params["W0"].dtype
    src = torch.randn(n_pool, d_in, dtype=dtype, generator=gen).to(DEVICE)
    rows = torch.stack([torch.randperm(n_pool, generator=gen)[: 2 * B] for _ in range(K)])
    step = torch.arange(5, 5 + K, device=DEVICE)
    pre = torch.full((K, h, B), math.nan, dtype=dtype, device=DEVICE)
    pre_step = torch.full((K,), -1, dtype=torch.int64, device=DEVICE)
    rows, rows_next = (r.contiguous().to(DEVICE) for r in (rows[:, :B], rows[:, B:]))
    return FirstLayer(src, rows, rows_next, pre, pre_step, step)


@runs_here
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize(
    "dtype,h,d_in,B,L",
    [
        (torch.float64, 24, 50, 5, 3),  # widths and batch below and off the 16-wide tiles
        (torch.float64, 32, 784, 16, 2),  # MNIST's fan-in: many slices
        (torch.float32, 40, 100, 16, 5),
    ],
)
def test_one_step_matches_the_torch_fused_step(activation, dtype, h, d_in, B, L):
    """Forward (F, activations) and the in-place update, for 4 members: one updating
    normally, one that does not update (stopped), one with an infinite weight (diverged:
    F not finite where torch's is not, and not updated), and one updating with a zero
    step size. The batch is read from the pool by row. The members that update carry
    the next step's first-layer pre-activation, from their new weights; the next forward
    pass uses it, and equals one that recomputes it."""
    from ensemble import fused_triton

    gen = torch.Generator().manual_seed(h * B + L)
    K = 4
    params = _params(K, h, d_in, L, dtype, gen)
    params["W1"][2, 0, 0] = math.inf
    first = _first_layer(params, B, gen)
    x, x_next = first.src[first.rows], first.src[first.rows_next]
    g_F = (0.1 * torch.randn(K, B, dtype=dtype, generator=gen)).to(DEVICE)
    g_F[3] = 0.0
    update = torch.tensor([True, False, False, True], device=DEVICE)
    ref = {n: v.clone() for n, v in params.items()}
    new = {n: v.clone() for n, v in params.items()}
    F_ref, us_ref, slopes_ref = fused.fc_forward(ref, x, L, activation)
    F_new, acts, slopes_new = fused_triton.fc_forward(new, first, L, activation)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    ok = [0, 1, 3]
    torch.testing.assert_close(F_new[ok], F_ref[ok], rtol=tol, atol=tol)
    assert torch.equal(torch.isfinite(F_new[2]), torch.isfinite(F_ref[2]))
    assert not torch.isfinite(F_ref[2]).all()
    for a, b in zip(acts, us_ref[1:], strict=True):
        torch.testing.assert_close(a[ok], b[ok], rtol=tol, atol=tol)
    assert torch.equal(first.pre_step, first.step)  # computed now, for this step
    pre_now = first.pre.clone()
    fused.fc_backward_update(ref, us_ref, slopes_ref, g_F, update, activation)
    fused_triton.fc_backward_update(new, first, acts, slopes_new, g_F, update, activation)
    for n in params:
        moved = (ref[n][0] - params[n][0]).abs().max()
        assert moved > 100 * tol, f"{n} did not move"
        torch.testing.assert_close(new[n][[0, 3]], ref[n][[0, 3]], rtol=tol, atol=tol)
        assert torch.equal(new[n][1:3], params[n][1:3]), f"{n} of a member that does not update"
    assert torch.equal(new["W0"][3], params["W0"][3])  # a zero step changes nothing
    # carried: the next step's pre-activation where the member updated, else this one's
    upd = [0, 3]
    assert first.pre_step.tolist() == [6, 6, 7, 9]
    assert torch.equal(first.pre[1:3], pre_now[1:3])
    pre_next = (new["W0"] @ x_next.transpose(1, 2)) / math.sqrt(d_in)
    torch.testing.assert_close(first.pre[upd], pre_next[upd], rtol=tol, atol=tol)
    first.step += update  # the engine counts the step
    first.rows[upd] = first.rows_next[upd]
    F_carried = fused_triton.fc_forward(new, first, L, activation)[0]
    first.pre_step.fill_(-1)
    F_fresh = fused_triton.fc_forward(new, first, L, activation)[0]
    torch.testing.assert_close(F_carried[ok], F_fresh[ok], rtol=tol, atol=tol)
    torch.testing.assert_close(F_fresh[upd], fused.fc_forward(new, x_next, L, activation)[0][upd])


@runs_here
def test_engine_with_the_kernels_follows_the_torch_fused_step(data_root):
    """Engine(triton=True) against the default engine, float64, 12 steps of 3 members."""
    g = Group(
        dataset="mnist", arch="fc", P=64, B=8, pte=256, h=32, L=2, max_steps=12,
        dtype="float64", data_root=str(data_root),
    )  # fmt: skip
    members = [Member(alpha=2.0**10, T=2.0**-6, seed=0), Member(alpha=1.0, T=2.0**-4, seed=1)]
    members.append(Member(alpha=2.0**-2, T=2.0**-7, seed=2))
    ref = Engine(g, 3, DEVICE, keep_weights=True).run(members)
    new = Engine(g, 3, DEVICE, keep_weights=True, triton=True).run(members)
    for a, b in zip(ref, new, strict=True):
        assert (a.outcome, a.steps) == (b.outcome, b.steps)
        assert a.test_error == pytest.approx(b.test_error, abs=1e-12)
        for n in a.weights:
            np.testing.assert_allclose(b.weights[n], a.weights[n], rtol=1e-9, atol=1e-12)


@runs_here
@pytest.mark.parametrize("carry", [True, False])
def test_engine_carries_the_first_layer_only_where_it_may(carry, data_root, monkeypatch):
    """The first layer's carried pre-activation serves only the member and step it was
    computed for: against the default engine doing the same, a member put into a slot
    whose last member never left step 0 (so the carried step matches the new member's),
    a counter moved by hand (as skipped steps move it), and a shrink of the slots. Also
    with the carry switched off (``fused_triton.CARRY``, for experiments)."""
    from ensemble import fused_triton

    monkeypatch.setattr(fused_triton, "CARRY", carry)
    g = Group(
        dataset="mnist", arch="fc", P=64, B=8, pte=256, h=32, L=2, max_steps=100,
        dtype="float64", data_root=str(data_root),
    )  # fmt: skip
    members = [Member(alpha=2.0**k, T=2.0**-6, seed=k) for k in range(4)]

    def drive(engine: Engine) -> Engine:
        engine._fill(range(3), members[:3])
        engine._init_f0(torch.arange(3, device=DEVICE))
        engine.limit[1] = 0  # slot 1 stays at step 0
        engine._run_steps(2)
        engine._fill([1], [members[3]])
        engine._init_f0(torch.tensor([1], device=DEVICE))
        engine.limit[1] = engine.limit[0]
        engine._run_steps(2)
        engine.step[0] += 5
        engine._run_steps(2)
        engine._select([1, 0])
        engine._run_steps(2)
        return engine

    ref, new = drive(Engine(g, 3, DEVICE)), drive(Engine(g, 3, DEVICE, triton=True))
    assert new.step.tolist() == ref.step.tolist() == [6, 13]
    assert new.pre0_step.tolist() == (new.step.tolist() if carry else [-1, -1])
    for n, w in ref.params.items():
        torch.testing.assert_close(new.params[n], w, rtol=1e-9, atol=1e-12)


@runs_here
def test_bench_compares_the_kernels_with_the_torch_fused_step(capsys, data_root):
    from ensemble.cli import main

    argv = ["bench", "--arch", "fc", "--triton", "--K", "2", "--steps", "1", "--repeats", "1"]
    assert main([*argv, "--data-root", str(data_root)]) == 0
    out = capsys.readouterr().out
    assert "Triton kernels)" in out and "| torch fused step | triton / torch |" in out
    (row,) = [line for line in out.splitlines() if line.startswith("| 2 |")]
    assert len(row.strip("|").split("|")) == 5 and float(row.split("|")[4].replace(",", "")) > 0


def test_engine_refuses_the_kernels_where_they_cannot_run():
    g = Group(dataset="perceptron", arch="perceptron", P=16, B=2, d=4)
    with pytest.raises(ValueError, match="fused FC step"):
        Engine(g, 1, DEVICE, triton=True)
    if DEVICE == "cpu" and not INTERPRETED:
        fc = Group(dataset="mnist", arch="fc", P=16, B=2, h=8, L=2)
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            Engine(fc, 1, "cpu", triton=True)


def _compile_for_hopper(kernel, types: dict, constexprs: dict) -> str:
    """Compile ``kernel`` for sm_90 without a GPU; cuobjdump's resource line of it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    sig = {n: "constexpr" if n in constexprs else types[n] for n in names}
    consts = {(names.index(n),): v for n, v in constexprs.items()}
    from ensemble import fused_triton

    compiled = triton.compile(
        ASTSource(fn=kernel, signature=sig, constexprs=consts),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": fused_triton.NUM_WARPS},
    )
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        out = subprocess.run(
            [str(tools / "cuobjdump"), "--dump-resource-usage", str(cubin)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    return next(line for line in out.splitlines() if "REG:" in line)


@pytest.mark.skipif(
    not HAS_TRITON or INTERPRETED or DEVICE != "cpu",
    reason="compiles for a GPU on a machine without one (Triton's own ptxas and cuobjdump)",
)
@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_kernels_compile_for_hopper_without_spilling(dtype):
    """The kernels with the module's slices and warps, compiled for an H100/H200
    (sm_90): they compile (CUDA-only errors show here, not in the interpreter) and keep
    every value in registers (no local memory: a spill costs a memory round trip)."""
    from ensemble import fused_triton as ft

    p = f"*{dtype}"
    ints = dict(H="i32", fan_in="i32", B="i32", su_k="i64", su_d="i64", su_b="i64")
    tiles = dict(BH=128, BB=16, PRECISION="ieee")
    carry = dict(Rows="*i64", PreStep="*i64", Step="*i64")
    for gelu in (False, True):
        for layer in (dict(FIRST=False, CARRY=False), dict(FIRST=True, CARRY=False)) + (
            dict(FIRST=True, CARRY=True),
        ):
            fwd = _compile_for_hopper(
                ft._forward_layer,
                dict(W=p, U=p, Out=p, Slope=p, Consts=p, Pre=p, **carry, **ints),
                dict(tiles, BD=ft.FORWARD_BD, GELU=gelu, **layer),
            )
            assert "STACK:0 " in fwd and "LOCAL:0 " in fwd, (layer, fwd)
            bwd = _compile_for_hopper(
                ft._backward_layer,
                dict(W=p, G=p, U=p, Pre=p, Keep="*i1", Gprev=p, SlopePrev=p, Consts=p, **carry)
                | dict(RowsNext="*i64", **ints),
                dict(tiles, BD=ft.BACKWARD_BD, GELU=gelu, **layer),
            )
            assert "STACK:0 " in bwd and "LOCAL:0 " in bwd, (layer, bwd)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_under_the_interpreter():
    """On the CPU: this file's kernel tests, run by Triton's interpreter in a subprocess."""
    if INTERPRETED or DEVICE == "cuda":
        pytest.skip("the kernel tests run directly in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "11 passed, 3 skipped" in r.stdout, r.stdout[-1000:]
