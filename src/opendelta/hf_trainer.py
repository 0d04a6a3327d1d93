"""Letting transformers' ``Trainer`` train deltas on a quantized backbone.

``Trainer.__init__`` refuses a quantized model (bitsandbytes, torchao...) that carries no adapters
("You cannot perform fine-tuning on purely quantized models"): its check
(``transformers.trainer_utils.validate_quantization_for_training``, transformers 5.x) accepts a
PEFT model or a model whose ``_hf_peft_config_loaded`` flag says adapters are attached, and nothing
else. A backbone with trainable opendelta deltas attached is such a model, so
:func:`quantized_training` raises that flag while the Trainer is built, and only then: outside the
block the model is exactly as it was, so ``save_pretrained`` (which reads the same flag to save
adapters in PEFT's format) and gradient checkpointing behave as on any model. Nothing of
transformers is patched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from opendelta.errors import LifecycleError
from opendelta.layer import DeltaLayer

_ADAPTERS_FLAG = "_hf_peft_config_loaded"  # what transformers' quantized-training check reads


def trainable_delta_parameters(model: nn.Module) -> int:
    """How many trainable parameters the delta layers attached to `model` hold."""
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, DeltaLayer):
            seen.update(id(p) for p in module.parameters() if p.requires_grad)
    return len(seen)


@contextmanager
def quantized_training(model: nn.Module) -> Iterator[nn.Module]:
    """Build a ``transformers.Trainer`` for a quantized `model` with trainable deltas inside this block::

        with quantized_training(model):
            trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()

    Raises LifecycleError when no attached delta has a trainable parameter (then the Trainer's
    refusal is right: there is nothing to train but quantized weights)."""
    if not trainable_delta_parameters(model):
        raise LifecycleError(
            f"{type(model).__name__} has no attached delta with trainable parameters, so a Trainer would train its "
            "quantized weights; attach a delta (e.g. LoraModel(model)) and call freeze_module(exclude=['deltas']) first."
        )
    had_flag = _ADAPTERS_FLAG in vars(model)
    before = vars(model).get(_ADAPTERS_FLAG)
    setattr(model, _ADAPTERS_FLAG, True)
    try:
        yield model
    finally:
        if had_flag:
            setattr(model, _ADAPTERS_FLAG, before)
        else:
            delattr(model, _ADAPTERS_FLAG)
