"""``python -m analysis report STORE --out DIR``: argv -> `analysis.report.write_report`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from analysis.report import write_report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m analysis", description="Figures and fits of a results cube."
    )
    sub = p.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="write every figure that applies and report.md")
    report.add_argument("store", help="path of the Zarr results cube")
    report.add_argument("--out", required=True, help="output folder (created if needed)")
    report.add_argument(
        "--n-boot", type=int, default=200, help="bootstrap resamples over seeds (default 200)"
    )
    report.add_argument(
        "--seed", type=int, default=0, help="seed of the bootstrap Generator (default 0)"
    )
    report.add_argument(
        "--formats", default="png,svg", help="figure formats, comma separated (default png,svg)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "report":
        path = write_report(
            args.store,
            args.out,
            n_boot=args.n_boot,
            seed=args.seed,
            formats=[f.strip() for f in args.formats.split(",") if f.strip()],
        )
        print(path)
    return 0
