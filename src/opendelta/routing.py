"""Dynamic tensor re-routing: deltas enter an already-loaded module's data flow through hooks.

Every module that carries deltas gets one :class:`Site`, which installs at most one forward
pre-hook and one forward hook (or, for the *replace* route, an instance-level ``forward``; no method
uses that route: it is kept as the engine of the original OpenDelta's ``replace_module`` API).
Removing the last delta removes them, so the module is exactly as before. Delta layers are
children of the module they modify and the hooks find them by name through the ``module``
argument, so ``copy.deepcopy`` and data-parallel replicas route through their own copies.

Order inside one module: *before* deltas -> the module (or its replacement) -> *parallel* deltas
(added one after another) -> *after* deltas. *weights* deltas change some of the module's parameters
for the duration of each call (:class:`WeightSwap`: the tensors the forward reads, one after another,
restored after the call even when it raises), for modules that read weights instead of calling
sub-modules (``nn.MultiheadAttention``, fused MoE experts). Within each route the deltas run in ascending order
of the sort key each was added with (then by name), never by when they were added, so any
sequence of removals and re-additions composes the same function, bit for bit.

A parallel delta may also *span* two modules (:class:`Span`): it reads the input of a start
module and adds its result to the output of an end module that runs later (a feed-forward block
kept as two projections in the layer, BERT's ``intermediate.dense`` -> ``output.dense``). The
start module's site records its input (after its own *before* deltas) in a :class:`SpanInput`
that the end module's site takes; the layer is a child of the end module only.

Threads: the hooks are shared by every thread, but a mixed batch's plans (:func:`start_mixing`)
are not: they live in a context variable, so they route only the forwards of the thread (or
asyncio task) that entered the batch; and which deltas act where cannot change (attach, detach,
merge hold :data:`DATA_FLOW_LOCK` and refuse) while any thread mixes on the backbone.
"""

from __future__ import annotations

import contextvars
import functools
import threading
import types
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.functional import linear

from opendelta.errors import LifecycleError, MixedBatchError, UnsupportedModuleError
from opendelta.fused import MergedWeights, fusable
from opendelta.layer import ROW_WISE, WHOLE_BATCH, DeltaLayer, first_tensor, input_name, whole_batch_only, with_first_tensor
from opendelta.precision import route_for

ROUTES = ("before", "after", "parallel", "replace", "weights")
#: where a delta runs among the deltas of its route on one module: ascending, compared as tuples
OrderKey = tuple
_SITE_ATTR = "_opendelta_site"
#: a fused module's MergedWeights, in its __dict__ beside the site: the one lookup the fused forward makes
FUSED_ATTR = "_opendelta_fused"
#: read once per fused call: module globals, so a call does not look them up through torch's namespaces
_grad_enabled = torch.is_grad_enabled
_compiling = torch.compiler.is_compiling
#: the mixed-batch plans (by site) of this thread or asyncio task; None outside any mixed batch
_PLANS: contextvars.ContextVar[dict[Site, MixPlan] | None] = contextvars.ContextVar("opendelta_mix_plans", default=None)
#: the backbones (by id) this thread or asyncio task is mixing on
_MIXING_HERE: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("opendelta_mixing_here", default=frozenset())
#: held by every change of which deltas act where (attach, detach, merge...) and while a mixed batch
#: is planned, in any thread: a plan never sees a half-changed model
DATA_FLOW_LOCK = threading.RLock()
#: id(backbone) -> mixed batches open on it, over all threads; while it is empty the hooks skip the plan lookup
_MIXING: dict[int, int] = {}
F = TypeVar("F", bound=Callable[..., Any])


def changes_data_flow(method: F) -> F:
    """Run a lifecycle method holding DATA_FLOW_LOCK, so no thread plans a mixed batch on a half-changed model."""

    @functools.wraps(method)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with DATA_FLOW_LOCK:
            return method(*args, **kwargs)

    return locked  # type: ignore[return-value]


@dataclass(frozen=True)
class RowRouting:
    """Which rows of every forward's batch the named deltas act on, in a mixed batch.

    `names` are the deltas of the mix; `rows` maps those that act on some rows only to the
    sorted indices of their rows (on the device they index); `idle` names those with no row.
    Any other delta acts on every row.
    """

    batch_size: int
    names: frozenset[str]
    rows: dict[str, torch.Tensor]
    idle: frozenset[str] = frozenset()
    #: delta name -> the scale of each of its rows (in row order; every row where `rows` has none), for
    #: the deltas of a mix given per-row scales
    scales: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


