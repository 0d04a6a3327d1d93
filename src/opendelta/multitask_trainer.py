"""Multi-task training in one Hugging Face ``Trainer`` run: each row of a batch trains its own task's delta.

:class:`TaskRouting` composes with the stock ``transformers.Trainer``; it is both pieces the Trainer
takes::

    routing = TaskRouting(model, {"sentiment": lora_a, "topic": lora_b})   # deltas attached, frozen backbone
    Trainer(model=model, args=TrainingArguments(..., remove_unused_columns=False),
            train_dataset=rows_with_a_task_column, data_collator=routing.collate, callbacks=[routing]).train()

- ``routing.collate`` takes the task column out of every row and collates the rest (with
  ``transformers.default_data_collator``, or the collator given); the batch carries the rows' task
  indices under :data:`ROWS_KEY`.
- A forward pre-hook on the model takes :data:`ROWS_KEY` out of the call and runs the forward as a
  :func:`~opendelta.mixed_batch` (row ``i`` through its task's delta only), so the gradient of a row
  reaches only its task's delta; the mix ends when the forward returns (a forward hook).
- At every checkpoint the callback writes each delta, in opendelta's format, to
  ``checkpoint-N/deltas/<task>/``; the Trainer's own ``model.safetensors`` holds the trainable
  tensors only (``freeze_module(set_state_dict=True)``), so ``resume_from_checkpoint`` restores every
  delta and the run continues as if never interrupted.

A row whose task has no delta is a :class:`~opendelta.MixedBatchError`. Gradient checkpointing
recomputes layers after the forward has returned, outside the mix, so it is refused.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, default_data_collator
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from opendelta.delta_base import DeltaBase
from opendelta.errors import MixedBatchError
from opendelta.multitask import MultiTask, mixed_batch

#: the batch key (and forward keyword) carrying each row's task index; the pre-hook removes it
ROWS_KEY = "opendelta_task_rows"
#: the folder inside each Trainer checkpoint that holds one delta folder per task
DELTAS_FOLDER = "deltas"


def _check_task_name(task: Any) -> None:
    if not isinstance(task, str) or not task or task in (".", "..") or any(c in task for c in "/\\\0"):
        raise MixedBatchError(
            f"task names become checkpoint folder names, so each must be a plain non-empty name without '/' or '\\\\', "
            f"got {task!r}"
        )


def _checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient (activation) checkpointing is on (its newer name first: the old one warns)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


class TaskRouting(TrainerCallback):
    """Routes each row of a Trainer's batches to the delta of the task its `task_column` names.

    `deltas` maps task names to deltas attached (and unmerged) on `model`; build them, and call
    ``freeze_module(exclude=["deltas"], set_state_dict=True)``, before this. `collator` collates the
    rows once the task column is out (default ``transformers.default_data_collator``). The hooks it
    installs on `model` stay until :meth:`remove` (or the end of a ``with`` block).
    """

    def __init__(
        self,
        model: nn.Module,
        deltas: Mapping[str, DeltaBase],
        task_column: str = "task",
        collator: Callable[[list[Any]], dict[str, Any]] | None = None,
    ):
        if not isinstance(deltas, Mapping) or not deltas:
            raise MixedBatchError("deltas must be a non-empty dict of task name -> delta, e.g. {'sentiment': lora_a}")
        for task in deltas:
            _check_task_name(task)
        if not isinstance(task_column, str) or not task_column:
            raise MixedBatchError(f"task_column must be the name of the dataset column holding each row's task, got {task_column!r}")
        self.tasks = MultiTask(model, dict(deltas))  # checks each is a delta on `model`
        self.model = model
        self.task_column = task_column
        self.collator = collator or default_data_collator
        self._index = {task: i for i, task in enumerate(self.tasks.deltas)}
        self._open = threading.local()  # per thread: the mixed batches its forwards opened, innermost last
        self._handles = [
            model.register_forward_pre_hook(self._enter, with_kwargs=True, prepend=True),
            model.register_forward_hook(self._leave, always_call=True),
        ]

    @property
    def deltas(self) -> list[DeltaBase]:
        """The deltas, in the order of their task indices."""
        return list(self.tasks.deltas.values())

    # ----------------------------------------------------------------- the data collator

    def collate(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Collate `features` without their task column; the batch's :data:`ROWS_KEY` holds their task indices."""
        rows, rest = [], []
        for i, feature in enumerate(features):
            if not isinstance(feature, Mapping) or self.task_column not in feature:
                raise MixedBatchError(
                    f"row {i} of the batch has no {self.task_column!r} column; keep it in the dataset and pass "
                    "TrainingArguments(remove_unused_columns=False), or the Trainer drops it before collation"
                )
            task = feature[self.task_column]
            if task not in self._index:
                raise MixedBatchError(
                    f"row {i} of the batch is of task {task!r}, which has no delta; tasks with a delta: "
                    f"{', '.join(map(repr, self._index))}. Add a delta for it or filter those rows out."
                )
            rows.append(self._index[task])
            rest.append({k: v for k, v in feature.items() if k != self.task_column})
        batch = dict(self.collator(rest))
        batch[ROWS_KEY] = torch.tensor(rows, dtype=torch.long)
        return batch

    # ----------------------------------------------------------------- the forward hooks

    def _stack(self) -> list[Any]:
        if not hasattr(self._open, "stack"):
            self._open.stack = []
        return self._open.stack

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        stack = self._stack()
        stack.append(None)  # popped by _leave, which runs even when this hook raises
        if ROWS_KEY not in kwargs:
            return None
        rows = kwargs.pop(ROWS_KEY)
        if module.training and torch.is_grad_enabled() and _checkpointing(module):
            raise MixedBatchError(
                "gradient checkpointing recomputes layers during backward, after the mixed batch has ended, so those "
                "layers would run every task's delta on every row; turn it off for multi-task training"
            )
        mix = mixed_batch(self.deltas, rows)
        mix.__enter__()
        stack[-1] = mix
        return args, kwargs

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        stack = self._stack()
        mix = stack.pop() if stack else None
        if mix is not None:
            mix.__exit__(None, None, None)

    def remove(self) -> None:
        """Take the hooks off the model (once or more often; the model is then as before)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> TaskRouting:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    # ----------------------------------------------------------------- the Trainer callback

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if args.remove_unused_columns:
            raise MixedBatchError(
                f"TaskRouting needs the {self.task_column!r} column in every row, but the Trainer removes columns its "
                "model's forward does not take; pass TrainingArguments(remove_unused_columns=False)"
            )

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / DELTAS_FOLDER
        self.save_deltas(folder)

    def save_deltas(self, folder: str | os.PathLike) -> dict[str, str]:
        """Save every task's delta to ``folder/<task>/``; returns task -> path."""
        return {task: delta.save_finetuned(Path(folder) / task) for task, delta in self.tasks.deltas.items()}


__all__ = ["DELTAS_FOLDER", "ROWS_KEY", "TaskRouting"]
