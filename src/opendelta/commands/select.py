"""``opendelta select <model dir>``: pick modules on a local web page and print the patterns."""

from __future__ import annotations

import argparse
import sys

from opendelta.commands.local_model import load_local_model
from opendelta.errors import OpenDeltaError, SelectionCancelled, SelectionError, SelectionTimeout
from opendelta.interactive import select_modules
from opendelta.interactive.server import python_list


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "select",
        help="pick modules by clicking the model tree in a local web page",
        description="Serve the collapsed module tree of a local model on 127.0.0.1; the modules you "
        "click become the shortest exact modified_modules list, printed on submit.",
    )
    parser.add_argument("model_dir", help="directory holding the model (config.json and weights)")
    parser.add_argument("--port", type=int, default=None, help="port to listen on (default: a free one)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for a submission (default 600)")
    parser.add_argument("--no-browser", action="store_true", help="only print the URL, do not open a browser")


def run(args: argparse.Namespace) -> int:
    try:
        model = load_local_model(args.model_dir)
    except OpenDeltaError as exc:
        print(f"opendelta select: {exc}", file=sys.stderr)
        return 2
    try:
        patterns = select_modules(model, port=args.port, timeout=args.timeout, open_browser=not args.no_browser)
    except (SelectionCancelled, SelectionTimeout) as exc:
        print(f"opendelta select: {exc}", file=sys.stderr)
        return 1
    except SelectionError as exc:
        print(f"opendelta select: {exc}", file=sys.stderr)
        return 2
    print("\n".join(patterns))
    print(f"\nmodified_modules={python_list(patterns)}")
    return 0
