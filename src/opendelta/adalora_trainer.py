"""AdaLoRA under the Hugging Face Trainer: a callback that does what a hand-written loop does each step."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback


class AdaLoraCallback(TrainerCallback):
    """For ``Trainer(..., callbacks=[delta.trainer_callback()])`` with an AdaLoRA delta.

    Before each optimizer step it adds the gradient of ``delta.orthogonal_regularization()`` to the
    delta's gradients (what adding the term to the loss gives; here after the Trainer's gradient
    clipping, and the logged loss leaves it out); after the step, before the Trainer zeroes the
    gradients, it calls ``delta.update_and_allocate(step)`` with the number of steps done before it.
    """

    def __init__(self, delta: Any) -> None:
        self.delta = delta

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.delta.config.orth_reg_weight > 0:
            self.delta.orthogonal_regularization().backward()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.delta.update_and_allocate(state.global_step)
