"""Command line: argv -> spec -> library call; nothing else lives here."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import signal
import sys


def _floats(name: str):
    def parse(text: str) -> list[float]:
        try:
            return [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--{name} takes comma-separated numbers, got {text!r}"
            ) from None

    return parse


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _counts(text: str) -> list[int]:
    """Comma-separated integers >= 1 (ensemble sizes, training set sizes)."""
    values = _ints(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _count(text: str) -> int:
    """One integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _cmd_train(a: argparse.Namespace) -> int:
    from ensemble.spec import Experiment

    # the checks and defaults of a sweep file's experiment (named "train" in errors),
    # before torch is imported: a bad value is refused at once
    given = {"L": a.L, "activation": a.activation, "d": a.d, "chi": a.chi}
    settings = {k: v for k, v in given.items() if v is not None}
    h = a.h if a.h is not None else (1 if a.arch == "perceptron" else 128)
    settings |= dict(dataset=a.dataset, arch=a.arch, h=h, B=a.B, pte=a.pte)
    settings |= dict(max_steps=a.max_steps, dtype=a.dtype, ntk_points=a.ntk_points)
    exp = Experiment("train", settings, tuple(a.alpha), tuple(a.T), (a.P,), tuple(a.seeds))
    group = dataclasses.replace(exp.group(a.P), data_root=a.data_root)
    members = [c.member() for c in exp.cells()]
    from ensemble.engine import Engine, default_slots, resolve_device
    from ensemble.launch import check_options, check_shares
    from ensemble.schema import OUTCOME_FLAGS

    check_options(device=a.device, slots=a.slots, local=True)
    device = resolve_device(a.device)
    n = len(members)
    k = min(a.slots, n) if a.slots is not None else default_slots(group, device, n)
    engine = Engine(group, k, device, compile=a.compile)
    results = engine.run(members)
    head = f"{'alpha':>10} {'T':>10} {'seed':>4} {'outcome':>10} {'steps':>8} {'t*':>10}"
    ntk = group.ntk_points > 0
    print(head + f" {'test_err':>8} {'rel_change':>10} {'unfitted':>8}" + " ntk_change" * ntk)
    for r in results:
        m = r.member
        print(
            f"{m.alpha:>10.4g} {m.T:>10.4g} {m.seed:>4d} {OUTCOME_FLAGS[r.outcome]:>10}"
            f" {r.steps:>8d} {r.t_star:>10.4g} {r.test_error:>8.4f} {r.rel_change:>10.4g}"
            f" {r.n_unfitted:>8.0f}" + (f" {r.ntk_change:>10.4g}" if ntk else "")
        )
    s = engine.stats
    print(
        f"# {len(results)} members on {device} with {k} slots in {s.seconds:.1f} s,"
        f" {s.member_steps / s.seconds:.0f} network-steps/s, occupancy {s.occupancy:.0%},"
        f" {check_shares(s.check_seconds, s.checkpoint_seconds, s.seconds)}"
    )
    return 0


def _cmd_run(a: argparse.Namespace) -> int:
    from ensemble.launch import dry_run, launch

    if a.dry_run:
        from ensemble.cluster import default_workers

        workers = default_workers() if a.workers is None else a.workers
        print(dry_run(a.sweep, a.store, workers, a.max_members, a.device, a.slots, a.data_root))
        return 0
    monitor = None
    if not a.no_monitor:
        from ensemble.monitor import SweepMonitor as monitor  # noqa: N813
    tree = launch(
        a.sweep,
        a.store,
        scheduler=a.scheduler,
        n_workers=a.workers,
        device=a.device,
        slots=a.slots,
        max_members=a.max_members,
        data_root=a.data_root,
        compile=a.compile,
        dashboard_address=a.dashboard_address,
        monitor=monitor,
        command="python -m ensemble " + shlex.join(a.argv),
    )
    failed = tree.attrs["launch_report"]["cells_failed"]
    if failed:
        print(
            f"{failed} cells failed (see above); rerun the command to retry them", file=sys.stderr
        )
    return 1 if failed else 0


