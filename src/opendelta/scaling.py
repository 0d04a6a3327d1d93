"""Scaling a delta at run time: ``h + scale * m(h)`` instead of ``h + m(h)``, without touching its tensors.

``delta.scale(0.5)`` sets the scale on every layer of the delta and returns a :class:`ScaleHandle`:
the scale stays until ``handle.remove()``, and ``with delta.scale(0.5): ...`` puts the previous scale
back on leaving the block. At 1.0 each layer runs its own route, so the outputs are the trained
delta's bit for bit. Per-row scales in a mixed batch: ``mixed_batch(deltas, rows, scales=...)``.
The scale is a run-time setting: checkpoints, merging and arithmetic use the trained tensors, so
merge() refuses a scaled delta rather than fold in something other than what runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opendelta.config import is_finite_number
from opendelta.errors import DeltaConfigError, LifecycleError, UnsupportedModuleError

if TYPE_CHECKING:
    from opendelta.delta_base import DeltaBase


class ScaleHandle:
    """The scale :func:`set_scale` set; ``remove()`` (once or more, or leaving a ``with`` block) puts back
    the scale it replaced."""

    def __init__(self, delta: DeltaBase, previous: dict[str, float]):
        self.delta = delta
        self._previous: dict[str, float] | None = previous

    def remove(self) -> None:
        if self._previous is not None:
            for path, value in self._previous.items():
                self.delta.layers[path].change_scale = value
            self._previous = None

    def __enter__(self) -> ScaleHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def set_scale(delta: DeltaBase, value: float) -> ScaleHandle:
    """Scale every layer of `delta` by `value` from now on; the handle undoes it."""
    if not is_finite_number(value):
        raise DeltaConfigError(f"a delta's scale must be a finite number, got {value!r} (1.0 runs the delta as trained)")
    if delta.is_merged:
        raise LifecycleError(f"delta {delta.name!r} is merged into the weights at scale 1.0; unmerge() it before scaling")
    fixed = {type(layer): layer.unscalable_reason() for layer in delta.layers.values() if not layer.scalable()}
    if fixed:
        why = "; ".join(f"its {cls.__name__} layers {reason}" for cls, reason in sorted(fixed.items(), key=lambda kv: kv[0].__name__))
        raise UnsupportedModuleError(
            f"delta {delta.name!r} cannot be scaled, as there is nothing to scale: {why}. Scale additive deltas "
            "(LoRA on linear, embedding and convolution layers, adapters, IA3, BitFit...)."
        )
    previous = {path: layer.change_scale for path, layer in delta.layers.items()}
    for layer in delta.layers.values():
        layer.change_scale = float(value)
    return ScaleHandle(delta, previous)


def scale_of(delta: DeltaBase) -> float:
    """The scale `delta` runs with (the layers share one)."""
    return next((layer.change_scale for layer in delta.layers.values()), 1.0)


def check_unscaled(delta: DeltaBase, action: str) -> None:
    """Raise LifecycleError if `delta` runs scaled: `action` (a merge) would fold in the unscaled delta."""
    if scale_of(delta) != 1.0:
        raise LifecycleError(
            f"delta {delta.name!r} runs at scale {scale_of(delta)}, but {action} folds in its trained tensors (scale 1.0); "
            "remove the scale first (handle.remove(), or leave the `with delta.scale(...)` block)."
        )
