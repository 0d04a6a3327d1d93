"""Whether what a cached value was computed from is still what it was: the check behind every cache that
serves a derived tensor instead of recomputing it (the fused route's merged weights, a mixed batch's
stacked LoRA factors).

A :class:`Sources` records the tensors of some modules (their parameters, buffers and tensor attributes,
such as a hot-swap slot's scaling) with each one's identity, version counter and address, and each delta
layer's count of attribute edits. :meth:`Sources.unchanged` is then false after an in-place change (the
version moves), a replaced tensor (identity), ``.data =`` or ``.to()`` (the address moves), an added or
removed parameter or buffer, and any attribute set on a delta layer (a float ``scaling`` changed by
hand). Tensors made under ``torch.inference_mode`` keep no version counter: a snapshot holding one is
never unchanged (``watchable`` is false), so a cache built on it is rebuilt, or not used, on every call.
Not seen, as autograd's own checks do not see it: an in-place change written through ``tensor.data``,
which has a version counter of its own; write through the tensor itself, under ``torch.no_grad()``.

The check runs on every call of a cached route, where decoding finds each Python object cold in the CPU
cache, so it is one flat loop over a tuple, without allocation.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from opendelta.layer import DeltaLayer


class Sources:
    """The tensors of `modules` (and of the dicts in `owners`, e.g. another module's ``_parameters``) as they
    are now; :meth:`unchanged` tells whether they still are."""

    __slots__ = ("_entries", "_owners", "_count", "_edits", "watchable")

    def __init__(self, modules: Iterable[nn.Module], owners: Iterable[dict[str, Any]] = ()) -> None:
        modules = list(modules)
        counted = list(owners)
        for module in modules:
            counted += [module._parameters, module._buffers]
        places = [(owner, key, t) for owner in counted for key, t in owner.items()]
        # tensors held as plain attributes (a hot-swap slot's 0-dim scaling): replaced, they show in the
        # edit count; changed in place, in their version
        places += [(m.__dict__, key, t) for m in modules for key, t in m.__dict__.items() if isinstance(t, torch.Tensor)]
        self.watchable = not any(t is not None and t.is_inference() for _, _, t in places)
        self._entries = tuple(
            (owner, key, t, 0 if t is None or not self.watchable else t._version, 0 if t is None else t.data_ptr())
            for owner, key, t in places
        )
        self._owners = tuple(counted)
        self._count = sum(map(len, counted))
        self._edits = tuple((m, m.attribute_edits) for m in modules if isinstance(m, DeltaLayer))

    def unchanged(self) -> bool:
        try:
            for owner, key, tensor, version, address in self._entries:
                now = owner.get(key)
                if now is not tensor or (now is not None and (now._version != version or now.data_ptr() != address)):
                    return False
        except RuntimeError:  # an inference tensor: no version to compare
            return False
        for layer, edits in self._edits:
            if layer.attribute_edits != edits:
                return False
        # every recorded entry is still there, so an unchanged total means no dict gained one
        return sum(map(len, self._owners)) == self._count
