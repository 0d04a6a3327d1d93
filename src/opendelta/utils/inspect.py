"""The original OpenDelta's ``opendelta.utils.inspect``: parameter statistics of a module or optimizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from opendelta.addressing import is_delta_module


def _unique(params: Any) -> list[nn.Parameter]:
    return list({id(p): p for p in params}.values())


def num_total_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in _unique(module.parameters()))


def num_trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in _unique(module.parameters()) if p.requires_grad)


def num_delta_parameters(module: nn.Module) -> int:
    """Parameters of the delta layers inside `module` (and any marked ``_is_delta``, as the original did)."""
    delta = {id(p): p for m in module.modules() if is_delta_module(m) for p in m.parameters()}
    delta.update({id(p): p for p in module.parameters() if getattr(p, "_is_delta", False)})
    return sum(p.numel() for p in delta.values())


def inspect_module_statistics(module: nn.Module, verbose: bool = True) -> dict[str, Any]:
    """Total, trainable and delta parameter counts and ratios of `module`, and CUDA memory in GB."""
    total = num_total_parameters(module)
    stat: dict[str, Any] = {"total_parameters": total, "trainable_parameters": num_trainable_parameters(module),
                            "delta_parameters": num_delta_parameters(module)}
    stat["trainable_ratio"] = stat["trainable_parameters"] / total if total else 0.0
    stat["delta_ratio"] = stat["delta_parameters"] / total if total else 0.0
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    stat["cudamem"] = torch.cuda.memory_allocated() / 1024**3 if cuda else 0.0
    stat["maxcudamem"] = torch.cuda.max_memory_allocated() / 1024**3 if cuda else 0.0
    if verbose:
        print(stat)
    return stat


def inspect_optimizer_statistics(optimizer: torch.optim.Optimizer, verbose: bool = True) -> dict[str, Any]:
    """Per parameter group of `optimizer`: total and trainable parameter counts and its settings."""
    stats: dict[str, Any] = {}
    for i, group in enumerate(optimizer.param_groups):
        params = group["params"]
        stat: dict[str, Any] = {"total_parameters": sum(p.numel() for p in params),
                                "trainable_parameters": sum(p.numel() for p in params if p.requires_grad)}
        total = stat["total_parameters"]
        stat["trainable_ratio"] = "{:.6f}%".format(100 * stat["trainable_parameters"] / total if total else 0.0)
        stat.update({k: v for k, v in group.items() if k != "params"})
        stats[f"param_group_{i}"] = stat
    if verbose:
        print(stats)
    return stats
