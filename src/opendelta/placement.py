"""Detached layers follow the backbone's ``.to()`` moves: a delta out of the model (detached or
merged) records the dtype and device of what each of its modules computes in, and on return
moves its layers as the backbone moved meanwhile, as if they had stayed attached."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from opendelta.addressing import ancestors, backbone_modules
from opendelta.layer import DeltaLayer
from opendelta.targets import Target

Home = tuple[torch.dtype, torch.device]


class LayerHomes:
    """Where (dtype, device) each layer of one delta would live if it were in the backbone."""

    def __init__(self, backbone: nn.Module, targets: Mapping[str, Target], layers: Mapping[str, DeltaLayer]) -> None:
        self.backbone = backbone
        self.targets = targets
        self.layers = layers
        self._recorded: dict[str, Home | None] = {}  # path -> dtype, device when the layer left the model
        self._slots: dict[str, tuple[dict, str] | None] = {}  # path -> where home() looks

    def record(self, paths: Iterable[str]) -> None:
        """Note the homes of the layers at `paths` as they leave the model."""
        self._recorded = {path: self.home(path) for path in paths}

    def forget(self) -> None:
        self._recorded = {}

    def follow(self) -> None:
        """Move each layer as the backbone's ``.to()`` moved its module since record(): same device,
        and the new dtype if the dtype changed."""
        if not self._recorded:
            return
        with torch.inference_mode(False):  # a conversion under inference_mode would make untrainable tensors
            for path, layer in self.layers.items():
                before = self._recorded.get(path)
                now = self.home(path)
                if before is None or now is None or before == now:
                    continue
                if now[1] != before[1]:
                    layer.to(device=now[1])
                if now[0] != before[0]:
                    layer.to(dtype=now[0])
        self._recorded = {}

    def home(self, path: str) -> Home | None:
        """The dtype and device the layer at `path` follows (see :func:`_home_slot`; looked up once)."""
        slot = self._slots.get(path)
        t = slot[0].get(slot[1]) if slot is not None else None
        if t is None or not t.is_floating_point():
            slot = self._slots[path] = _home_slot(self.backbone, self.targets[path])
            if slot is None:
                return None
            t = slot[0][slot[1]]
        return t.dtype, t.device


def _home_slot(backbone: nn.Module, target: Target) -> tuple[dict, str] | None:
    """Where the first floating-point backbone tensor of the module a delta at `target` acts on lives
    (its ``_parameters`` or ``_buffers`` dict and key), or, for a module without one (an
    activation), that of its nearest ancestor with one: what flows through the module follows
    that tensor's dtype and device when the backbone is moved."""
    parents = [*list(ancestors(target.end))[1:], ""] if target.end else []
    # lazily: the first module that has a floating-point tensor ends the search
    for module in itertools.chain([target.module], (backbone.get_submodule(p) for p in parents)):
        for m in itertools.chain([module], (m for _, m in backbone_modules(module))):
            for tensors in (m._parameters, m._buffers):
                for key, t in tensors.items():
                    if t is not None and t.is_floating_point():
                        return tensors, key
    return None
