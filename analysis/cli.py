"""``python -m analysis report|reproduce``: argv -> `analysis.report.write_report` or
`analysis.reproduction.reproduce`."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m analysis", description="Figures and fits of a results cube."
    )
    sub = p.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="write every figure that applies and report.md")
    report.add_argument("store", help="path of the Zarr results cube")
    report.add_argument("--out", required=True, help="output folder (created if needed)")
    report.add_argument(
        "--experiments", default=None, help="groups to report, comma separated (default: all)"
    )
    _fit_options(report, formats="png,svg")
    repro = sub.add_parser(
        "reproduce", help="reproduction.md and one report per run of a manifest (TOML)"
    )
    repro.add_argument("manifest", help="TOML file of runs, e.g. docs/reproduction.toml")
    repro.add_argument(
        "--out", default="docs", help="writes OUT/reproduction.md and OUT/reproduction/<key>/"
    )
    repro.add_argument(
        "--skip-missing",
        action="store_true",
        help="for a run whose cube is absent, keep its section from an earlier call"
        " (marked with its date and analysis code) or note the absence, instead of failing",
    )
    repro.add_argument(
        "--only",
        default=None,
        help="run keys to regenerate, comma separated (default: all); the others keep their"
        " section from an earlier call, marked with its date and analysis code",
    )
    _fit_options(repro, formats="png")
    return p


def _fit_options(p: argparse.ArgumentParser, formats: str) -> None:
    p.add_argument(
        "--n-boot", type=int, default=200, help="bootstrap resamples over seeds (default 200)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the bootstrap Generator (default 0)"
    )
    p.add_argument(
        "--formats", default=formats, help=f"figure formats, comma separated (default {formats})"
    )


def _split(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    args = p.parse_args(argv)
    # imported after parsing: usage errors and --help come at once, without xarray or
    # matplotlib
    from analysis.load import CubeError
    from analysis.report import check_formats, write_report
    from analysis.reproduction import ManifestError, reproduce

    formats = _split(args.formats) or []
    try:
        check_formats(formats)
    except ValueError as exc:
        p.error(f"--formats: {exc}")
    if args.n_boot < 0:
        p.error(f"--n-boot must be >= 0, got {args.n_boot}")
    try:
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise NotADirectoryError(f"--out {args.out} exists and is not a folder")
        if args.command == "report":
            path = write_report(
                args.store,
                args.out,
                experiments=_split(args.experiments),
                n_boot=args.n_boot,
                seed=args.seed,
                formats=formats,
            )
        else:
            path = reproduce(
                args.manifest,
                args.out,
                skip_missing=args.skip_missing,
                only=_split(args.only),
                n_boot=args.n_boot,
                seed=args.seed,
                formats=formats,
                command="python -m analysis " + shlex.join(argv),
            )
    except (ManifestError, CubeError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