class MixPlan:
    """A site's plan for one mixed batch: per route, (delta name or combined object, rows or None)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.before: list[tuple[Any, torch.Tensor | None]] = []
        self.parallel: list[tuple[str, torch.Tensor | None]] = []
        self.after: list[tuple[str, torch.Tensor | None]] = []
        self.weights: list[str] = []
        self.checks_output = False
        self.scales: dict[str, torch.Tensor] = {}  # delta name -> its rows' scales (see RowRouting.scales)

    def scale_of(self, name: str, layer: DeltaLayer) -> float | torch.Tensor | None:
        """The scale delta `name` runs with here: its rows' scales times its own, or its own if not
        1.0, or None (its own route, unscaled)."""
        rows = self.scales.get(name)
        if rows is not None:
            return rows * layer.change_scale if layer.change_scale != 1.0 else rows
        return None if layer.change_scale == 1.0 else layer.change_scale

    def check(self, h: torch.Tensor) -> None:
        if h.shape[0] != self.batch_size:
            raise MixedBatchError(
                f"this mixed batch routes {self.batch_size} rows, but a forward ran on a batch of {h.shape[0]}; "
                "pass exactly one row index per batch row (generate() with num_beams or num_return_sequences "
                "> 1 expands the batch: use greedy or sampled decoding with one sequence per row)."
            )


@dataclass(frozen=True, eq=False)
class Span:
    """Where a spanning delta acts: its input is `start`'s input, its result is added to `end`'s output."""

    start: nn.Module
    end: nn.Module


class SpanInput:
    """A span's start input, put by the start module's pre-hook and taken by the end module's hook.

    Kept per thread: data-parallel replicas share their sites and run in threads of their own.
    Gradient checkpointing replays the start before the end, so recomputation refills it.
    """

    def __init__(self) -> None:
        self._by_thread: dict[int, torch.Tensor] = {}

    def put(self, h: torch.Tensor) -> None:
        self._by_thread[threading.get_ident()] = h

    def take(self, name: str) -> torch.Tensor:
        h = self._by_thread.pop(threading.get_ident(), None)
        if h is None:
            raise UnsupportedModuleError(
                f"delta {name!r} spans two modules, but its end module ran without its start module running first "
                "(in this forward); a span needs a start that runs before its end, once per end call."
            )
        return h

    def discard(self) -> None:
        self._by_thread.pop(threading.get_ident(), None)


class Site:
    """The deltas acting on one module, by route, as names of the module's delta children, each
    route's list kept in composition order (:meth:`place`).

    `span_starts` are spans starting here (their input is recorded); `span_inputs` are the parallel
    deltas here whose input comes from a span's start instead of this module's input.
    """

    def __init__(self, module: nn.Module):
        self.input_name: str | None = None  # looked up on the first call that passes the input by keyword
        self._forward = module.forward
        self.before: list[str] = []
        self.parallel: list[str] = []
        self.after: list[str] = []
        self.weights: list[str] = []
        self.replace: str | None = None
        self.order: dict[str, OrderKey] = {}  # delta name -> the sort key it was added with
        self.span_starts: dict[str, SpanInput] = {}
        self.span_inputs: dict[str, SpanInput] = {}
        self._pre_handle: Any = None
        self._post_handle: Any = None
        self._had_forward = "forward" in module.__dict__
        self._own_forward: Any = None
        self._swap: WeightSwap | None = None
        #: the one parallel delta here, when it is all the post hook runs (:meth:`refresh` decides): the hook
        #: then skips the general path's lookups, the same ops in the same order, and calls its route
        #: by the attribute `_lean_route` (precision.route_for: without the precision wrapper where it
        #: would not cast); names, not objects, so replicas and copies find their own layer
        self._lean: str | None = None
        self._lean_route = "route_parallel"
        #: the one delta here when it runs fused (DeltaBase.fuse, opendelta.fused): the module's class is then
        #: its fused subclass (:func:`fused_class`, as torch's parametrize swaps classes), with no hooks, and
        #: its merged weight cached in the module's __dict__ (FUSED_ATTR)
        self._fused: str | None = None

    def place(self, route: str, name: str, order: OrderKey) -> None:
        """Put delta `name` into `route`'s list at its place: ascending `order`, then name."""
        self.order[name] = order
        names = getattr(self, route)
        names.append(name)
        if len(names) > 1:
            names.sort(key=self._place_of)

    def _place_of(self, name: str) -> tuple[OrderKey, str]:
        return self.order[name], name

    def unplace(self, name: str) -> None:
        """Take delta `name` out of whichever route list holds it."""
        for names in (self.before, self.parallel, self.after, self.weights):
            if name in names:
                names.remove(name)
        self.order.pop(name, None)

    def _keyword_input_name(self) -> str | None:
        if self.input_name is None:
            self.input_name = input_name(self._forward)
        return self.input_name

    def _input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        if args:
            return args[0]
        name = self._keyword_input_name()
        if name is None or name not in kwargs:
            raise TypeError("the module was called without its input tensor")
        return kwargs[name]

    def _parallel_input(self, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
        """The input of parallel delta `name`: this module's, or its span start's."""
        span = self.span_inputs.get(name)
        if span is not None:
            return span.take(name)
        return args[0] if args else self._input(args, kwargs)

    @property
    def mix(self) -> MixPlan | None:
        """The plan of the mixed batch this thread (or asyncio task) runs on this module, if any."""
        plans = _PLANS.get() if _MIXING else None
        return plans.get(self) if plans else None

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mods = module._modules
        input_name = None if args else self._keyword_input_name()
        plans = _PLANS.get() if _MIXING else None  # inlined self.mix: this runs on every call of the module
        mix = plans.get(self) if plans else None
        if mix is not None:
            args, kwargs = self._mixed_pre(mix, mods, args, kwargs, input_name)
        else:
            for name in self.before:
                layer = mods[name]
                if layer.change_scale == 1.0:
                    args, kwargs = layer.route_call(args, kwargs, input_name)
                else:
                    args, kwargs = self._with_input(args, kwargs, lambda h: h + layer.scaled_change(h, layer.change_scale))
        if self.span_starts:
            h = self._input(args, kwargs)
            for span in self.span_starts.values():
                span.put(h)
        return args, kwargs

    def _with_input(self, args: tuple, kwargs: dict, change: Any) -> tuple[tuple, dict]:
        """The call with its input tensor `h` replaced by ``change(h)``."""
        h = change(self._input(args, kwargs))
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, self._keyword_input_name(): h}

    def _mixed_pre(self, mix: MixPlan, mods: dict, args: tuple, kwargs: dict, input_name: str | None) -> tuple[tuple, dict]:
        for step, rows in mix.before:
            if not isinstance(step, str):  # layers combined for this batch
                args, kwargs = step.route_call(args, kwargs, input_name)
                continue
            layer, scale = mods[step], mix.scale_of(step, mods[step])
            if rows is None and scale is None:
                args, kwargs = layer.route_call(args, kwargs, input_name)
                continue
            mix.check(self._input(args, kwargs))  # a row-wise delta of the mix; a combined one checks for itself
            if scale is None:
                args, kwargs = self._with_input(args, kwargs, lambda h: layer.route_input_rows(h, rows))
            else:
                args, kwargs = self._with_input(args, kwargs, lambda h: _add_scaled(layer, h, h, rows, scale))
        return args, kwargs

    def _mixed_post(self, mix: MixPlan, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        mods = module._modules
        h = first_tensor(output)
        if mix.checks_output:
            mix.check(h)
        for name, rows in mix.parallel:
            if not isinstance(name, str):  # layers stacked for this batch (see _stack_parallel)
                h = name.route_parallel(self._input(args, kwargs), h)
                continue
            layer, h_in, scale = mods[name], self._parallel_input(name, args, kwargs), mix.scale_of(name, mods[name])
            if scale is not None:  # never a reads_module layer: those are not scalable
                h = _add_scaled(layer, h_in, h, rows, scale)
            else:
                context = {"module": module} if layer.reads_module else {}
                if rows is None:
                    h = layer.route_parallel(h_in, h, **context)
                else:
                    h = layer.route_parallel_rows(h_in, h, rows, **context)
        for name in self.span_inputs.keys() - {name for name, _ in mix.parallel}:
            self.span_inputs[name].discard()  # an idle span: drop its start's input
        for name, rows in mix.after:
            layer, scale = mods[name], mix.scale_of(name, mods[name])
            if scale is not None:
                h = _add_scaled(layer, h, h, rows, scale)
            else:
                h = layer.route_output(h) if rows is None else layer.route_output_rows(h, rows)
        return with_first_tensor(output, h)

    def plan_mix(self, module: nn.Module, routing: RowRouting) -> MixPlan:
        """Plan this module's deltas for a mixed batch (see :class:`RowRouting`); :func:`start_mixing` runs it."""
        mix = MixPlan(routing.batch_size)
        mods = module._modules
        if self.replace is not None and routing.rows.get(self.replace) is not None:
            raise MixedBatchError(f"delta {self.replace!r} replaces {type(module).__name__}, so it cannot act on part of a batch")
        groups: dict[type, list[tuple[DeltaLayer, torch.Tensor]]] = {}
        for name in self.before:
            if name in routing.idle:
                continue
            rows = routing.rows.get(name)
            layer = mods[name]
            if rows is None or layer.mixed_rows == ROW_WISE:
                mix.before.append((name, rows))
            elif layer.mixed_rows == WHOLE_BATCH:
                raise whole_batch_only(type(layer))
            else:  # COMBINED: one step per layer class, where its first layer runs
                if type(layer) not in groups:
                    groups[type(layer)] = []
                    mix.before.append((groups[type(layer)], None))
                groups[type(layer)].append((layer, rows))
        for i, (step, rows) in enumerate(mix.before):
            if isinstance(step, list):
                mix.before[i] = (type(step[0][0]).combine_rows(step, routing.batch_size), None)
        for route in ("parallel", "after", "weights"):
            planned = getattr(mix, route)
            for name in getattr(self, route):
                if name not in routing.idle:
                    rows = routing.rows.get(name)
                    if rows is not None and (mods[name].mixed_rows != ROW_WISE or route == "weights"):
                        raise whole_batch_only(type(mods[name]))
                    planned.append(name if route == "weights" else (name, rows))
        mix.checks_output = any(name in routing.names for name in (*self.parallel, *self.after))
        for name, scales in routing.scales.items():
            if name in mods and name not in routing.idle:
                if not mods[name].scalable():
                    raise MixedBatchError(
                        f"delta {name!r} on this {type(module).__name__} has no change to scale: its "
                        f"{type(mods[name]).__name__} layers {mods[name].unscalable_reason()}; give its rows scale 1.0."
                    )
                mix.scales[name] = scales
        mix.parallel = self._stack_parallel(mix, mods, routing.batch_size)
        return mix

    def _stack_parallel(self, mix: MixPlan, mods: dict, batch_size: int) -> list[tuple[Any, torch.Tensor | None]]:
        """`mix.parallel` with each run of consecutive row-wise deltas of one class (unscaled, reading this
        module's input) replaced by the one step their class's :meth:`DeltaLayer.stack_rows` makes of them,
        where it makes one: one kernel for the rows of many tasks. Rows of a mix are disjoint, so the sum
        each row sees keeps its order."""
        planned: list[tuple[Any, torch.Tensor | None]] = []
        run: list[tuple[DeltaLayer, torch.Tensor]] = []
        names: list[tuple[str, torch.Tensor]] = []

        def flush() -> None:
            step = type(run[0][0]).stack_rows(list(run), batch_size) if len(run) > 1 else None
            planned.extend([(step, None)] if step is not None else names)
            run.clear()
            names.clear()

        for name, rows in mix.parallel:
            layer = mods[name]
            stackable = (
                rows is not None and name not in mix.scales and name not in self.span_inputs
                and not layer.reads_module and layer.change_scale == 1.0
            )
            if run and (not stackable or type(layer) is not type(run[0][0])):
                flush()
            if stackable:
                run.append((layer, rows))
                names.append((name, rows))
            else:
                planned.append((name, rows))
        if run:
            flush()
        return planned

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        lean = self._lean
        if lean is not None and args and not _MIXING and type(output) is torch.Tensor:
            # decoding calls this once per module per token: the general path below, minus its lookups
            layer = module._modules[lean]
            if layer.change_scale == 1.0:
                return getattr(layer, self._lean_route)(args[0], output)
        mods = module._modules
        plans = _PLANS.get() if _MIXING else None
        mix = plans.get(self) if plans else None
        if mix is not None:
            return self._mixed_post(mix, module, args, kwargs, output)
        if self.parallel:
            h_out = first_tensor(output)
            for name in self.parallel:
                layer, h_in = mods[name], self._parallel_input(name, args, kwargs)
                if layer.change_scale != 1.0:
                    h_out = h_out + layer.scaled_change(h_in, layer.change_scale)
                elif layer.reads_module:
                    h_out = layer.route_parallel(h_in, h_out, module=module)
                else:
                    h_out = layer.route_parallel(h_in, h_out)
            output = with_first_tensor(output, h_out)
        if self.after:
            h = first_tensor(output)
            for name in self.after:
                layer = mods[name]
                h = layer.route_output(h) if layer.change_scale == 1.0 else h + layer.scaled_change(h, layer.change_scale)
            output = with_first_tensor(output, h)
        return output

    def refresh(self, module: nn.Module) -> None:
        """Install exactly the hooks the current deltas need, and no others."""
        self._lean = self._lean_delta(module)
        if self._lean is not None:
            self._lean_route = route_for(module._modules[self._lean], "route_parallel")
        self._fused = self._fused_delta(module)
        fused = self._fused is not None  # the fused forward runs the hooks' code itself when it cannot fuse
        if fused:  # computed again on first use, from whatever acts here now
            module.__dict__[FUSED_ATTR] = MergedWeights(self._fused)
        else:
            module.__dict__.pop(FUSED_ATTR, None)
        needs_pre = bool(self.before or self.span_starts) and not fused
        if needs_pre and self._pre_handle is None:
            self._pre_handle = module.register_forward_pre_hook(self.pre_hook, with_kwargs=True)
        elif not needs_pre and self._pre_handle is not None:
            self._pre_handle.remove()
            self._pre_handle = None
        needs_post = bool(self.parallel or self.after) and not fused
        if needs_post and self._post_handle is None:
            self._post_handle = module.register_forward_hook(self.post_hook, with_kwargs=True)
        elif not needs_post and self._post_handle is not None:
            self._post_handle.remove()
            self._post_handle = None
        if self.replace is not None and self._own_forward is None:
            if self._had_forward:
                raise UnsupportedModuleError(
                    f"{type(module).__name__} already has an instance-level forward (another library wrapped it); "
                    "a replace-route delta cannot be stacked on it."
                )
            self._own_forward = types.MethodType(_replaced_forward, module)
            module.forward = self._own_forward
        elif self.replace is None and self._own_forward is not None:
            if module.__dict__.get("forward") is self._own_forward:
                del module.forward
            self._own_forward = None
        plain = plain_class(type(module))
        if fused and type(module) is plain:
            module.__class__ = fused_class(plain)
        elif not fused and type(module) is not plain:
            module.__class__ = plain
        if self.weights and self._swap is None:
            self._swap = WeightSwap(self, module)
        elif not self.weights and self._swap is not None:
            self._swap.remove()
            self._swap = None

    def _lean_delta(self, module: nn.Module) -> str | None:
        """The name of the only delta the post hook runs, if it is one parallel delta that reads its own
        module's input and not the module itself (then :meth:`post_hook` takes its short path)."""
        if len(self.parallel) != 1 or self.after or self.span_inputs:
            return None
        name = self.parallel[0]
        layer = module._modules.get(name)
        return name if isinstance(layer, DeltaLayer) and not layer.reads_module else None

    def _fused_delta(self, module: nn.Module) -> str | None:
        """The name of the only delta here if it asked to run fused and can (:func:`opendelta.fused.fusable`)
        on a module no other library gave an instance-level forward."""
        names = (*self.before, *self.parallel, *self.after)
        if len(names) != 1 or self.weights or self.replace is not None or self.span_starts or self.span_inputs:
            return None
        layer = module._modules.get(names[0])
        if not isinstance(layer, DeltaLayer) or not layer.serve_fused or not fusable(module, plain_class(type(module)), layer):
            return None
        if "forward" in module.__dict__:  # another library's wrapper would call the class's forward it saw
            return None
        return names[0]

    @property
    def empty(self) -> bool:
        return not (self.before or self.parallel or self.after or self.weights or self.replace or self.span_starts)


class WeightSwap:
    """The hooks of a site's *weights* deltas: before each call, each delta in order gives new values for
    parameters of the module (by name relative to it, ``out_proj.weight``) from the current ones
    (``DeltaLayer.changed_parameters``); they stand in the module's parameter slots during the call
    (as ``torch.func.functional_call`` does), and the parameters themselves go back after it, also when
    it raises (``always_call``). Calls on one module from several threads take turns, since the slots
    are shared."""

    def __init__(self, site: Site, module: nn.Module):
        self.site = site
        self._lock = threading.RLock()
        self._saved: dict[int, list[list[tuple[nn.Module, str, Any]]]] = {}  # thread -> stack of calls' slots
        self._handles = (
            module.register_forward_pre_hook(self.swap_in, with_kwargs=True),
            module.register_forward_hook(self.swap_out, with_kwargs=True, always_call=True),
        )

    def __getstate__(self) -> dict:  # a copy (deepcopy, replicas) takes turns on its own lock, with no call open
        return {**self.__dict__, "_lock": None, "_saved": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def swap_in(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._lock.acquire()
        mix = self.site.mix
        names = mix.weights if mix is not None else self.site.weights
        saved: list[tuple[nn.Module, str, Any]] = []
        self._saved.setdefault(threading.get_ident(), []).append(saved)
        if not names:
            return
        values: dict[str, torch.Tensor] = {}
        for name in names:
            layer = module._modules[name]
            current = {key: values.get(key) if key in values else module.get_parameter(key) for key in layer.parameter_names}
            values.update(layer.changed_parameters(module, current))
        for key, value in values.items():
            owner_path, _, leaf = key.rpartition(".")
            owner = module.get_submodule(owner_path)
            saved.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = value

    def swap_out(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        stack = self._saved.get(threading.get_ident())
        if not stack:  # an earlier hook raised before swap_in ran: nothing to put back
            return
        for owner, leaf, parameter in reversed(stack.pop()):
            owner._parameters[leaf] = parameter
        if not stack:
            del self._saved[threading.get_ident()]
        self._lock.release()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class MixHandle:
    """An open mixed batch (from :func:`start_mixing`); ``remove()`` ends it, once."""

    def __init__(self, backbone: nn.Module, plans: dict[Site, MixPlan]):
        self._key = id(backbone)
        self._plans = plans
        _PLANS.set({**(_PLANS.get() or {}), **plans})
        _MIXING_HERE.set(_MIXING_HERE.get() | {self._key})
        with DATA_FLOW_LOCK:
            _MIXING[self._key] = _MIXING.get(self._key, 0) + 1
        self._open = True

    def remove(self) -> None:
        """End the batch: its plans leave this context (only its own, whatever else opened meanwhile)."""
        if not self._open:
            return
        self._open = False
        with DATA_FLOW_LOCK:
            left = _MIXING.pop(self._key) - 1
            if left:
                _MIXING[self._key] = left
        here = _MIXING_HERE.get()
        if self._key not in here:
            raise MixedBatchError(
                "a mixed_batch() block ended in another thread or context than the one that entered it (a generator "
                "resumed elsewhere?), so forwards run there were not routed by it; enter and leave the block in the "
                "thread that runs the forwards."
            )
        _PLANS.set({site: plan for site, plan in (_PLANS.get() or {}).items() if site not in self._plans} or None)
        _MIXING_HERE.set(here - {self._key})


def start_mixing(backbone: nn.Module, plans: dict[Site, MixPlan]) -> MixHandle:
    """Route the forwards of this thread (or asyncio task, and copies of its context) by `plans`
    until the handle is removed; other threads' forwards stay as they are. Call it holding
    DATA_FLOW_LOCK, with the plans made under the same hold."""
    return MixHandle(backbone, plans)


def mixing_here(backbone: nn.Module) -> bool:
    """Whether this thread (or asyncio task) is inside a mixed batch on `backbone`."""
    return id(backbone) in _MIXING_HERE.get()


def mixing_anywhere(backbone: nn.Module) -> bool:
    """Whether any thread is inside a mixed batch on `backbone`."""
    return id(backbone) in _MIXING


def _fused_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A fused module's forward: one linear map with the merged weights (opendelta.fused) where that computes
    what the unmerged delta would, else the module's own forward between the hooks' code, as with hooks."""
    fused: MergedWeights | None = module.__dict__.get(FUSED_ATTR)
    if fused is None:
        # no longer fused, yet the class stayed: another library subclassed it on top (torch's parametrize),
        # so unfusing could not put the plain class back. The hooks, if any, run around the plain forward
        return nn.Linear.forward(module, *args, **kwargs)
    if args and not kwargs and not _MIXING and not _grad_enabled() and not _compiling():
        merged = fused.serve(module)
        if merged is not None:
            return linear(args[0], *merged)
    site: Site = module.__dict__[_SITE_ATTR]
    if site.before:
        args, kwargs = site.pre_hook(module, args, kwargs)
    output = nn.Linear.forward(module, *args, **kwargs)  # fusable: the plain class's forward is nn.Linear's
    return site.post_hook(module, args, kwargs, output) if site.parallel or site.after else output


class FusedLinear(nn.Linear):
    """An ``nn.Linear`` whose one delta runs fused (:func:`fused_class`); a module's class only while it does."""

    forward = _fused_forward


#: plain class -> its fused subclass
_FUSED_CLASSES: dict[type, type] = {nn.Linear: FusedLinear}


def fused_class(plain: type) -> type:
    """The subclass of `plain` (an nn.Linear subclass with nn.Linear's forward) that a fused module takes,
    made once and kept in this module under a unique name, so a pickled model finds it."""
    made = _FUSED_CLASSES.get(plain)
    if made is None:
        name = "Fused_" + f"{plain.__module__}.{plain.__qualname__}".replace(".", "_").replace("<", "_").replace(">", "_")
        made = type(name, (plain,), {"forward": _fused_forward, "__module__": __name__, "__qualname__": name})
        globals()[name] = made
        _FUSED_CLASSES[plain] = made
    return made


def plain_class(cls: type) -> type:
    """The class a module has when not fused: `cls` itself, or the one its fused subclass was made from."""
    return cls.__bases__[0] if cls.__dict__.get("forward") is _fused_forward else cls


def _replaced_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    site: Site = module.__dict__[_SITE_ATTR]
    return module._modules[site.replace](*args, **kwargs)


def site_of(module: nn.Module) -> Site | None:
    """The site on `module`, if any delta acts on it."""
    return module.__dict__.get(_SITE_ATTR)


def add_delta(module: nn.Module | Span, name: str, layer: DeltaLayer, order: OrderKey = ()) -> None:
    """Make `layer` (a delta) act on `module` under child name `name`, by the layer's route, at its
    place among the module's deltas of that route: ascending `order` (a tuple), then `name`.

    On a :class:`Span` the layer (route parallel) becomes a child of the span's end, fed with the
    span's start input.
    """
    if isinstance(module, Span):
        _add_span(module, name, layer, order)
        return
    if layer.route not in ROUTES:
        raise ValueError(f"unknown route {layer.route!r}; expected one of {ROUTES}")
    if _name_taken(module, name):
        raise LifecycleError(f"{type(module).__name__} already has an attribute or child named {name!r}")
    site = site_of(module)
    if site is None:
        site = Site(module)
    if layer.route == "replace" and site.replace is not None:
        raise LifecycleError(f"{type(module).__name__} is already replaced by delta {site.replace!r}")
    module.add_module(name, layer)
    try:
        layer.on_add(module)
    except Exception:
        del module._modules[name]
        layer.on_remove(module)
        raise
    if layer.route == "replace":
        site.replace = name
    else:
        site.place(layer.route, name, order)
    module.__dict__[_SITE_ATTR] = site
    try:
        site.refresh(module)
    except Exception:
        remove_delta(module, name)
        raise


def _add_span(span: Span, name: str, layer: DeltaLayer, order: OrderKey) -> None:
    if span.start is span.end:
        add_delta(span.end, name, layer, order)
        return
    if layer.route != "parallel":
        raise UnsupportedModuleError(
            f"{type(layer).__name__} has route {layer.route!r}; only parallel deltas (a function of one module's "
            "input added to another's output) can span two modules"
        )
    start_site = site_of(span.start) or Site(span.start)
    if name in start_site.span_starts:
        raise LifecycleError(f"{type(span.start).__name__} already starts a span of a delta named {name!r}")
    add_delta(span.end, name, layer, order)
    stash = SpanInput()
    end_site = site_of(span.end)
    assert end_site is not None
    end_site.span_inputs[name] = stash
    end_site.refresh(span.end)  # its input now comes from the start: no short path in the post hook
    start_site.span_starts[name] = stash
    span.start.__dict__[_SITE_ATTR] = start_site
    try:
        start_site.refresh(span.start)
    except Exception:
        remove_delta(span, name)
        raise


def _name_taken(module: nn.Module, name: str) -> bool:
    """``hasattr(module, name)`` without the cost of nn.Module.__getattr__ raising for a free name."""
    return (
        name in module._modules
        or name in module._parameters
        or name in module._buffers
        or name in module.__dict__
        or hasattr(type(module), name)
    )


def swap_delta(module: nn.Module | Span, old: str, new: str, layer: DeltaLayer, order: OrderKey = ()) -> None:
    """:func:`remove_delta` of `old` then :func:`add_delta` of `layer` as `new` at `order`, keeping
    the hooks installed in between (a task switch on the same modules re-registers nothing)."""
    if isinstance(module, Span):
        remove_delta(module, old)
        add_delta(module, new, layer, order)
        return
    site = site_of(module)
    if site is None or old not in module._modules:
        raise LifecycleError(f"{type(module).__name__} has no delta named {old!r}")
    if layer.route == "replace" or site.replace == old:
        remove_delta(module, old)
        add_delta(module, new, layer, order)
        return
    if new != old and _name_taken(module, new):
        raise LifecycleError(f"{type(module).__name__} already has an attribute or child named {new!r}")
    site.unplace(old)
    leaving = module._modules.pop(old)
    module._modules[new] = layer
    leaving.on_remove(module)
    layer.on_add(module)
    site.place(layer.route, new, order)
    site.refresh(module)


#: a delta's layers where they act: (module or span, layer) pairs
Placed = Sequence[tuple["nn.Module | Span", DeltaLayer]]


def switch_deltas(old: str, old_order: OrderKey, old_layers: Placed, new: str, new_order: OrderKey, new_layers: Placed) -> Callable[[], None]:
    """Take delta `old` out of its modules and add delta `new` to its own in one step: where both act
    on one module the layer is swapped with :func:`swap_delta`, so the hooks stay. All or nothing;
    returns a function that puts `old` back exactly."""
    old_at = {id(site): layer for site, layer in old_layers}
    new_ids = {id(site) for site, _ in new_layers}
    done: list[tuple[nn.Module | Span, DeltaLayer | None]] = []  # (module, the old layer swapped out there)

    def undo_new() -> None:
        for site, old_layer in reversed(done):
            if old_layer is None:
                remove_delta(site, new)
            else:
                swap_delta(site, new, old, old_layer, old_order)

    try:
        for site, layer in new_layers:
            previous = old_at.get(id(site))
            if previous is None:
                add_delta(site, new, layer, new_order)
            else:
                swap_delta(site, old, new, layer, new_order)
            done.append((site, previous))
    except Exception:
        undo_new()
        raise
    for site, _ in reversed(old_layers):
        if id(site) not in new_ids:
            remove_delta(site, old)

    def put_back() -> None:
        for site, layer in old_layers:
            if id(site) not in new_ids:
                add_delta(site, old, layer, old_order)
        undo_new()

    return put_back


def remove_delta(module: nn.Module | Span, name: str) -> DeltaLayer:
    """Undo :func:`add_delta`; the last removal restores the module's hooks and forward exactly."""
    if isinstance(module, Span):
        start_site = site_of(module.start)
        if module.start is not module.end and start_site is not None and name in start_site.span_starts:
            del start_site.span_starts[name]
            start_site.refresh(module.start)
            if start_site.empty:
                del module.start.__dict__[_SITE_ATTR]
        return remove_delta(module.end, name)
    site = site_of(module)
    layer = module._modules.pop(name)
    layer.on_remove(module)
    if site is not None:
        site.span_inputs.pop(name, None)
        site.unplace(name)
        if site.replace == name:
            site.replace = None
        site.refresh(module)
        if site.empty:
            del module.__dict__[_SITE_ATTR]
    return layer  # type: ignore[return-value]


def _add_scaled(
    layer: DeltaLayer, h_in: torch.Tensor, h: torch.Tensor, rows: torch.Tensor | None, scale: float | torch.Tensor
) -> torch.Tensor:
    """`h` plus ``scale * m(h_in)`` on `rows` (None: every row); a tensor `scale` has one factor per row of `rows`."""
    if rows is None:
        return h + layer.scaled_change(h_in, scale)
    return h.index_add(0, rows, layer.scaled_change(h_in.index_select(0, rows), scale))
