"""The fused inference route: a linear module and its one mergeable delta computed as one linear map.

Decoding calls every hooked module once per token on a tiny input, so an unmerged delta's cost there is
the hook dispatch and its own small ops, not its arithmetic. With ``delta.fuse()`` (opt-in), a module
whose only delta is one of its layers computes ``F.linear(x, W', b')`` with ``W', b'`` the layer's
``merged_parameters`` (``W + s B A`` for LoRA), kept in a cache *beside* the module's own tensors: the
backbone is never written, so detach stays exact by construction. It costs one extra copy of each
fused module's weight, which is why it is opt-in.

The cache is rebuilt on first use after any change of what it was computed from (:mod:`opendelta.watch`):
an in-place change, a replaced or moved tensor of the module's parameters or of the layer's parameters,
buffers and tensor attributes (a hot-swap slot's ``load`` and an optimizer step both count), and any
attribute set on the layer (a float ``scaling`` reassigned by hand). Not followed: a non-tensor attribute
set on a sub-module of the layer, a Python container changed in place, or an in-place change written
through ``tensor.data`` (which autograd does not see either).

The fused route runs only where it computes what the unmerged route would, up to rounding: no
gradient recorded, no dropout of the layer in training mode, unscaled, outside any mixed batch, not under
``torch.compile`` tracing, the input passed positionally. Everywhere else (and on quantized layers,
layers that are not a plain ``nn.Linear``, a weight or bias computed rather than stored, as
``torch.nn.utils.parametrize`` makes it, a source tensor made under ``torch.inference_mode`` (no version
counter), modules with several deltas or a span) the delta runs unmerged
through the usual hooks, bit for bit as without ``fuse()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from opendelta.errors import MergeError
from opendelta.layer import DeltaLayer
from opendelta.quantized import is_quantized
from opendelta.watch import Sources

_DROPOUT = nn.modules.dropout._DropoutNd
#: the routes a fusable layer may take: each is a function of the module's input or output alone
FUSABLE_ROUTES = ("before", "parallel", "after")


def fusable(module: nn.Module, plain: type, layer: DeltaLayer) -> bool:
    """Whether `layer`, alone on `module` (of class `plain` when not fused), can run fused: ``nn.Linear``'s
    forward (not quantized) and a layer class that merges into its module's weights."""
    return (
        issubclass(plain, nn.Linear)
        and plain.forward is nn.Linear.forward
        and not is_quantized(module)
        and layer.route in FUSABLE_ROUTES
        and type(layer).merged_parameters is not DeltaLayer.merged_parameters
        and module.weight.device.type != "meta"
        and _own_tensors(module)
        and not module.weight.is_inference()  # made under inference_mode: no version counter to watch
    )


def _own_tensors(module: nn.Module) -> bool:
    """Whether `module`'s weight and bias are the tensors it holds in ``_parameters``: not computed from others
    (a ``torch.nn.utils.parametrize`` property, a weight-norm hook's attribute), whose changes the cache would miss."""
    params = module._parameters
    return "weight" in params and "bias" in params and params["weight"] is module.weight and params["bias"] is module.bias


