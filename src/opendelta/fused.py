"""The fused inference route: a linear module and its one mergeable delta computed as one linear map.

Decoding calls every hooked module once per token on a tiny input, so an unmerged delta's cost there is
the hook dispatch and its own small ops, not its arithmetic. With ``delta.fuse()`` (opt-in), a module
whose only delta is one of its layers computes ``F.linear(x, W', b')`` with ``W', b'`` the layer's
``merged_parameters`` (``W + s B A`` for LoRA), kept in a cache *beside* the module's own tensors: the
backbone is never written, so detach stays exact by construction. It costs one extra copy of each
fused module's weight, which is why it is opt-in.

The cache is rebuilt on first use after any change of what it was computed from: an in-place change
(``_version``), a replaced or moved tensor (identity, ``data_ptr``) of the module's or the layer's
parameters and buffers (a hot-swap slot's ``load`` and an optimizer step both count). Python attributes
set on a layer after it was built (a float ``scaling`` reassigned by hand) are not followed.

The fused route runs only where it computes what the unmerged route would, up to rounding: no
gradient recorded, no dropout of the layer in training mode, unscaled, outside any mixed batch, not under
``torch.compile`` tracing, the input passed positionally. Everywhere else (and on quantized layers,
layers that are not a plain ``nn.Linear``, a weight or bias computed rather than stored, as
``torch.nn.utils.parametrize`` makes it, modules with several deltas or a span) the delta runs unmerged
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
    )


def _own_tensors(module: nn.Module) -> bool:
    """Whether `module`'s weight and bias are the tensors it holds in ``_parameters``: not computed from others
    (a ``torch.nn.utils.parametrize`` property, a weight-norm hook's attribute), whose changes the cache would miss."""
    params = module._parameters
    return "weight" in params and "bias" in params and params["weight"] is module.weight and params["bias"] is module.bias


class MergedWeights:
    """The cached ``(weight, bias)`` that compute a linear module with its one delta (see the module docstring).

    One per module and layer: the site makes a new one whenever its deltas change (attach, detach, switch).
    """

    def __init__(self) -> None:
        self._owners: list[dict[str, Any]] = []  # the dicts holding those tensors, read again on every call
        self._layer: DeltaLayer | None = None
        self._sources: list[Any] = []  # the tensors it was computed from, with their version and address
        self._stamp: list[tuple[int, int]] = []
        self.value: tuple[torch.Tensor, torch.Tensor | None] | None = None
        #: the layer's dropouts: while one is in training mode the merged weight would skip it
        self._dropouts: list[nn.Module] = []

    def _fresh(self, module: nn.Module, layer: DeltaLayer) -> bool:
        # called on every fused call: a flat loop over a handful of tensors, no allocation. The first owner is
        # the module's own dict, so a copy sharing this cache (a data-parallel replica) rebuilds it, never reads it
        if module._parameters is not self._owners[0] or layer is not self._layer:
            return False
        sources, stamp, count, i = self._sources, self._stamp, len(self._sources), 0
        for tensors in self._owners:
            for now in tensors.values():
                if i == count or now is not sources[i]:
                    return False
                if now is not None and (now._version != stamp[i][0] or now.data_ptr() != stamp[i][1]):
                    return False
                i += 1
        return i == count

    def _record(self, module: nn.Module, layer: DeltaLayer) -> None:
        # the module's direct tensors (weight, bias) and every tensor of the layer (its sub-modules' too)
        self._owners = [module._parameters]
        self._layer = layer
        for owner in layer.modules():
            self._owners += [owner._parameters, owner._buffers]
        self._dropouts = [m for m in layer.modules() if isinstance(m, _DROPOUT) and m.p > 0]
        self._sources = [t for tensors in self._owners for t in tensors.values()]
        self._stamp = [(0, 0) if t is None else (t._version, t.data_ptr()) for t in self._sources]

    def get(self, module: nn.Module, layer: DeltaLayer) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The fused ``(weight, bias)`` for `module` and `layer`, rebuilt if anything it was made from changed;
        None where the layer cannot give them or a dropout of it is in training mode (then the unmerged route runs)."""
        if self._owners and self._fresh(module, layer):
            return self.value if not self._dropouts or not self._dropping() else None
        self._record(module, layer)
        self.value = None  # also what a layer that gives no merged weight and bias leaves: the unmerged route runs
        if not _own_tensors(module):  # made so after fuse() (a parametrization registered later): runs unmerged
            return None
        try:
            with torch.no_grad():
                merged = layer.merged_parameters(module)
        except MergeError:
            return None
        if not set(merged) <= {"weight", "bias"}:
            return None
        self.value = (merged.get("weight", module.weight), merged.get("bias", module.bias))
        return None if self._dropping() else self.value

    def _dropping(self) -> bool:
        return any(d.training for d in self._dropouts)


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
