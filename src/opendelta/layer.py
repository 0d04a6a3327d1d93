"""The method author's contract: what a delta layer is, and helpers to read and rewrite a module's call.

A delta method builds one :class:`DeltaLayer` per module it modifies. The layer computes ``m(h)``
in ``forward`` and declares, as class attributes, where it enters the data flow (`route`) and how
it acts on part of a mixed batch (`mixed_rows`); the engine (opendelta.routing) does the rest.
Layers that need more of the call than the hidden state (a mask, a cache, labels) override
``route_call`` and use the helpers below (:func:`positional_names`, :func:`as_keywords`,
:func:`prepend`). docs/adding_a_method.md walks through adding a method.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from opendelta.errors import MergeError, MixedBatchError
from opendelta.precision import wrap_routes

#: mixed_rows values: the layer runs on its rows only / its class combines the layers of one module / refused
ROW_WISE = "row_wise"
COMBINED = "combined"
WHOLE_BATCH = "whole_batch"
MIXED_ROWS = (ROW_WISE, COMBINED, WHOLE_BATCH)


#: the layer attributes every call reads afresh (the scale, nn.Module's train/eval flag): setting them edits
#: nothing cached
_READ_PER_CALL = frozenset({"change_scale", "training"})


class DeltaLayer(nn.Module):
    """A delta module `m`. Subclasses implement ``forward(h)`` = m(h) and pick a `route`.

    The default routes add the delta: before ``h_in + m(h_in)``, after ``h_out + m(h_out)``,
    parallel ``h_out + m(h_in)``. Methods that are not additive (prefixes, prompts) override
    ``route_input`` / ``route_output`` / ``route_parallel``, or ``route_call`` for the whole call.

    The route ``"replace"`` (the module's forward is swapped for this layer's) has no method of its
    own: it is kept as the engine of the original OpenDelta's ``replace_module`` API.
    """

    is_delta_module: ClassVar[bool] = True
    #: "before", "after", "parallel", "replace" or "weights" (see the module docstring of opendelta.routing)
    route: ClassVar[str] = "after"
    #: for route "weights": the parameters (names relative to the module) :meth:`changed_parameters` changes
    parameter_names: tuple[str, ...] = ()
    #: how the layer acts on some rows of a mixed batch only: ROW_WISE (the ``route_*_rows`` methods),
    #: COMBINED (the layers of this class on one module become one call: :meth:`combine_rows`) or
    #: WHOLE_BATCH (refused). A class that overrides ``route_call`` must declare it.
    mixed_rows: ClassVar[str] = ROW_WISE
    #: whether a parallel layer's delta depends on the module's own tensors (DoRA rescales by its weight's
    #: norm): the engine then passes the module it acts on as ``module=`` to ``route_parallel`` and
    #: ``route_parallel_rows``. A reference kept by the layer would miss copies (deepcopy, data-parallel replicas).
    reads_module: ClassVar[bool] = False

    #: set by the precision policy (opendelta.precision) on a layer whose half-precision tensors it upcast: its
    #: routes then compute in its own dtype and return the hidden state's
    in_own_precision: bool = False
    #: set by ``DeltaBase.fuse()``: alone on a linear module, run merged into a cached copy of its weight when
    #: no gradient is recorded (opendelta.fused)
    serve_fused: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        wrap_routes(cls)
        if cls.mixed_rows not in MIXED_ROWS:
            raise TypeError(f"{cls.__name__}.mixed_rows is {cls.mixed_rows!r}; expected one of {MIXED_ROWS}")
        declared = any("mixed_rows" in klass.__dict__ for klass in cls.__mro__ if klass is not DeltaLayer)
        if cls.route_call is not DeltaLayer.route_call and not declared:
            # the row-wise path runs route_input on the selected rows, which an overridden route_call would bypass
            raise TypeError(
                f"{cls.__name__} overrides route_call, so it must declare how it acts on part of a mixed batch: "
                "mixed_rows = COMBINED (and implement combine_rows) or WHOLE_BATCH"
            )

    #: the factor on this layer's change at run time (DeltaBase.scale): ``h + scale * m(h)``; 1.0 runs the
    #: layer's own route, bit for bit as trained
    change_scale: float = 1.0
    #: counts the attributes set on the layer (but those read on every call), so what is cached from it (the
    #: fused route's merged weight) sees a plain Python attribute changed by hand, a float ``scaling``, not
    #: only its tensors
    attribute_edits: int = 0

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name not in _READ_PER_CALL:
            self.__dict__["attribute_edits"] = self.__dict__.get("attribute_edits", 0) + 1

    @classmethod
    def scalable(cls) -> bool:
        """Whether the change can be scaled: a layer that adds ``m(h)`` through a plain route (not a
        rewritten call, like a prefix or prompt, nor one that reads or swaps its module's weights)."""
        return cls.unscalable_reason() is None

    @classmethod
    def unscalable_reason(cls) -> str | None:
        """Why ``scale()`` cannot act on this class's layers, as the end of a sentence "its layers ...",
        or None when it can (scaling multiplies ``m(h)``, so a layer needs an added ``m(h)``)."""
        if cls.route == "weights":
            return (
                "stand in for the weights their module reads during the call (nn.MultiheadAttention projections, "
                "fused MoE experts, target_parameters), so they add no output m(h) that a scale could multiply"
            )
        if cls.reads_module:  # DoRA: the change depends on the module's weight norm, not on h alone
            return (
                "read their module to form their change (DoRA's weight norms, trainable tokens' rows and embed_scale), "
                "so it is not an added m(h) to scale"
            )
        if cls.route not in ("before", "after", "parallel") or cls.route_call is not DeltaLayer.route_call:
            return "rewrite the call of their module (a prefix or prompt) instead of adding a change to it"
        return None

    def scaled_change(self, h: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
        """``scale * m(h)``; a tensor `scale` holds one factor per batch row."""
        change = self(h)
        if isinstance(scale, torch.Tensor):
            # rows lead h's dimensions (a bias-like change may have fewer; it broadcasts over them)
            scale = scale.to(change.dtype).view(-1, *([1] * (max(h.dim(), change.dim()) - 1)))
        return change * scale

    def route_input(self, h: torch.Tensor) -> torch.Tensor:
        return h + self(h)

    def route_call(self, args: tuple, kwargs: dict, input_name: str | None) -> tuple[tuple, dict]:
        """A *before* delta's view of the whole call: it receives and returns ``(args, kwargs)``.

        By default it routes the first input through :meth:`route_input`. Methods that need more
        than the hidden state (an attention mask, a KV cache, labels) override this instead.
        """
        if args:
            return (self.route_input(args[0]), *args[1:]), kwargs
        if input_name is None or input_name not in kwargs:
            raise TypeError("the module was called without its input tensor")
        return args, {**kwargs, input_name: self.route_input(kwargs[input_name])}

    def route_output(self, h: torch.Tensor) -> torch.Tensor:
        return h + self(h)

    def on_add(self, module: nn.Module) -> None:
        """Called when this layer joins `module`'s data flow, for a layer that must set state on the
        module beyond the hooks (undone exactly by :meth:`on_remove`); by default nothing."""

    def on_remove(self, module: nn.Module) -> None:
        """Called when this layer has left `module` (it is no longer among its children)."""

    def route_parallel(self, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        return h_out + self(h_in)

    # A mixed batch (opendelta.mixed_batch) runs a delta on some rows of the batch only. ROW_WISE
    # deltas get that for free from the methods below: each computes on its rows and leaves the
    # others as they were. Deltas that change a call's shape (prefixes, prompts) cannot act on
    # part of a batch; a COMBINED class combines all of them on one module through combine_rows.

    def route_input_rows(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`route_input` on the batch rows `rows` (sorted indices) only."""
        return h.index_copy(0, rows, self.route_input(h.index_select(0, rows)))

    def route_output_rows(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`route_output` on the batch rows `rows` only."""
        return h.index_copy(0, rows, self.route_output(h.index_select(0, rows)))

    def route_parallel_rows(
        self, h_in: torch.Tensor, h_out: torch.Tensor, rows: torch.Tensor, **context: nn.Module
    ) -> torch.Tensor:
        """:meth:`route_parallel` on the batch rows `rows` only (`context`: ``module=`` for `reads_module` layers)."""
        part = self.route_parallel(h_in.index_select(0, rows), h_out.index_select(0, rows), **context)
        return h_out.index_copy(0, rows, part)

    def changed_parameters(self, module: nn.Module, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """For route "weights": the values the parameters named in :attr:`parameter_names` take during a
        call of `module`, given their `current` values (the parameters, or what earlier deltas made them)."""
        raise NotImplementedError(f"{type(self).__name__} declares route 'weights' but no changed_parameters()")

    def merged_parameters(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """New values of `module`'s parameters (by name) that compute what module and delta compute
        together, for deltas linear in them; others raise MergeError."""
        if self.route == "weights":  # what the delta does during a call, for good
            return self.changed_parameters(module, {key: module.get_parameter(key) for key in self.parameter_names})
        raise MergeError(
            f"{type(self).__name__} is not linear in the weights of the {type(module).__name__} it modifies, so it "
            "cannot be merged into them; keep it attached as a layer (or use LoRA / IA3 for merged inference)."
        )

    @classmethod
    def stack_rows(cls, parts: list[tuple[DeltaLayer, torch.Tensor]], batch_size: int) -> Any:
        """For parallel ROW_WISE layers: None (each runs on its rows alone), or one object whose
        ``route_parallel(h_in, h_out)`` adds every layer of `parts` (all of this class, on one module,
        unscaled, on disjoint rows) on its rows at once: a mixed batch of many tasks in one kernel."""
        return None

    @classmethod
    def combine_rows(cls, parts: list[tuple[DeltaLayer, torch.Tensor]], batch_size: int) -> Any:
        """One object whose ``route_call`` runs each layer of `parts` (all of this class, on one
        module) on its rows, for COMBINED layers; raise MixedBatchError where they cannot share a batch."""
        raise whole_batch_only(cls)


wrap_routes(DeltaLayer)


def whole_batch_only(cls: type[DeltaLayer]) -> MixedBatchError:
    """The error for a layer asked to act on part of a mixed batch that it can only act on whole."""
    return MixedBatchError(
        f"{cls.__name__} changes the whole call of its module, so it cannot act on part of a batch; "
        "give every row of a mixed batch this delta, or run it alone."
    )


def first_tensor(value: Any) -> torch.Tensor:
    """The hidden state inside a module's output: the tensor itself, or the first element."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):  # transformers' ModelOutput is an OrderedDict
        return next(iter(value.values()))
    if isinstance(value, (tuple, list)) and value:
        return value[0]
    raise TypeError(f"cannot find a hidden-state tensor in a {type(value).__name__}")


def with_first_tensor(value: Any, tensor: torch.Tensor) -> Any:
    """`value` with its hidden state replaced by `tensor`; everything else passes through."""
    if isinstance(value, torch.Tensor):
        return tensor
    if isinstance(value, dict):
        value[next(iter(value.keys()))] = tensor  # a fresh container made by this forward call
        return value
    if isinstance(value, tuple):
        return (tensor, *value[1:])
    return [tensor, *value[1:]]


def input_name(forward: Any) -> str | None:
    """Name of the first parameter of a module's forward, for inputs passed by keyword."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return None
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            return p.name
    return None


def positional_names(module: nn.Module) -> tuple[str, ...]:
    """Names of the parameters of the module's forward that can be passed positionally, in order."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def as_keywords(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    """Every argument of one call by keyword (`names` from :func:`positional_names`), for route_call."""
    if len(args) > len(names):
        raise TypeError(f"the module was called with {len(args)} positional arguments; its forward names {len(names)}")
    return {**dict(zip(names, args)), **kwargs}


def combined_order(parts: list[tuple[DeltaLayer, torch.Tensor]], batch_size: int, what: str) -> torch.Tensor:
    """For combine_rows: the permutation that puts the parts' rows, concatenated in order, back in
    batch order. Raises MixedBatchError unless every row of the batch belongs to one part."""
    covered = sum(int(rows.numel()) for _, rows in parts)
    if covered != batch_size:
        raise MixedBatchError(
            f"{what} changes the length of the sequence, so every row of a mixed batch must get one of the same "
            f"length on this module, but {batch_size - covered} of {batch_size} rows get none; give those rows "
            "such a delta too, or run them in a separate batch."
        )
    return torch.argsort(torch.cat([rows for _, rows in parts]))


def prepend(tensor: torch.Tensor, n: int, value: float | int, dim: int = -1) -> torch.Tensor:
    """`tensor` with `n` entries of `value` in front along `dim`: a sequence-aligned argument (an
    attention mask, token types, labels, a bias over keys) made room for `n` new leading tokens."""
    shape = list(tensor.shape)
    shape[dim] = n
    return torch.cat([tensor.new_full(shape, value), tensor], dim=dim)
