"""``opendelta structure``: print the common-structure role mapping opendelta would use for a model.

    opendelta structure ./my-model-dir          # a local directory with a config.json
    opendelta structure --model-type llama      # a transformers model type, default config

The model is built on the ``meta`` device (no weights, no memory), so even a 70B config is instant.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Sequence

from torch import nn

from opendelta.errors import OpenDeltaError
from opendelta.structure import ROLES, find_backbones


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "structure",
        help="print the role mapping (attn.q, ffn.down, ...) for a model, and whether it is mapped or inferred",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("model_dir", nargs="?", help="a local model directory (holding config.json)")
    source.add_argument("--model-type", help="a transformers model type, built from its default config (e.g. llama)")
    parser.add_argument("--paths", action="store_true", help="list every module path instead of one line per role")
    return parser


def build_skeleton(model_dir: str | None, model_type: str | None) -> nn.Module:
    """The model of a local directory or of a model type's default config, on the meta device."""
    import torch
    import transformers

    if model_dir is not None:
        config = transformers.AutoConfig.from_pretrained(model_dir)
    else:
        known = list(transformers.CONFIG_MAPPING.keys())
        if model_type not in known:
            close = difflib.get_close_matches(model_type, known, n=5, cutoff=0.6)
            hint = f"did you mean {', '.join(map(repr, close))}?" if close else "see `transformers.CONFIG_MAPPING`"
            raise ValueError(f"unknown model type; {hint}")
        config = transformers.AutoConfig.for_model(model_type)
    architecture = next(iter(getattr(config, "architectures", None) or []), None)
    with torch.device("meta"):
        cls = getattr(transformers, architecture, None) if architecture else None
        if cls is not None:
            return cls(config)
        return transformers.AutoModel.from_config(config)


def _pattern(paths: Sequence[str]) -> str:
    """``model.layers.0.x`` and ``model.layers.1.x`` -> ``model.layers.*.x``."""
    shapes = list(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".*", p) for p in paths))
    return ", ".join(shapes)


def describe(model: nn.Module, list_paths: bool = False) -> str:
    """The text `opendelta structure` prints for `model`."""
    lines: list[str] = []
    for backbone in find_backbones(model):
        where = backbone.path or "(root)"
        source = "family table" if backbone.source == "table" else "inferred from the module tree"
        lines.append(f"{type(backbone.module).__name__} at {where}: model type {backbone.model_type!r}, {source}")
        width = max(len(r) for r in ROLES)
        for role in ROLES:
            paths = backbone.role_paths(role)
            if not paths:
                continue
            if list_paths:
                lines.extend(f"  {role:<{width}}  {p}" for p in paths)
            else:
                lines.append(f"  {role:<{width}}  {_pattern(paths)}  (x{len(paths)})")
        missing = [r for r in ROLES if not backbone.role_paths(r)]
        if missing:
            lines.append(f"  not present: {', '.join(missing)}")
        if backbone.notes:
            lines.append("  inference notes:")
            lines.extend(f"    {note}" for note in backbone.notes)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        model = build_skeleton(args.model_dir, args.model_type)
        print(describe(model, list_paths=args.paths))
    except OpenDeltaError as exc:
        print(f"opendelta structure: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError) as exc:
        what = args.model_dir or args.model_type
        print(f"opendelta structure: cannot build a model from {what!r}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="opendelta")
    register(_parser.add_subparsers(dest="command", required=True))
    sys.exit(run(_parser.parse_args(["structure", *sys.argv[1:]])))