def _cmd_status(a: argparse.Namespace) -> int:
    from ensemble.launch import store_status

    print(store_status(a.store, estimates=a.estimates))
    if a.html:
        from ensemble.monitor import write_status_html

        print(f"wrote {write_status_html(a.store, a.html)}")
    return 0


def _cmd_fetch(a: argparse.Namespace) -> int:
    from ensemble.data import fetch_data

    names = ["mnist", "cifar10"] if a.dataset == "all" else [a.dataset]
    for name in names:
        print(f"{name}: {fetch_data(name, a.root)}")
    return 0


def _cmd_sweeps(a: argparse.Namespace) -> int:
    from ensemble.spec import load_sweep, shipped_sweeps

    for name in shipped_sweeps():
        s = load_sweep(name)
        print(f"{name:28s} {len(s.cells()):>7d} cells  {s.description}")
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    from ensemble.bench import main as bench_main

    return bench_main(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ensemble",
        description="Batched-ensemble simulator of SGD (Sclocchi, Geiger & Wyart 2023).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one ensemble and print each member's results")
    t.add_argument("--dataset", default="mnist", help="mnist | cifar10 | perceptron")
    t.add_argument("--arch", default="fc", help="fc | mnas | perceptron")
    t.add_argument("--L", type=int, default=None, help="hidden layers of FC-L (default 5)")
    t.add_argument("--h", type=int, default=None, help="width (default 128; the perceptron's is 1)")
    t.add_argument("--activation", default=None, help="relu | gelu (default relu)")
    t.add_argument("--P", type=int, default=1024, help="training set size")
    t.add_argument("--B", type=int, default=16, help="batch size")
    t.add_argument("--pte", type=int, default=2048, help="test set size")
    t.add_argument("--d", type=int, default=None, help="perceptron dimension (required there)")
    t.add_argument(
        "--chi", type=float, default=None, help="perceptron depletion exponent (default 0)"
    )
    t.add_argument("--alpha", type=_floats("alpha"), default=[2.0**15], help="e.g. 1,32768")
    t.add_argument("--T", type=_floats("T"), default=[2.0**-8], help="e.g. 0.001,0.01")
    t.add_argument("--seeds", type=_ints, default=[0], help="e.g. 0,1,2")
    t.add_argument("--max-steps", type=int, default=1_000_000)
    t.add_argument("--dtype", default="float32", help="float32 | float64")
    t.add_argument(
        "--ntk-points",
        type=int,
        default=0,
        help="measure the NTK change on the first N test points (default 0: not measured)",
    )
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: auto)")
    t.add_argument("--slots", type=int, default=None, help="members trained at once")
    t.add_argument("--compile", action="store_true", help="CPU: torch.compile the SGD step")
    t.add_argument(
        "--data-root", default=None, help="dataset folder (default $ENSEMBLE_DATA or data/)"
    )
    t.set_defaults(func=_cmd_train)

    r = sub.add_parser("run", help="run a sweep into a Zarr cube on Dask (resumable)")
    r.add_argument("sweep", help="a sweep .toml file or the name of a shipped sweep")
    r.add_argument("--store", required=False, default=None, help="Zarr store, e.g. results/x.zarr")
    r.add_argument("--scheduler", default=None, help="address of a running Dask scheduler")
    r.add_argument("--workers", type=int, default=None, help="workers of the embedded cluster")
    r.add_argument("--device", default=None, help="torch device for every task (default: auto)")
    r.add_argument("--slots", type=int, default=None, help="members trained at once per task")
    r.add_argument(
        "--max-members",
        type=int,
        default=None,
        help="most members per task (default 256 on CPUs; on GPUs one task per P and GPU)",
    )
    r.add_argument("--data-root", default=None)
    r.add_argument("--compile", action="store_true", help="CPU: torch.compile the SGD step")
    r.add_argument("--dashboard-address", default=":8787")
    r.add_argument("--no-monitor", action="store_true", help="no sweep page in the dashboard")
    r.add_argument(
        "--dry-run", action="store_true", help="print the plan and its cost, run nothing"
    )
    r.set_defaults(func=_cmd_run)

    s = sub.add_parser("status", help="what is done and missing in a cube")
    s.add_argument("store")
    s.add_argument("--html", default=None, help="also write the sweep page as a static HTML file")
    s.add_argument(
        "--estimates",
        action="store_true",
        help="also compare the steps taken with the planner's estimates",
    )
    s.set_defaults(func=_cmd_status)

    f = sub.add_parser("fetch-data", help="download MNIST / CIFAR-10 into the data root")
    f.add_argument("--dataset", default="all", choices=["mnist", "cifar10", "all"])
    f.add_argument("--root", default=None, help="data root (default $ENSEMBLE_DATA or data/)")
    f.set_defaults(func=_cmd_fetch)

    w = sub.add_parser("sweeps", help="list the shipped sweep files")
    w.set_defaults(func=_cmd_sweeps)

    b = sub.add_parser("bench", help="network-steps/s of ensembles vs one network at a time")
    b.add_argument("--arch", default="all", choices=["fc", "mnas", "perceptron", "all"])
    b.add_argument(
        "--K",
        type=_counts,
        default=None,
        help="ensemble sizes, e.g. 1,8,64,256 (MNAS: those up to 16 on the CPU, 256 on CUDA)",
    )
    b.add_argument("--steps", type=_count, default=None, help="timed steps per measurement")
    b.add_argument("--device", default=None)
    b.add_argument("--repeats", type=_count, default=3, help="repeats; the median is reported")
    b.add_argument("--data-root", default=None)
    b.add_argument("--synthetic", action="store_true", help="random inputs of the data's shape")
    b.add_argument("--compile", action="store_true", help="CPU: torch.compile the SGD step")
    b.add_argument(
        "--compile-cost",
        action="store_true",
        help="CPU: time the first compiled step and the break-even work of --compile",
    )
    b.add_argument(
        "--threads", type=_count, default=None, help="torch CPU threads (Dask workers use 1)"
    )
    b.add_argument("--check", action="store_true", help="first check graph/eager/alone equality")
    b.add_argument(
        "--suite",
        action="store_true",
        help="the whole device report: --check, the tables, --run and --occupancy in one run",
    )
    b.add_argument(
        "--triton",
        action="store_true",
        help="FC: the fused step in Triton kernels (CUDA), against the torch fused step",
    )
    b.add_argument(
        "--fill",
        type=int,
        default=0,
        metavar="K",
        help="time filling K slots one member at a time and all at once, then stop",
    )
    b.add_argument(
        "--occupancy",
        type=int,
        default=0,
        metavar="N",
        help="compare continuous and static batching on N members, then stop",
    )
    b.add_argument(
        "--skip",
        type=_counts,
        default=None,
        metavar="P,P,...",
        help="perceptron to zero loss at these P, quiet-step skipping against plain steps",
    )
    b.add_argument("--chi", type=float, default=0.0, help="--skip: depletion exponent")
    b.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 matmuls and convs")
    b.add_argument(
        "--run",
        type=int,
        default=0,
        metavar="STEPS",
        help="time Engine.run (fill, checks, checkpoints) of K members against the hot loop",
    )
    b.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="K",
        help="CUDA: the kernels of one eager step of K members (torch.profiler), then stop",
    )
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    from ensemble.cells import EnsembleError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded with the launch (ensemble.schema.LAUNCHES_ATTR)
    if args.command == "run" and not args.dry_run and not args.store:
        print("error: run needs --store (a Zarr path) unless --dry-run", file=sys.stderr)
        return 2
    if args.command == "run" and not args.dry_run:
        # a batch system's stop (SIGTERM, e.g. SLURM at the time limit, or `timeout`)
        # interrupts the launch like Ctrl-C: what arrived is written, the launch recorded
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args)
    except EnsembleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if args.command != "run":
            raise
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        n = getattr(exc, "cells_written", 0)  # set by a launch interrupted while training
        kept = (
            f"{n} cell{'s' * (n != 1)} written, the rest still missing" if n else "no cell written"
        )
        print(
            f"interrupted ({signal.Signals(signum).name}): {kept};"
            " rerun the same command to train the rest",
            file=sys.stderr,
        )
        return 128 + signum


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signum)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
