"""``opendelta demo``: delta-tune the real MiniLM on real tweets and show what it bought."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console

from opendelta.errors import OpenDeltaError
from opendelta.registry import known_delta_types


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="delta-tune the real MiniLM into a tweet sentiment classifier")
    parser.add_argument("--delta", default="lora", choices=known_delta_types(), help="delta method (default lora)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/demo", help="where the delta checkpoint is written")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    parser.add_argument("--no-tree", action="store_true", help="do not print the model tree")


def _check_writable(out: Path) -> str | None:
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if out.exists() and not out.is_dir():
        return f"--out {str(out)!r} exists and is not a directory"
    if not os.access(probe, os.W_OK):
        return f"--out {str(out)!r} is not writable"
    return None


def run(args: argparse.Namespace) -> int:
    from opendelta.demo import sentiment

    console = Console(stderr=args.json)
    problem = _check_writable(Path(args.out))
    if problem:
        print(f"opendelta demo: {problem}", file=sys.stderr)
        return 2
    try:
        result = sentiment.run(
            delta_type=args.delta,
            epochs=args.epochs,
            train_size=args.train_size,
            test_size=args.test_size,
            seed=args.seed,
            out=args.out,
            console=console,
            show_tree=not args.no_tree,
        )
    except (OpenDeltaError, OSError, ValueError) as exc:
        print(f"opendelta demo: {exc}", file=sys.stderr)
        return 1
    console.print(sentiment.summary_table(result))
    if args.json:
        print(json.dumps(sentiment.as_json(result)))
    return 0 if result.reload_identical else 1
