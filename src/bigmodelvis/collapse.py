"""Fold identical sibling subtrees of a summarised model into one node each."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bigmodelvis.names import compress_names
from bigmodelvis.summary import ModuleInfo, ParamInfo, ParamStatus


@dataclass
class VisNode:
    """One line of the collapsed tree; it stands for ``len(paths)`` identical modules."""

    label: str
    class_name: str
    paths: list[str]
    params: list[ParamInfo]
    counts: dict[ParamStatus, int]
    is_delta: bool
    roles: list[str]
    group_size: int = 1
    children: list[VisNode] = field(default_factory=list)

    @property
    def numel(self) -> int:
        """Parameters in the subtree of one of the modules this node stands for."""
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dicts of this node and its children."""
        return {
            "name": self.label,
            "class": self.class_name,
            "paths": list(self.paths),
            "group_size": self.group_size,
            "is_delta": self.is_delta,
            "roles": list(self.roles),
            "params": [_param_dict(p) for p in self.params],
            "numel": self.numel,
            "counts": {status.value: n for status, n in self.counts.items()},
            "children": [child.to_dict() for child in self.children],
        }


def _param_dict(p: ParamInfo) -> dict[str, Any]:
    out = {
        "name": p.name,
        "shape": list(p.shape),
        "dtype": str(p.dtype).removeprefix("torch."),
        "numel": p.numel,
        "status": p.status.value,
        "tied_to": p.tied_to,
    }
    if p.quantized is not None:  # the weight of a quantized linear layer: its format and stored bytes
        out.update(quantized=p.quantized, packed_bytes=p.packed_bytes)
    return out


def collapse(
    root: ModuleInfo,
    *,
    keep_non_params: bool = False,
    roles: Mapping[str, str] | None = None,
    max_depth: int | None = None,
    root_name: str = "root",
) -> VisNode:
    """Build the collapsed tree below ``root``.

    Siblings with equal signatures share one node whatever their position. A lone
    ``ModuleList``/``ModuleDict`` is not a line of its own: its children appear under its
    parent as ``layer 0-11``. Parameter-free subtrees are dropped unless ``keep_non_params``.
    """
    return _Collapser(keep_non_params, roles or {}, max_depth).node(root_name, [root], 0)


@dataclass
class _Collapser:
    keep_non_params: bool
    roles: Mapping[str, str]
    max_depth: int | None

    def node(self, label: str, members: list[ModuleInfo], depth: int) -> VisNode:
        first = members[0]
        paths = [m.path for m in members]
        node = VisNode(
            label=label,
            class_name=first.class_name,
            paths=paths,
            params=first.params,
            counts=first.counts,
            is_delta=first.is_delta,
            roles=list(dict.fromkeys(self.roles[p] for p in paths if p in self.roles)),
            group_size=len(members),
        )
        if self.max_depth is None or depth < self.max_depth:
            node.children = self.children(members, depth + 1, prefix="")
        return node

    def children(self, members: list[ModuleInfo], depth: int, prefix: str) -> list[VisNode]:
        """Group the children of identical ``members`` slot by slot, by signature."""
        slots: dict[int, list[int]] = {}
        for index, child in enumerate(members[0].children):
            if self.keep_non_params or child.param_tensors:
                slots.setdefault(child.signature, []).append(index)
        nodes: list[VisNode] = []
        for indices in slots.values():
            group = [m.children[i] for m in members for i in indices]
            first = group[0]
            if first.is_container and len(indices) == 1 and not first.params:
                inner = f"{prefix.rstrip()}.{first.name} " if prefix else f"{first.name} "
                nodes.extend(self.children(group, depth, prefix=inner))
                continue
            names = compress_names([members[0].children[i].name for i in indices])
            nodes.append(self.node(prefix + names, group, depth))
        return nodes
