"""``python -m ensemble bench``: network-steps per second, ensembles against one network
at a time with the same code, measured in one run (medians of repeats).

Per architecture (science.md settings): FC-5L h = 128, B = 16, P = 1024 on MNIST; MNAS
h = 32, B = 64, P = 1024 on CIFAR-10; the perceptron d = 128, B = 2, P = 1024. For each
ensemble size K the engine's hot loop (per-member batch draw, centred output, hinge loss,
gradient, masked update) runs ``steps`` steps after a warm-up; "x one-at-a-time" is the
ratio to K = 1, i.e. to K networks trained one after another. On CUDA the table also
gives the ratio to a memory-bandwidth bound: copy bandwidth / (5 x weight bytes) per
network-step (forward read, backward read, gradient write, update read and write).
``--synthetic`` uses random inputs of the dataset's shape (throughput does not depend on
pixel values) where the dataset files are not at hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ensemble.cells import INPUT_SHAPE, POOL_SIZE, Group, Member, SpecError
from ensemble.engine import Engine, allow_tf32, resolve_device
from ensemble.models import build_model
from ensemble.plan import compile_break_even

SETTINGS = {
    "fc": dict(dataset="mnist", arch="fc", h=128, L=5, B=16, P=1024, pte=1024),
    "mnas": dict(dataset="cifar10", arch="mnas", h=32, B=64, P=1024, pte=1024),
    "perceptron": dict(dataset="perceptron", arch="perceptron", d=128, B=2, P=1024, pte=1024),
}
DEFAULT_K = {"cpu": [1, 8, 64, 256], "cuda": [1, 64, 512, 2048, 4096, 8192]}
DEFAULT_STEPS = {"cpu": 30, "cuda": 200}
MNAS_MAX_K = {"cpu": 16, "cuda": 256}
"""Largest MNAS ensemble a table measures: an H200 step of 4096 members takes seconds."""
ARCH_STEPS = {"mnas": 0.1, "perceptron": 10.0}
"""Timed steps relative to FC when --steps is not given (MNAS steps are slow, the
perceptron's fast)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a 1 GiB buffer)."""
    n = 2**28 if device.type == "cuda" else 2**25
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    _sync(device)
    t = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    _sync(device)
    return 2 * 4 * n * 5 / (time.perf_counter() - t)


@dataclass(frozen=True)
class BenchOptions:
    """How every measurement of one bench run is made."""

    device: torch.device
    repeats: int = 3
    synthetic: bool = False
    data_root: str | None = None
    compile: bool = False
    fused: bool | None = None
    """Engine(fused=...): None is the engine's default (the fused step for FC)."""
    tf32: bool = False
    """Group(tf32=...): TF32 matmuls and convolutions on CUDA; else strict float32 (cuDNN's
    own default allows TF32 convolutions, so every measurement sets it explicitly)."""
    triton: bool = False
    """Engine(triton=...): FC's fused step in Triton kernels (``ensemble.fused_triton``)."""


def make_engine(arch: str, K: int, opt: BenchOptions) -> Engine:
    """An engine of K slots filled with lazy members (alpha = 2^15, T = 2^-8)."""
    device = opt.device
    g = Group(**SETTINGS[arch], max_steps=10**9, data_root=opt.data_root, tf32=opt.tf32)
    pool = None
    if opt.synthetic and g.dataset != "perceptron":
        n = POOL_SIZE[g.dataset]
        gen = torch.Generator(device).manual_seed(0)
        x = torch.randn(n, *INPUT_SHAPE[g.dataset], generator=gen, device=device)
        y = torch.where(torch.rand(n, generator=gen, device=device) < 0.5, -1.0, 1.0)
        pool = (x, y)
    engine = Engine(
        g, K, device, pool=pool, compile=opt.compile, fused=opt.fused, triton=opt.triton
    )
    engine._fill(range(K), [Member(alpha=2.0**15, T=2.0**-8, seed=s) for s in range(K)])
    engine._init_f0(torch.arange(K, device=device))
    return engine


def measure(arch: str, K: int, steps: int, opt: BenchOptions) -> float:
    """Median network-steps/s of the hot loop for an ensemble of K."""
    device = opt.device
    engine = make_engine(arch, K, opt)
    rates = []
    with allow_tf32(opt.tf32):
        engine._run_steps(min(steps, 20) + 18)  # warm-up (and CUDA graph capture)
        for _ in range(opt.repeats):
            _sync(device)
            t = time.perf_counter()
            engine._run_steps(steps)
            _sync(device)
            rates.append(K * steps / (time.perf_counter() - t))
    return statistics.median(rates)


def run_row(arch: str, K: int, steps: int, opt: BenchOptions) -> str:
    """One markdown row: ``Engine.run`` of K lazy members (alpha = 2^15, T = 2^-8) for at
    most ``steps`` steps each, i.e. everything the engine does (filling the slots,
    checkpoints, stopping checks, harvest) against its hot loop alone (``measure``)."""
    g = Group(
        **SETTINGS[arch], max_steps=steps, data_root=opt.data_root, tf32=opt.tf32
    )  # fmt: skip
    members = [Member(alpha=2.0**15, T=2.0**-8, seed=s) for s in range(K)]
    engine = Engine(g, K, opt.device, fused=opt.fused, triton=opt.triton)
    _sync(opt.device)
    t = time.perf_counter()
    engine.run(members)
    _sync(opt.device)
    wall = time.perf_counter() - t
    st = engine.stats
    hot = measure(arch, K, min(steps, 200), opt)
    loop = st.member_steps / (wall - st.fill_seconds)
    return (
        f"| {arch} | {K} | {st.member_steps:,} | {wall:.1f} s | {st.fill_seconds:.1f} s"
        f" | {_rate(st.member_steps / wall)} | {_rate(loop)} | {_rate(hot)} | {loop / hot:.2f}"
        f" | {st.check_seconds / wall:.1%} | {st.checkpoint_seconds / wall:.1%}"
        f" | {st.occupancy:.0%} |"
    )


RUN_HEADER = (
    "| arch | K | member-steps | wall | filling | network-steps/s | without filling"
    " | hot loop | run / hot loop | stopping checks | checkpoints | occupancy |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def profile(arch: str, K: int, opt: BenchOptions, steps: int = 16) -> str:
    """The kernels (CUDA) or operators (CPU, self time) of ``steps`` eager steps of K
    members (torch.profiler), the 15 largest, and their time per step against the
    step's wall time (CUDA graph on CUDA): the difference is launch gaps and idle time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = opt.device.type == "cuda"
    engine = make_engine(arch, K, opt)
    with allow_tf32(opt.tf32):
        engine.cuda_graph = False
        engine._run_steps(4)
        _sync(opt.device)
        activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
        with torch_profile(activities=[activity]) as prof:
            engine._run_steps(steps)
            _sync(opt.device)

    def us(e) -> float:
        return e.device_time_total if cuda else e.self_cpu_time_total

    events = sorted((e for e in prof.key_averages() if us(e) > 0), key=lambda e: -us(e))
    total = sum(us(e) for e in events) / steps  # microseconds per step
    if not total:
        return f"## {arch}, K = {K}: the profiler saw no kernels on {opt.device}"
    wall = K / measure(arch, K, 64, opt) * 1e6  # microseconds per step
    what = "CUDA kernels" if cuda else "operators (self CPU time)"
    lines = [
        f"## {arch}, K = {K}: {what} of one eager step ({opt.device})\n",
        f"{total:,.0f} us per step; the {'CUDA-graph ' if cuda else ''}step takes"
        f" {wall:,.0f} us ({K * 1e6 / total:,.0f} network-steps/s if they ran back to back)\n",
        "| kernel | calls per step | us per step | share |",
        "|---|---:|---:|---:|",
    ]
    for e in events[:15]:
        t = us(e) / steps
        lines.append(f"| {e.key[:90]} | {e.count / steps:g} | {t:,.1f} | {t / total:.1%} |")
    return "\n".join(lines)


def _rate(x: float) -> str:
    """A rate with three significant digits below 100 (MNAS on a CPU), else whole numbers."""
    return f"{x:.3g}" if x < 100 else f"{x:,.0f}"


def table(arch: str, Ks: list[int], steps: int, opt: BenchOptions) -> Iterator[str]:
    """The markdown table of network-steps/s against K for one architecture, line by line
    as measured; for FC in strict float32 also the generic step (vmap of grad,
    ``Engine(fused=False)``) and the fused step's gain, or with ``opt.triton`` the torch
    fused step and the Triton kernels' gain over it."""
    device = opt.device
    g = Group(**SETTINGS[arch])
    n_params = build_model(g).n_params
    bound = None
    if device.type == "cuda":
        bound = copy_bandwidth(device) / (5 * 4 * n_params)
    generic = arch == "fc" and not opt.tf32
    if opt.triton:
        other, label = dataclasses.replace(opt, triton=False), "torch fused step | triton / torch"
    else:
        other, label = dataclasses.replace(opt, fused=False), "generic step | fused / generic"
    yield from [
        f"## {arch}: {SETTINGS[arch]}  ({n_params:,} parameters, float32, {steps} steps, {device}"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "")
        + (", synthetic inputs" if opt.synthetic and g.dataset != "perceptron" else "")
        + (", torch.compile" if opt.compile else "")
        + (", TF32" if opt.tf32 else "")
        + (", Triton kernels" if opt.triton else "")
        + ")",
        "",
        "| K | network-steps/s | x one-at-a-time |"
        + (" x bandwidth bound |" if bound else "")
        + (f" {label} |" if generic else ""),
        "|---:|---:|---:|" + ("---:|" if bound else "") + ("---:|---:|" if generic else ""),
    ]
    base = None
    for K in Ks:
        try:
            rate = measure(arch, K, steps, opt)
            slow = measure(arch, K, steps, other) if generic else 0
        except torch.OutOfMemoryError:
            yield f"| {K} | out of memory | |"
            break
        except SpecError:  # more slots than engine.slots_that_fit allows (before allocating)
            yield f"| {K} | over the engine's memory budget | |"
            break
        base = base or rate
        row = f"| {K} | {_rate(rate)} | {rate / base:.2f} |"
        if bound:
            row += f" {rate / bound:.2f} |"
        if generic:
            row += f" {_rate(slow)} | {rate / slow:.2f} |"
        yield row
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if bound:
        yield f"\nbandwidth bound: {bound:,.0f} network-steps/s"


def compile_cost(arch: str, K: int, steps: int, opt: BenchOptions) -> str:
    """One markdown row: the first compiled step's wall time (tracing and compiling the
    step for this process and shapes), eager and compiled network-steps/s, and the
    break-even work in member-steps above which a task gains from compiling
    (``plan.compile_break_even``)."""
    eager = measure(arch, K, steps, dataclasses.replace(opt, compile=False))
    engine = make_engine(arch, K, dataclasses.replace(opt, compile=True))
    t = time.perf_counter()
    engine._run_steps(1)
    first = time.perf_counter() - t
    compiled = measure(arch, K, steps, dataclasses.replace(opt, compile=True))
    even = compile_break_even(first, eager, compiled)[1]
    return (
        f"| {arch} | {K} | {first:.1f} s | {_rate(eager)} | {_rate(compiled)}"
        f" | {compiled / eager:.1f}x | {even:,.0f} |"
    )


def check_graph_equivalence(device: torch.device, data_root=None, triton: bool = True) -> str:
    """The engine's fast paths against each other on ``device`` (FC-5L h = 64, P = 256,
    8 members that converge in 10^2-10^3 steps). In float64, where float rounding does
    not move t*: the CUDA-graph step against the eager step, shrinking slots against
    fixed ones and the fused FC step against the generic one (vmap of grad) must give the
    same outcomes and steps and weights to 1e-6 (AssertionError otherwise), and so must
    FC's Triton kernels on CUDA where Triton is installed. In float32,
    the graph against the eager step and ensemble members against the same members
    trained alone are reported: there rounding differences can move t*; on CUDA also
    the TF32 option (``Group.tf32``) against strict float32, in t* and test error.
    Returns a summary line."""
    members = [
        Member(alpha=a, T=T, seed=s)
        for a in (1.0, 2.0**12)
        for T in (2.0**-8, 2.0**-5)
        for s in (0, 1)
    ]
    n = len(members)

    def group(dtype: str) -> Group:
        return Group(
            dataset="mnist", arch="fc", h=64, L=5, B=16, P=256, pte=1024, max_steps=5000,
            data_root=data_root, dtype=dtype,
        )  # fmt: skip

    g = group("float64")
    graph = Engine(g, n, device, keep_weights=True).run(members)
    others = {
        "eager": Engine(g, n, device, keep_weights=True, cuda_graph=False).run(members),
        "fixed slots": Engine(g, n, device, keep_weights=True, shrink=False).run(members),
        "generic step": Engine(g, n, device, keep_weights=True, fused=False).run(members),
    }
    if triton and device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        others["triton kernels"] = Engine(g, n, device, keep_weights=True, triton=True).run(members)
    for name, res in others.items():
        for a, b in zip(graph, res, strict=True):
            assert (a.outcome, a.steps) == (b.outcome, b.steps), (name, a.member, a.steps, b.steps)
            for w in a.weights:
                rel = float(abs(a.weights[w] - b.weights[w]).max() / abs(b.weights[w]).max())
                assert rel < 1e-6, (name, a.member, w, rel)
    g = group("float32")
    graph = Engine(g, n, device, keep_weights=True).run(members)
    eager = Engine(g, n, device, keep_weights=True, cuda_graph=False).run(members)
    alone = [Engine(g, 1, device).run([m])[0] for m in members]

    def compare(res) -> str:
        same = sum(a.steps == b.steps for a, b in zip(graph, res, strict=True))
        rel = max(abs(a.steps - b.steps) / b.steps for a, b in zip(graph, res, strict=True))
        return f"{same}/{n} identical steps, largest step difference {rel:.1%}"

    worst = max(
        float(abs(a.weights[w] - b.weights[w]).max())
        for a, b in zip(graph, eager, strict=True)
        for w in a.weights
    )
    tf32 = ""
    if device.type == "cuda":
        fast = Engine(Group(**{**g.as_dict(), "tf32": True}), n, device).run(members)
        err = max(abs(a.test_error - b.test_error) for a, b in zip(graph, fast, strict=True))
        tf32 = f"; TF32 vs float32 {compare(fast)}, largest test-error difference {err:.4f}"
    return (
        f"float64, {n} members: CUDA graph = {' = '.join(others)} (outcomes,"
        f" steps, weights to 1e-6); float32: graph vs eager {compare(eager)}, max |dw|"
        f" {worst:.2e}; ensemble vs alone {compare(alone)}{tf32}"
    )


def check_other_architectures(device: torch.device, data_root=None) -> str:
    """MNAS and the perceptron on ``device`` in float64, asserted (AssertionError
    otherwise): each MNAS ensemble member (its convolutions batched by vmap on CUDA, one
    member at a time on the CPU: ``engine.MEMBER_CHUNK``) equals the member trained
    alone in outcome, steps, test error, NTK change (8 test points) and weights (1e-9);
    the perceptron's quiet-step skipping equals its plain steps bit for bit. On CUDA both
    are also compared with the CPU engine (outcomes and steps equal, weights, test error
    and NTK change to 1e-6). MNAS h = 2, P = 16 on MNIST; perceptron d = 8, chi = 1,
    P = 256. Returns a summary line."""
    mnas = Group(
        dataset="mnist", arch="mnas", h=2, B=8, P=16, pte=64, max_steps=150, ntk_points=8,
        dtype="float64", data_root=data_root,
    )  # fmt: skip
    mnas_members = [Member(alpha=a, T=2.0**-3, seed=s) for a, s in ((1.0, 1), (2.0**10, 0))]
    perceptron = Group(
        dataset="perceptron", arch="perceptron", d=8, chi=1.0, B=2, P=256, pte=200,
        max_steps=200_000, dtype="float64",
    )  # fmt: skip
    p_members = [Member(alpha=2.0**15, T=T, seed=s) for T in (2.0**-8, 2.0**-4) for s in (0, 1)]

    def same(a, b, rel: float, what: str) -> None:
        for x, y in zip(a, b, strict=True):
            assert (x.outcome, x.steps) == (y.outcome, y.steps), (what, x.member, x.steps, y.steps)
            for name in x.weights:
                d = float(abs(x.weights[name] - y.weights[name]).max())
                assert d <= rel * max(float(abs(y.weights[name]).max()), 1e-300), (what, name, d)
            for f in ("test_error", "ntk_change"):
                u, v = getattr(x, f), getattr(y, f)
                assert u == v or abs(u - v) <= rel * abs(v) or (u != u and v != v), (what, f, u, v)

    ens = Engine(mnas, len(mnas_members), device, keep_weights=True).run(mnas_members)
    alone = [Engine(mnas, 1, device, keep_weights=True).run([m])[0] for m in mnas_members]
    same(ens, alone, 1e-9, "MNAS ensemble vs alone")
    plain = Engine(perceptron, 4, device, keep_weights=True, skip_quiet=False).run(p_members)
    skip = Engine(perceptron, 4, device, keep_weights=True, skip_quiet=True).run(p_members)
    same(skip, plain, 0.0, "perceptron skipping vs plain")
    cpu = ""
    if device.type != "cpu":
        same(ens, Engine(mnas, 2, "cpu", keep_weights=True).run(mnas_members), 1e-6, "MNAS cpu")
        same(plain, Engine(perceptron, 4, "cpu", keep_weights=True).run(p_members), 1e-6, "cpu")
        cpu = "; both = the CPU engine (outcomes, steps; weights, test error, NTK to 1e-6)"
    steps = ", ".join(str(r.steps) for r in ens)
    return (
        f"float64: MNAS ensemble = alone ({steps} steps; weights, test error, NTK change"
        f" to 1e-9); perceptron skipping = plain steps ({sum(r.steps for r in plain)}"
        f" member-steps, bit for bit){cpu}"
    )


def fill_cost(K: int, device: torch.device, data_root=None) -> str:
    """Milliseconds per member to fill K FC-5L slots (P = 1024: initial weights, training
    set, F(w0) on it), one member at a time against all K at once (``Engine._fill`` draws
    on the host in FILL_THREADS threads and copies each tensor once)."""
    g = Group(**SETTINGS["fc"], data_root=data_root)
    members = [Member(alpha=2.0**15, T=2.0**-8, seed=s) for s in range(K)]
    engine = Engine(g, K, device)
    times = {}
    for mode in ("one at a time", "all at once"):
        _sync(device)
        t = time.perf_counter()
        groups = [[k] for k in range(K)] if mode == "one at a time" else [list(range(K))]
        for slots in groups:
            engine._fill(slots, [members[k] for k in slots])
            engine._init_f0(torch.tensor(slots, device=device))
        _sync(device)
        times[mode] = (time.perf_counter() - t) / K * 1e3
    one, many = times["one at a time"], times["all at once"]
    return (
        f"fill {K} FC-5L slots on {device}: {one:.1f} ms per member one at a time,"
        f" {many:.1f} ms all at once ({one / many:.1f}x; F(w0) included)"
    )


def occupancy(
    arch: str,
    n_members: int,
    slots: int,
    device: torch.device,
    data_root=None,
    max_steps: int = 4000,
) -> str:
    """Continuous batching against static batches on the same cells: members whose step
    counts differ widely (T from 2^-12 to 2^-4 at alpha = 1 and 2^12), trained as static
    batches of ``slots`` members, then through ``slots`` refilled slots without and with
    shrinking the tail (``Engine(shrink=...)``); a table of wall time, slot-steps and
    occupancy (busy slot-steps / slot-steps)."""
    g = Group(**{**SETTINGS[arch], "P": 256, "max_steps": max_steps, "data_root": data_root})
    Ts = [2.0**k for k in range(-12, -3)]
    members = [
        Member(alpha=[1.0, 2.0**12][i % 2], T=Ts[(i // 2) % len(Ts)], seed=i)
        for i in range(n_members)
    ]
    rows = []
    modes = [("static batches", None), ("continuous", False), ("continuous + shrink", True)]
    for name, shrink in modes:
        t = time.perf_counter()
        busy = slot_steps = 0
        if shrink is None:
            runs = [members[i : i + slots] for i in range(0, n_members, slots)]
        else:
            runs = [members]
        for part in runs:
            e = Engine(g, slots, device, shrink=bool(shrink))
            e.run(part)
            busy, slot_steps = busy + e.stats.busy_steps, slot_steps + e.stats.slot_steps
        rows.append((name, time.perf_counter() - t, slot_steps, busy / slot_steps))
    t_static = rows[0][1]
    out = [
        f"## {arch}, {n_members} members, {slots} slots on {device}:"
        f" {busy:,} busy slot-steps (the members' own steps)\n",
        "| mode | wall time | x static | slot-steps | occupancy |",
        "|---|---:|---:|---:|---:|",
    ]
    out += [
        f"| {name} | {sec:.1f} s | {t_static / sec:.2f} | {n:,} | {occ:.0%} |"
        for name, sec, n, occ in rows
    ]
    return "\n".join(out)


def skipping(P: int, chi: float, K: int, opt: BenchOptions) -> str:
    """K perceptron members (d = 16, alpha = 2^15, T = 2^-4, seeds 0..K-1) trained to
    zero loss with quiet-step skipping and with plain steps: wall times (after a
    compiling warm-up with --compile), real steps, simulated network-steps/s, and whether the
    two runs agree member by member (steps and weights)."""
    g = Group(
        dataset="perceptron", arch="perceptron", d=16, chi=chi, B=2, P=P, pte=1024,
        max_steps=10**9,
    )  # fmt: skip
    members = [Member(alpha=2.0**15, T=2.0**-4, seed=s) for s in range(K)]
    warm = Group(**{**g.as_dict(), "max_steps": 20_000})
    runs = {}
    for skip in (True, False):
        if opt.compile:  # compile outside the timing
            Engine(warm, K, opt.device, compile=True, skip_quiet=skip).run(members)
        e = Engine(g, K, opt.device, keep_weights=True, compile=opt.compile, skip_quiet=skip)
        t = time.perf_counter()
        res = e.run(members)
        runs[skip] = (time.perf_counter() - t, e.stats.real_steps, res)
    (t_s, n_s, a), (t_p, n_p, b) = runs[True], runs[False]
    same = all(
        x.steps == y.steps and bool((x.weights["w"] == y.weights["w"]).all())
        for x, y in zip(a, b, strict=True)
    )
    total = sum(r.steps for r in a)
    return (
        f"| {P} | {chi:g} | {K} | {max(r.steps for r in a):,} | {t_p:.1f} s ({n_p:,} steps)"
        f" | {t_s:.1f} s ({n_s:,} steps) | {t_p / t_s:.1f}x | {total / t_s:,.0f} |"
        f" {'bitwise' if same else 'DIFFERENT'} |"
    )


def suite(a: argparse.Namespace, device: torch.device, Ks: list[int], steps: int) -> int:
    """The whole device report in one run, each section printed as it is measured, with
    its wall time: ``--check``; FC's table (on CUDA with Triton installed, the Triton
    kernels against the torch fused step); ``Engine.run`` against the hot loop at the
    largest K; the perceptron's and MNAS's tables; continuous against static batching.
    A section that raises prints its traceback and the report goes on; one that failed
    with the Triton kernels is run again without them. Returns the number of sections
    that failed."""
    t0 = time.perf_counter()
    opt = BenchOptions(device, a.repeats, a.synthetic, a.data_root)
    triton = device.type == "cuda" and importlib.util.find_spec("triton") is not None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# bench --suite on {device} ({name}): python -m ensemble {shlex.join(a.argv)}")
    K, run_steps = max(Ks), a.run or 10 * steps
    n = a.occupancy or (16 if device.type == "cpu" else 512)
    sections = [
        (
            "fast paths against each other",
            True,
            lambda t: print(check_graph_equivalence(device, a.data_root, triton=t)),
        ),
        (
            "MNAS and the perceptron, their fast paths",
            False,
            lambda t: print(check_other_architectures(device, a.data_root)),
        ),
        (
            "network-steps/s against K",
            True,
            lambda t: tables(["fc"], Ks, steps, bool(a.steps), dataclasses.replace(opt, triton=t)),
        ),
        (
            f"Engine.run against the hot loop, {run_steps} steps",
            True,
            lambda t: print(
                f"{RUN_HEADER}\n{run_row('fc', K, run_steps, dataclasses.replace(opt, triton=t))}"
            ),
        ),
        (
            "network-steps/s against K",
            False,
            lambda t: tables(["perceptron", "mnas"], Ks, steps, bool(a.steps), opt),
        ),
        (
            "continuous batching",
            False,
            lambda t: print(occupancy("fc", n, max(1, n // 4), device, a.data_root)),
        ),
    ]
    failed = 0
    for title, with_triton, run in sections:
        print(f"\n# {title}, at {time.perf_counter() - t0:.0f} s\n", flush=True)
        try:
            run(triton)
        except Exception:
            traceback.print_exc()
            failed += 1
            if not (triton and with_triton):
                continue
            print("\n# again without the Triton kernels\n", flush=True)
            try:
                run(False)
            except Exception:
                traceback.print_exc()
        sys.stdout.flush()
    print(f"\n# done in {time.perf_counter() - t0:.0f} s, {failed} sections failed")
    return failed


def tables(archs: list[str], Ks: list[int], steps: int, explicit: bool, opt: BenchOptions) -> None:
    """Print ``table`` for each architecture: ``steps`` timed steps for FC (and for every
    architecture if ``explicit``), else scaled by ``ARCH_STEPS``; MNAS at K up to
    ``MNAS_MAX_K`` (its rate saturates well below it: at K = 16 on the H200)."""
    for arch in archs:
        ks = [k for k in Ks if arch != "mnas" or k <= MNAS_MAX_K[opt.device.type]]
        n = steps if explicit or arch == "fc" else int(steps * ARCH_STEPS[arch])
        for line in table(arch, ks, max(n, 1), opt):
            print(line, flush=True)
        print()


def main(a: argparse.Namespace) -> int:
    device = resolve_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    archs = ["fc", "mnas", "perceptron"] if a.arch == "all" else [a.arch]
    Ks = a.K or DEFAULT_K[device.type]
    steps = a.steps or DEFAULT_STEPS[device.type]
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} CPU threads,"
        f" median of {a.repeats} repeats"
    )
    if a.suite:
        return 1 if suite(a, device, Ks, steps) else 0
    if a.check:
        print(check_graph_equivalence(device, a.data_root), flush=True)
        print(check_other_architectures(device, a.data_root), flush=True)
    if a.fill:
        print(fill_cost(a.fill, device, a.data_root))
        return 0
    if a.occupancy:
        print(occupancy("fc", a.occupancy, max(1, a.occupancy // 4), device, a.data_root))
        return 0
    opt = BenchOptions(
        device, a.repeats, a.synthetic, a.data_root, a.compile, tf32=a.tf32, triton=a.triton
    )
    if a.profile:
        for arch in archs:
            print(profile(arch, a.profile, opt), flush=True)
        return 0
    if a.run:
        print(f"## Engine.run against the hot loop ({device}, {a.run} steps)\n\n{RUN_HEADER}")
        for arch in archs:
            for K in Ks:
                print(run_row(arch, K, a.run, opt), flush=True)
        return 0
    if a.compile_cost:
        K = (a.K or [8])[0]
        print(
            f"## torch.compile: cost and gain per task ({device}, K = {K}, a fresh process)\n\n"
            "| arch | K | first compiled step | eager network-steps/s"
            " | compiled network-steps/s | gain | break-even member-steps |\n"
            "|---|---:|---:|---:|---:|---:|---:|"
        )
        for arch in archs:
            n = steps if a.steps or arch == "fc" else int(steps * ARCH_STEPS[arch])
            print(compile_cost(arch, K, max(n, 1), opt), flush=True)
        return 0
    if a.skip:
        K = (a.K or [8])[0]
        print(
            f"## perceptron d = 16 to zero loss, quiet-step skipping against plain steps"
            f" ({device}{', torch.compile' if a.compile else ''})\n\n"
            "| P | chi | K | most steps | plain | skipping | speed-up"
            " | simulated network-steps/s | members |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|"
        )
        for P in a.skip:
            print(skipping(P, a.chi, K, opt), flush=True)
        return 0
    tables(archs, Ks, steps, bool(a.steps), opt)
    return 0
