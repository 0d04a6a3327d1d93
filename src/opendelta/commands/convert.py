"""``opendelta convert``: rewrite a checkpoint folder of the original OpenDelta in opendelta's format.

    opendelta convert ./old_delta ./new_delta
    opendelta convert ./old_bitfit ./new_bitfit --model ./bert-base-cased

The original saved ``config.json`` + ``pytorch_model.bin`` (a pickle); the new folder holds
``delta_config.json`` + a checksummed safetensors file. The pickle is read with
``torch.load(weights_only=True)``, which loads tensors only and runs no code. A BitFit, parallel
adapter or soft prompt checkpoint says where its tensors belong only with its backbone: ``--model``
names the transformers model folder (its config.json is enough: the model is built on the meta
device, no weights are read).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

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
    parser.add_argument("--model", default=None, help="the backbone's transformers folder (for BitFit, parallel "
                        "adapter and soft prompt checkpoints); only its config.json is read")
    return parser


def backbone_skeleton(model_dir: str, backbone_class: str | None) -> Any:
    """The backbone class the original recorded (``backbone_class``, else AutoModel) built from
    the config in `model_dir` on the meta device: its modules, no weights."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    model_cls = getattr(transformers, backbone_class, None) if backbone_class else None
    if not (isinstance(model_cls, type) and hasattr(model_cls, "_from_config")):
        model_cls = transformers.AutoModel
    with torch.device("meta"):
        return model_cls.from_config(config) if model_cls is transformers.AutoModel else model_cls._from_config(config)


def run(args: argparse.Namespace) -> int:
    from opendelta.original_config import read_saved_config
    from opendelta.original_format import convert

    try:
        backbone = None
        if args.model is not None:
            backbone = backbone_skeleton(args.model, getattr(read_saved_config(args.source), "backbone_class", None))
        written = convert(args.source, args.out, backbone_model=backbone)
    except OSError as exc:
        print(f"opendelta convert: cannot read the model folder {args.model!r}: {exc}", file=sys.stderr)
        return 1
    except OpenDeltaError as exc:
        print(f"opendelta convert: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {written}; load it with AutoDeltaModel.from_finetuned({str(args.out)!r}, backbone_model=model)")
    return 0
