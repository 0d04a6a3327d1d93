"""Folding a delta into the weights of the modules it modifies (merge) and taking it out again
(unmerge), keeping the weights before the merge so unmerge restores them bit for bit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from opendelta.errors import LifecycleError, MergeError
from opendelta.layer import DeltaLayer
from opendelta.offload import check_mergeable
from opendelta.quantized import check_writable, is_quantized, packed_weight, restore_weight, write_weight
from opendelta.routing import OrderKey, add_delta, remove_delta
from opendelta.targets import Target

#: in a module's __dict__: names of the deltas merged into its weights, in merge order
MERGED_ATTR = "_opendelta_merged"
#: module path -> parameter name -> its value before the merge (a quantized weight: its packed bytes)
Saved = dict[str, dict[str, Any]]


def merge_layers(
    backbone: nn.Module, targets: Mapping[str, Target], layers: Mapping[str, DeltaLayer], name: str
) -> Saved:
    """Fold each layer into its module's weights and take the layer out of the data flow; return
    the weights before. Raises MergeError (nothing changed) for a layer that cannot merge or a
    weight tied to another module."""
    folded = folded_values(backbone, targets, layers)
    saved: Saved = {}
    with torch.no_grad():
        for path, values in folded.items():
            module = targets[path].site
            remove_delta(module, name)
            saved[path] = {}
            for key, value in values.items():
                saved[path][key] = _write(module, key, value)
            module.__dict__.setdefault(MERGED_ATTR, []).append(name)
    return saved


def folded_values(
    backbone: nn.Module, targets: Mapping[str, Target], layers: Mapping[str, DeltaLayer], *, requantized: bool = True
) -> Saved:
    """The merged values of each layer's module parameters (module path -> parameter name -> value), the
    model left as it is; MergeError for a layer that cannot merge or a weight tied to another module, or
    (`requantized`: the values are to be written into the layers) a quantized weight opendelta cannot
    re-quantize."""
    check_mergeable((path, targets[path].site) for path in layers)
    folded: Saved = {}
    with torch.no_grad():
        for path, layer in layers.items():
            folded[path] = layer.merged_parameters(targets[path].site)
    seen: dict[int, int] = {}
    for _, p in backbone.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    for path, values in folded.items():
        site = targets[path].site
        quantized_weight = "weight" in values and is_quantized(site)
        if quantized_weight and requantized:
            check_writable(site)

        def parameter(key: str) -> nn.Parameter:
            if key == "weight" and quantized_weight:
                return packed_weight(site)
            try:
                return site.get_parameter(key)
            except AttributeError:  # computed, not stored: a parametrization's property, a weight-norm hook's attribute
                raise MergeError(
                    f"{path}.{key} is computed from other tensors (e.g. by torch.nn.utils.parametrize), not stored as "
                    "a parameter, so there is nothing to merge into; keep this delta unmerged there, or remove the "
                    "parametrization first."
                ) from None

        shared = [key for key in values if seen.get(id(parameter(key)), 0) > 1]
        if shared:
            raise MergeError(
                f"{path}.{shared[0]} is tied to another module's parameter (e.g. an LM head tied to the input "
                "embeddings), so merging would change that module too; keep this delta unmerged there."
            )
    return folded


def _write(module: nn.Module, key: str, value: torch.Tensor) -> Any:
    """Write a merged value into the module's parameter `key`; return what _restore needs."""
    if key == "weight" and is_quantized(module):
        return write_weight(module, value)
    param = module.get_parameter(key)  # a nested name (MultiheadAttention's out_proj.weight) too
    before = param.detach().clone()
    param.copy_(value)
    return before


def _restore(module: nn.Module, key: str, before: Any) -> None:
    if key == "weight" and is_quantized(module):
        restore_weight(module, before)
    else:
        module.get_parameter(key).copy_(before)


def check_last_merged(targets: Mapping[str, Target], saved: Saved, name: str) -> None:
    """Raise LifecycleError unless delta `name` is the last one merged into each of its modules."""
    for path in saved:
        stack = targets[path].site.__dict__[MERGED_ATTR]
        if stack[-1] != name:
            raise LifecycleError(f"delta {stack[-1]!r} merged into {path} after {name!r}; unmerge {stack[-1]!r} first")


def unmerge_layers(
    targets: Mapping[str, Target], layers: Mapping[str, DeltaLayer], saved: Saved, name: str, order: OrderKey
) -> None:
    """Put the `saved` weights back and the layers into the data flow again (check_last_merged first)."""
    with torch.no_grad():
        for path, entry in saved.items():
            module = targets[path].site
            for key, original in entry.items():
                _restore(module, key, original)
            stack = module.__dict__[MERGED_ATTR]
            stack.pop()
            if not stack:
                del module.__dict__[MERGED_ATTR]
            add_delta(module, name, layers[path], order)
