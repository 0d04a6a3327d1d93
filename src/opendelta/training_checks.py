"""A Trainer callback that catches deltas a training forward never runs.

Construction proves each delta's module is called by the backbone's forward, but a trainer may
train through another forward: TRL's SFTTrainer replaces ``model.forward`` by a fused LM head that
reads ``lm_head.weight`` directly, so a delta on ``lm_head`` itself gets no gradient and silently
stays as initialised. :class:`DeltaGradientCheck` looks at the first optimizer step and raises
naming every such module. Needs ``transformers`` (imported here, not by ``import opendelta``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from opendelta.errors import UnreachedModuleError

if TYPE_CHECKING:
    from opendelta.delta_base import DeltaBase


class DeltaGradientCheck(TrainerCallback):
    """``Trainer(..., callbacks=[DeltaGradientCheck(delta)])``: before the first optimizer step,
    every trainable parameter of `deltas` must have a gradient, else UnreachedModuleError.

    Pass the deltas every batch trains (in a multi-task run, a task absent from the first batch has
    no gradient yet); engines that keep gradients outside ``param.grad`` (DeepSpeed ZeRO) are not
    supported."""

    def __init__(self, *deltas: DeltaBase) -> None:
        self.deltas = deltas
        self.checked = False

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.checked:
            return
        self.checked = True
        missed = [
            f"{delta.name}: {path!r}"
            for delta in self.deltas
            for path, layer in delta.layers.items()
            if any(p.requires_grad and p.grad is None for p in layer.parameters())
        ]
        if missed:
            raise UnreachedModuleError(
                f"the training forward gave no gradient to the delta on {', '.join(missed)}: it never ran its module "
                "(TRL's SFTTrainer, for one, reads lm_head.weight directly instead of calling lm_head). Put the "
                "delta on modules the training forward calls."
            )
