"""The ``kama`` command line: ``kama reproduce`` and ``kama list``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        exp, dot, field = key.partition(".")
        if not sep or not dot or not exp or not field:
            raise SystemExit(f"kama: --set expects EXPERIMENT.FIELD=JSON, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(exp, {})[field] = parsed
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kama", description="KAMA-NNs: reproduce the paper's experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="run the registered experiments; write figures, CSVs and report.md")
    mode = rep.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="small, fast (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="the paper's protocol")
    rep.set_defaults(mode="quick")
    rep.add_argument("--only", nargs="+", metavar="NAME", help="run only these experiments (see `kama list`)")
    rep.add_argument("--out", default="results", help="output folder (default: results)")
    rep.add_argument("--set", action="append", default=[], metavar="EXP.FIELD=JSON",
                     help="override a config field, e.g. --set capacity.walks=200 (repeatable)")
    rep.add_argument("--force", action="store_true", help="recompute finished experiments")
    rep.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sub.add_parser("list", help="list the registered experiments and their configs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .experiments.runner import load_experiments, reproduce

    if args.command == "list":
        for name, exp in load_experiments().items():
            print(f"{name}: {exp.title}")
            for mode, cfg in exp.configs.items():
                print(f"  {mode}: {cfg}")
        return 0
    try:
        report = reproduce(mode=args.mode, only=args.only, out=args.out, overrides=_parse_set(args.set),
                           force=args.force, progress=not args.no_progress)
    except ValueError as e:
        print(f"kama: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
