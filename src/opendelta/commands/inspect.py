"""``opendelta inspect <model dir> [--delta <ckpt dir>]``: print the collapsed module tree of a local model."""

from __future__ import annotations

import argparse
import sys

from bigmodelvis import Visualization
from opendelta.auto import AutoDeltaModel
from opendelta.commands.local_model import load_local_model
from opendelta.checkpoint import read_meta
from opendelta.errors import CheckpointError, OpenDeltaError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="print the collapsed module tree of a local model",
        description="Print the bigmodelvis tree of a transformers model saved in a local directory, "
        "optionally with an opendelta checkpoint loaded so its delta modules show.",
    )
    parser.add_argument("model_dir", help="directory holding the model (config.json and weights)")
    parser.add_argument("--delta", metavar="CKPT_DIR", help="an opendelta checkpoint directory to load onto the model")
    parser.add_argument(
        "--model-class",
        default=None,
        help="the transformers class to load the model with (default: the class the --delta checkpoint was "
        "trained on, else AutoModel)",
    )
    parser.add_argument("--max-depth", type=int, default=None, help="show at most this many levels")


def trained_class(delta_dir: str) -> str | None:
    """The backbone class an opendelta checkpoint records (a PEFT folder or an old checkpoint records none)."""
    try:
        recorded = read_meta(delta_dir).get("backbone", {})
    except CheckpointError:
        return None
    return recorded.get("class") if isinstance(recorded, dict) else None


def run(args: argparse.Namespace) -> int:
    try:
        model_class = args.model_class or (trained_class(args.delta) if args.delta else None)
        model = load_local_model(args.model_dir, model_class)
        if args.delta:
            AutoDeltaModel.from_finetuned(args.delta, backbone_model=model)
    except OpenDeltaError as exc:
        print(f"opendelta inspect: {exc}", file=sys.stderr)
        return 2
    vis = Visualization(model, max_depth=args.max_depth)
    if sys.stdout.isatty():
        vis.structure_graph()
    else:  # full-width lines for pipes and files, where a terminal's width would wrap them
        sys.stdout.write(vis.export_text())
    return 0
