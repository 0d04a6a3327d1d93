"""What a delta reports about itself: parameter counts and the table log() prints."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from bigmodelvis import Visualization

if TYPE_CHECKING:
    from opendelta.delta_base import DeltaBase


def parameter_counts(delta: DeltaBase) -> dict[str, int]:
    """Numbers of parameters: ``total`` (backbone + deltas), ``trainable``, ``delta`` (this delta's)."""
    seen: set[int] = set()
    total = trainable = 0
    for p in delta.backbone_model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {"total": total, "trainable": trainable, "delta": sum(p.numel() for p in delta.delta_parameters())}


def log(
    delta: DeltaBase, console: Console | None = None, *, module: nn.Module | None = None, visualization: bool = True,
    cuda_memory: bool = True,
) -> None:
    """Print the tree of `module` (default: the backbone; ``visualization=False`` skips it), where
    `delta` sits, the trainable / delta parameter counts and ratios, and, on a GPU, its memory."""
    console = console or Console()
    if visualization:
        Visualization(delta.backbone_model if module is None else module, console=console).structure_graph()
    counts = parameter_counts(delta)
    table = Table(title=f"{type(delta).__name__} {delta.name!r} ({'attached' if delta.is_attached else 'detached'})")
    table.add_column("parameters")
    table.add_column("count", justify="right")
    table.add_column("of total", justify="right")
    for key in ("total", "trainable", "delta"):
        table.add_row(key, f"{counts[key]:,}", f"{100 * counts[key] / max(counts['total'], 1):.3f}%")
    console.print(table)
    console.print(f"{len(delta.layers)} modified modules: {', '.join(_compress(list(delta.layers)))}")
    if cuda_memory and torch.cuda.is_available() and torch.cuda.is_initialized():
        gib = 1024**3
        console.print(f"CUDA memory: {torch.cuda.memory_allocated() / gib:.2f} GiB now, "
                      f"{torch.cuda.max_memory_allocated() / gib:.2f} GiB at most")


def _compress(paths: list[str]) -> list[str]:
    """Short display form of many paths: group by their last two components."""
    counts: dict[str, int] = {}
    for path in paths:
        key = ".".join(path.split(".")[-2:])
        counts[key] = counts.get(key, 0) + 1
    return [f"{k} x{n}" if n > 1 else k for k, n in counts.items()]
