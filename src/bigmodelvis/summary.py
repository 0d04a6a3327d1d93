"""Read a model once into plain records: parameters, statuses, counts and subtree signatures."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from opendelta.quantized import QuantizedWeight


class ParamStatus(str, Enum):
    """What a parameter is for the person tuning the model."""

    TRAINABLE = "trainable"
    FROZEN = "frozen"
    DELTA = "delta"


@dataclass(frozen=True)
class ParamInfo:
    """One parameter registered directly on a module."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    numel: int
    status: ParamStatus
    tied_to: str | None = None  # full name of the same tensor met earlier; counted there only
    quantized: str | None = None  # the packed weight of a quantized linear layer: its format (nf4, int8...)
    packed_bytes: int | None = None  # what that packed weight stores, codes and quantization statistics


@dataclass
class ModuleInfo:
    """One module, its own parameters, its children and the totals of its subtree.

    ``signature`` is a small integer equal for two modules exactly when their subtrees are
    identical: same class, same child names and structure, same parameter names, shapes,
    dtypes and statuses.
    """

    name: str
    path: str
    class_name: str
    is_delta: bool
    is_container: bool
    params: list[ParamInfo]
    children: list[ModuleInfo] = field(default_factory=list)
    signature: int = -1
    counts: dict[ParamStatus, int] = field(default_factory=dict)
    param_tensors: int = 0

    @property
    def numel(self) -> int:
        """Parameters in the whole subtree, each tied tensor counted once."""
        return sum(self.counts.values())


def is_delta_module(module: nn.Module) -> bool:
    """True for modules whose class declares ``is_delta_module = True`` (duck-typed)."""
    return getattr(type(module), "is_delta_module", False) is True


def summarize(model: nn.Module) -> ModuleInfo:
    """Walk ``model`` once and return its root ``ModuleInfo`` with signatures and counts."""
    interned: dict[tuple, int] = {}
    seen_params: dict[int, str] = {}
    return _summarize(model, "", "", False, interned, seen_params)


def _summarize(
    module: nn.Module,
    name: str,
    path: str,
    inside_delta: bool,
    interned: dict[tuple, int],
    seen_params: dict[int, str],
) -> ModuleInfo:
    own_delta = is_delta_module(module)
    delta = inside_delta or own_delta
    quantized = _quantized(module)
    params = []
    for param_name, param in module.named_parameters(recurse=False):
        full_name = f"{path}.{param_name}" if path else param_name
        first_name = seen_params.setdefault(id(param), full_name)
        if delta:
            status = ParamStatus.DELTA
        elif param.requires_grad:
            status = ParamStatus.TRAINABLE
        else:
            status = ParamStatus.FROZEN
        tied_to = None if first_name == full_name else first_name
        if quantized is not None and param_name == quantized.param:
            # shown as the linear layer's weight it stands for, not as the packed codes' shape and dtype
            shape = quantized.shape
            params.append(ParamInfo(
                param_name, shape, quantized.compute_dtype, shape[0] * shape[1], status, tied_to,
                quantized.format, quantized.packed_bytes,
            ))
            continue
        params.append(
            ParamInfo(param_name, tuple(param.shape), param.dtype, param.numel(), status, tied_to)
        )
    info = ModuleInfo(
        name=name,
        path=path,
        class_name=type(module).__name__,
        is_delta=own_delta,
        is_container=isinstance(module, (nn.ModuleList, nn.ModuleDict)),
        params=params,
    )
    counts: dict[ParamStatus, int] = {}
    tensors = len(params)
    for p in params:
        if p.tied_to is None:
            counts[p.status] = counts.get(p.status, 0) + p.numel
    for child_name, child in module.named_children():
        child_path = f"{path}.{child_name}" if path else child_name
        child_info = _summarize(child, child_name, child_path, delta, interned, seen_params)
        info.children.append(child_info)
        tensors += child_info.param_tensors
        for status, n in child_info.counts.items():
            counts[status] = counts.get(status, 0) + n
    info.counts = counts
    info.param_tensors = tensors
    # Children contribute their interned ids, so each key is flat and hashing stays linear.
    key = (
        type(module).__module__,
        type(module).__qualname__,
        info.is_delta,
        tuple((p.name, p.shape, p.dtype, p.status, p.tied_to, p.quantized, p.packed_bytes) for p in params),
        tuple((c.name, c.signature) for c in info.children),
    )
    info.signature = interned.setdefault(key, len(interned))
    return info


def _quantized(module: nn.Module) -> QuantizedWeight | None:
    """opendelta's view of a quantized linear layer (bitsandbytes, torchao, hqq), or None. opendelta
    is imported only once a quantization library is, so plain models never load it."""
    if not any(library in sys.modules for library in ("bitsandbytes", "torchao", "hqq")):
        return None
    from opendelta.quantized import describe  # the quantization knowledge is opendelta's

    return describe(module)
