"""The precision policy: trainable deltas beside a half-precision backbone are kept in float32.

Delta layers are built in the dtype of what they act on; on a float16 or bfloat16 backbone that
makes half-precision trainable tensors, which ``torch.amp.GradScaler`` refuses to unscale and
whose small updates round away. By default (``delta_dtype="float32"``, as PEFT's
``autocast_adapter_dtype``) a new layer's half-precision parameters and buffers are upcast to
float32, and its routes run in its own dtype: a hidden state enters it cast up and the result
leaves cast back to the hidden state's dtype, so the backbone still sees its own dtype
everywhere. ``delta_dtype="weight"`` keeps the deltas in the backbone's dtype. Layers on a float32
backbone are untouched, so the policy costs nothing there: where a layer is attached without the mark,
the engine's short path calls its route as written (:func:`route_for`), not through the wrapper.

A layer that rewrites its module's whole call (``route_call``: prefixes, soft prompts) casts what
it adds to the hidden state's dtype itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

#: delta_dtype values: upcast half-precision delta tensors to float32 / keep the dtype they were built in
FLOAT32 = "float32"
WEIGHT = "weight"
POLICIES = (FLOAT32, WEIGHT)

_HALF = (torch.float16, torch.bfloat16)
#: the routes a layer's precision applies to, each with the position of the argument whose dtype its result takes
ROUTE_RESULT_LIKE = {
    "route_input": 0, "route_output": 0, "scaled_change": 0, "route_input_rows": 0, "route_output_rows": 0,
    "route_parallel": 1, "route_parallel_rows": 1,
}
_WRAPPED = "_opendelta_own_precision"


def keep_precision(layers: Iterable[nn.Module], policy: str) -> None:
    """Apply `policy` to newly built delta layers: under ``"float32"``, upcast their half-precision
    parameters and buffers (a tensor shared by several layers once) and mark them to compute in it."""
    if policy != FLOAT32:
        return
    layers = list(layers)
    half = {id(t): t for layer in layers for t in (*layer.parameters(), *layer.buffers()) if t.dtype in _HALF}
    for layer in layers:  # marked before casting: layers may share a tensor (Compacter's shared rules)
        if any(id(t) in half for t in (*layer.parameters(), *layer.buffers())):
            layer.in_own_precision = True
    for tensor in half.values():
        tensor.data = tensor.data.float()


def own_dtype(layer: nn.Module) -> torch.dtype | None:
    """The dtype a layer's floating parameters are in (None without any)."""
    for param in layer.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def in_own_precision(route: Callable[..., torch.Tensor], like: int) -> Callable[..., torch.Tensor]:
    """`route` run in the layer's own dtype when the policy marked it: floating tensor arguments
    are cast to it, and the result to the dtype of positional argument `like` (the hidden state)."""
    if getattr(route, _WRAPPED, None) is not None:
        return route

    @functools.wraps(route)
    def run(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.in_own_precision:
            return route(self, *args, **kwargs)
        hidden_dtype, dtype = args[like].dtype, own_dtype(self)
        if dtype is None or hidden_dtype == dtype:
            return route(self, *args, **kwargs)
        cast = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        return route(self, *cast, **kwargs).to(hidden_dtype)

    setattr(run, _WRAPPED, route)  # the route as written, for layers that need no casting (route_for)
    return run


def wrap_routes(cls: type) -> None:
    """Make the routes `cls` defines itself follow its layers' precision (called for every DeltaLayer
    class), and keep each as written under :func:`as_written`'s name."""
    for name, like in ROUTE_RESULT_LIKE.items():
        route = cls.__dict__.get(name)
        if callable(route):
            wrapped = in_own_precision(route, like)
            setattr(cls, name, wrapped)
            setattr(cls, as_written(name), getattr(wrapped, _WRAPPED))


def as_written(route: str) -> str:
    """The attribute under which a layer class keeps `route` without the precision wrapper."""
    return f"_{route}_as_written"


def route_for(layer: nn.Module, route: str) -> str:
    """The attribute to call for `layer`'s `route` in a hot loop: the route as written where the policy did
    not mark the layer (the wrapper would only check the mark and call it), else the wrapped route.
    The mark is set when the layer is built (:func:`keep_precision`), before it is attached, so deciding
    once where it is attached is exact."""
    return route if layer.in_own_precision else as_written(route)
