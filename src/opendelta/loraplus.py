"""LoRA+ (Hayou et al., 2024): an optimizer whose LoRA B factors learn ``loraplus_lr_ratio`` times faster than A.

:func:`create_loraplus_optimizer` groups a model's trainable parameters as PEFT's helper of the same
name does: B factors and every 1-D tensor (biases, norms, DoRA magnitudes) at ``lr * ratio`` (without
weight decay where a name holds "bias" or the tensor sits in a LayerNorm), the layers of deltas on
embeddings at ``loraplus_lr_embedding``, and everything else (A factors, other delta tensors, an
unfrozen head's weights) at ``lr``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from opendelta.config import is_finite_number
from opendelta.delta_base import DeltaBase
from opendelta.errors import DeltaConfigError
from opendelta.layer import DeltaLayer


def loraplus_groups(model: nn.Module | DeltaBase) -> dict[str, dict[str, nn.Parameter]]:
    """The trainable parameters of `model` (a delta: its backbone) by LoRA+ group, each by its name:
    ``"A"``, ``"embedding"``, ``"B"`` and ``"B_no_decay"``."""
    module = model.backbone_model if isinstance(model, DeltaBase) else model
    if not isinstance(module, nn.Module):
        raise DeltaConfigError(f"create_loraplus_optimizer takes a model or a delta, got {type(model).__name__}.")
    no_decay = {id(p) for m in module.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    on_embedding = {
        id(p)
        for m in module.modules()
        if isinstance(m, nn.Embedding)
        for child in m.children()
        if isinstance(child, DeltaLayer)
        for p in child.parameters()
    }
    groups: dict[str, dict[str, nn.Parameter]] = {"A": {}, "embedding": {}, "B": {}, "B_no_decay": {}}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in on_embedding:
            groups["embedding"][name] = param
        elif "lora_B" in name or param.ndim == 1:
            groups["B_no_decay" if "bias" in name or id(param) in no_decay else "B"][name] = param
        else:
            groups["A"][name] = param
    return groups


def create_loraplus_optimizer(
    model: nn.Module | DeltaBase,
    optimizer_cls: type[torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_weight_decay: float = 0.0,
    loraplus_lr_embedding: float = 1e-6,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An `optimizer_cls` over `model`'s trainable parameters (a delta: its backbone's, after freeze_module)
    in LoRA+'s groups (see the module docstring); `kwargs` go to the optimizer."""
    for name, value in (("lr", lr), ("loraplus_lr_ratio", loraplus_lr_ratio), ("loraplus_lr_embedding", loraplus_lr_embedding)):
        if not is_finite_number(value) or value <= 0:
            raise DeltaConfigError(f"create_loraplus_optimizer: {name} must be a finite number > 0, got {value!r}.")
    if not is_finite_number(loraplus_weight_decay) or loraplus_weight_decay < 0:
        raise DeltaConfigError(f"create_loraplus_optimizer: loraplus_weight_decay must be a finite number >= 0, got {loraplus_weight_decay!r}.")
    groups = loraplus_groups(model)
    if not any(groups.values()):
        raise DeltaConfigError("create_loraplus_optimizer found no trainable parameter; call delta.freeze_module() first?")
    return optimizer_cls(
        [
            {"params": list(groups["A"].values()), "weight_decay": loraplus_weight_decay, "lr": lr},
            {"params": list(groups["embedding"].values()), "weight_decay": loraplus_weight_decay, "lr": loraplus_lr_embedding},
            {"params": list(groups["B"].values()), "weight_decay": loraplus_weight_decay, "lr": lr * loraplus_lr_ratio},
            {"params": list(groups["B_no_decay"].values()), "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
        ],
        lr=lr,
        **kwargs,
    )
