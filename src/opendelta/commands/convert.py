"""``opendelta convert``: rewrite a checkpoint folder of the original OpenDelta in opendelta's format.

    opendelta convert ./old_delta ./new_delta

The original saved ``config.json`` + ``pytorch_model.bin`` (a pickle); the new folder holds
``delta_config.json`` + a checksummed safetensors file. The pickle is read with
``torch.load(weights_only=True)``, which loads tensors only and runs no code.
"""

from __future__ import annotations

import argparse
import sys

from opendelta.errors import OpenDeltaError


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        help="rewrite an original OpenDelta checkpoint (config.json + pytorch_model.bin) as safetensors + JSON",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="the folder the original OpenDelta's save_finetuned wrote")
    parser.add_argument("out", help="the folder to write the opendelta checkpoint into")
    return parser


def run(args: argparse.Namespace) -> int:
    from opendelta.original_format import convert

    try:
        written = convert(args.source, args.out)
    except OpenDeltaError as exc:
        print(f"opendelta convert: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {written}; load it with AutoDeltaModel.from_finetuned({str(args.out)!r}, backbone_model=model)")
    return 0
