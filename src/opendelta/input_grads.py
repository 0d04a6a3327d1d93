"""Gradient checkpointing with a frozen backbone: one shared hook per backbone that makes the input
embeddings' output require grad while any delta is attached.

With a frozen backbone no tensor entering a block requires grad, so re-entrant gradient
checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``) would return outputs that do
not require grad, and the deltas inside would get none. Marking the embedding output fixes that
for every method, at the cost of input gradients through the first block. Models that flag
checkpointing (transformers' ``gradient_checkpointing`` attributes) pay it only while it is on;
other models always (their checkpointing cannot be seen). Under ``torch.compile`` the hook stands
aside (it would break the graph): compile with ``use_reentrant=False``.

The hook is the same for every delta, so a backbone carries one, counted: each attached delta
holds an :class:`InputGradsHandle`, and removing the last handle removes the hook.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

import torch
from torch import nn

from opendelta.layer import first_tensor

_LOCK = threading.Lock()


class _SharedHook:
    """A backbone's input-grad hook, how many deltas hold it, and where it goes (kept between holds:
    finding the checkpointing flags walks the whole model). Modules are held weakly, so the
    registry never keeps a discarded backbone alive."""

    def __init__(self) -> None:
        self.handle: Any = None
        self.holders = 0
        self.embedding: weakref.ref[nn.Module] | None = None
        self.flags: list[weakref.ref[nn.Module]] = []


#: backbone -> its shared hook; weak, so a backbone that is dropped takes its entry with it
_HOOKS: weakref.WeakKeyDictionary[nn.Module, _SharedHook] = weakref.WeakKeyDictionary()


class InputGradsHandle:
    """One delta's hold on its backbone's input-grad hook; ``remove()`` lets go, once (the last
    holder removes the hook, leaving the embedding's hooks as they were)."""

    def __init__(self, shared: _SharedHook):
        self._shared: _SharedHook | None = shared

    def remove(self) -> None:
        shared, self._shared = self._shared, None
        if shared is None:
            return
        with _LOCK:
            shared.holders -= 1
            if shared.holders == 0:
                shared.handle.remove()
                shared.handle = None


def require_input_grads(backbone: nn.Module) -> InputGradsHandle | None:
    """Hold `backbone`'s input-grad hook (installing it if no delta holds it yet); None when the
    backbone has no input embeddings to hook."""
    with _LOCK:
        shared = _HOOKS.get(backbone)
        if shared is None or shared.holders == 0:
            embedding = _embedding_of(backbone)
            if embedding is None:
                return None
            shared = _HOOKS.setdefault(backbone, _SharedHook())
            flags = [ref() for ref in shared.flags]
            if shared.embedding is None or shared.embedding() is not embedding or None in flags:
                # first time, or the model got new embeddings
                flags = [m for m in backbone.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
                shared.embedding, shared.flags = weakref.ref(embedding), [weakref.ref(m) for m in flags]
            shared.handle = embedding.register_forward_hook(functools.partial(_output_requires_grad, flags))
        shared.holders += 1
        return InputGradsHandle(shared)


def _embedding_of(model: nn.Module) -> nn.Module | None:
    """The module whose output is the first hidden state: the input embeddings."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            found = get()
        except (NotImplementedError, AttributeError):
            found = None
        if isinstance(found, nn.Module):
            return found
    return next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def _output_requires_grad(flags: list[nn.Module], module: nn.Module, args: tuple, output: Any) -> Any:
    if not (module.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return output
    if flags and not any(m.gradient_checkpointing for m in flags):
        return output
    h = output if isinstance(output, torch.Tensor) else first_tensor(output)
    if h.is_floating_point() and not h.requires_grad:
        h.requires_grad_(True)
    return output