class MergedWeights:
    """The cached ``(weight, bias)`` that compute a linear module with its one delta `name` (see the module
    docstring), kept in the module's ``__dict__`` while it runs fused: the site makes a new one whenever
    its deltas change (attach, detach, switch).

    :meth:`serve` runs once per fused call, where a decode step finds every Python object cold in the CPU
    cache (the weights streamed through since the last step), so its cost is the memory it touches, not
    its bytecode: slots instead of an instance dict, one state tuple, the flat loop of
    :meth:`opendelta.watch.Sources.unchanged`, no allocation.
    """

    __slots__ = ("name", "_state")

    def __init__(self, name: str) -> None:
        self.name = name
        #: None until the first build, then what it was built from and what it gave, replaced whole (never
        #: edited) so a thread reading it never sees half of a rebuild: (the module's own parameter dict,
        #: the layer, the Sources of both, the merged (weight, bias) or None, the layer's dropouts (in
        #: training mode, the merged weight would skip them))
        self._state: tuple | None = None

    @property
    def cached(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The merged ``(weight, bias)`` as last built (None before the first build, or where the route runs unmerged)."""
        return None if self._state is None else self._state[3]

    def serve(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The fused ``(weight, bias)`` for `module`, rebuilt if anything it was made from changed; None
        where the unmerged route must run: the delta scaled, a dropout of it in training mode, or a layer
        that gives no merged weight and bias."""
        layer = module._modules.get(self.name)
        if layer is None or layer.change_scale != 1.0:  # a scaled delta runs unmerged, as the scale's contract says
            return None
        state = self._state
        # the module's own dict first, so a copy sharing this cache (a data-parallel replica) rebuilds it, never reads it
        if state is not None and state[0] is module._parameters and state[1] is layer:
            if state[2].unchanged():
                value, dropouts = state[3], state[4]
                return value if not dropouts or not _dropping(dropouts) else None
            if not state[2].watchable:  # an inference tensor among the sources: unmerged until fused anew, not rebuilt per call
                return None
        return self._build(module, layer)

    def _build(self, module: nn.Module, layer: DeltaLayer) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        dropouts = [m for m in layer.modules() if isinstance(m, _DROPOUT) and m.p > 0]
        value = None  # also what a layer that gives no merged weight and bias leaves: the unmerged route runs
        # a weight computed rather than stored (a parametrization registered after fuse()) runs unmerged
        if _own_tensors(module):
            try:
                with torch.no_grad():
                    merged: dict[str, torch.Tensor] | None = layer.merged_parameters(module)
            except MergeError:
                merged = None
            if merged is not None and set(merged) <= {"weight", "bias"}:
                value = (merged.get("weight", module.weight), merged.get("bias", module.bias))
        # recorded after merging: what merged_parameters caches on the layer (DoRA's weight norms) is an
        # attribute edit, and part of what it read
        sources = Sources(layer.modules(), [module._parameters])
        if not sources.watchable:  # made under inference_mode: changed in place there, they keep no version
            value = None
        self._state = (module._parameters, layer, sources, value, dropouts)
        return None if value is None or _dropping(dropouts) else value


def _dropping(dropouts: list[nn.Module]) -> bool:
    return any(d.training for d in dropouts)


class FuseHandle:
    """The fused route :func:`set_fused` turned on for a delta; ``remove()`` (once or more, or leaving a
    ``with`` block) puts back the setting it replaced and frees the cached weights."""

    def __init__(self, layers: dict[str, DeltaLayer], previous: dict[str, bool], refresh: Callable[[], None],
                 check: Callable[[], None]):
        self._layers = layers
        self._previous: dict[str, bool] | None = previous
        self._refresh = refresh
        self._check = check

    def remove(self) -> None:
        if self._previous is not None:
            self._check()  # refuses (changing nothing) where the routes may not change now
            for path, value in self._previous.items():
                self._layers[path].serve_fused = value
            self._previous = None
            self._refresh()

    def __enter__(self) -> FuseHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def set_fused(name: str, layers: dict[str, DeltaLayer], refresh: Callable[[], None],
              check: Callable[[], None]) -> FuseHandle:
    """Mark every layer of delta `name` to run fused where it can; `refresh` re-decides the routes of
    the modules it is attached to, `check` raises where they may not change now (in a mixed batch).
    Raises MergeError (nothing changed) if no layer can merge at all."""
    check()
    if not any(type(layer).merged_parameters is not DeltaLayer.merged_parameters and layer.route in FUSABLE_ROUTES
               for layer in layers.values()):
        kinds = sorted({type(layer).__name__ for layer in layers.values()})
        raise MergeError(
            f"delta {name!r} has no layer that merges into a linear module's weights ({', '.join(kinds)}), so it has "
            "nothing to fuse; fuse() serves LoRA, IA3 and the other mergeable methods."
        )
    previous = {path: layer.serve_fused for path, layer in layers.items()}
    for layer in layers.values():
        layer.serve_fused = True
    refresh()
    return FuseHandle(layers, previous, refresh, check)
