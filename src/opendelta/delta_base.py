"""The delta lifecycle shared by every method: place, build, attach, freeze, detach, save, load.

A method subclasses :class:`DeltaBase`, names its config class and default positions, and
implements :meth:`DeltaBase.new_layer`; everything else lives here and knows no method (saving
and loading in serialization.py, parameter counts and log() in reporting.py, behind thin methods).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import threading
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from rich.console import Console
from torch import nn

from opendelta import export, reporting, scaling, serialization
from opendelta.addressing import ancestors, backbone_modules, is_delta_module, match_names
from opendelta.claims import check_value_free, claim_value, release_flag, release_value, set_flag
from opendelta.config import DeltaConfig, check_delta_name, check_name_list, is_finite_number
from opendelta.distributed import ARRIVAL_TIMEOUT_S
from opendelta.errors import (
    DeltaConfigError,
    LifecycleError,
    MergeError,
    PatternError,
    RuntimeInitError,
    UnreachedModuleError,
    UnsupportedModuleError,
)
from opendelta.input_grads import require_input_grads
from opendelta.interactive import choose_modules
from opendelta.layer import DeltaLayer
from opendelta.reachability import FirstForwardCheck
from opendelta.registry import RegisteredConfig, RegisteredType, register
from opendelta.routing import (
    DATA_FLOW_LOCK,
    OrderKey,
    Span,
    add_delta,
    mixing_anywhere,
    remove_delta,
    site_of,
    swap_delta,
)
from opendelta.runtime_init import Observation, observe
from opendelta.targets import Target, resolve_config

D = TypeVar("D", bound="DeltaBase")
F = TypeVar("F", bound=Callable[..., Any])
#: in a module's __dict__: names of the deltas merged into its weights, in merge order
_MERGED_ATTR = "_opendelta_merged"

_stamp_lock = threading.Lock()
_last_stamp = 0


def _creation_stamp() -> int:
    """Nanoseconds since the epoch, strictly increasing within this process, so a delta created
    later gets a larger stamp (across processes too, as far as their clocks agree)."""
    global _last_stamp
    with _stamp_lock:
        _last_stamp = max(time.time_ns(), _last_stamp + 1)
        return _last_stamp


def _checked_position(order: Any) -> float:
    if not is_finite_number(order):
        raise DeltaConfigError(
            f"order must be a finite number, got {order!r}: a negative order runs the delta before the deltas "
            "of the default order 0 on the modules it shares with them, a positive one after them."
        )
    return order


def _changes_data_flow(method: F) -> F:
    """Run a lifecycle method holding DATA_FLOW_LOCK, so no thread plans a mixed batch on a half-changed model."""

    @functools.wraps(method)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with DATA_FLOW_LOCK:
            return method(*args, **kwargs)

    return locked  # type: ignore[return-value]


class DeltaBase:
    """A set of delta layers placed on a backbone, attachable and detachable as one.

    Constructing attaches. ``detach()`` restores the backbone bit for bit (forwards, hooks,
    children, state-dict keys, the ``requires_grad`` flags freeze_module set, and the values of
    backbone tensors this delta trained); ``attach()`` re-applies the same layers, flags and
    trained values, so the tuned outputs come back exactly.
    """

    #: a method declares both; declaring delta_type registers the class (see registry.py), and a
    #: class that declares neither inherits its base's or learns them from AutoDeltaModel.register
    delta_type: ClassVar[str] = RegisteredType()
    config_class: ClassVar[type[DeltaConfig]] = RegisteredConfig(DeltaConfig)
    #: where the method goes when the user names no modules: common-structure roles
    default_modified_modules: ClassVar[tuple[str, ...]] = ()
    #: whether new_layer needs the observed hidden-state shapes; every method runs the dummy forward pass (it
    #: also proves each target is called), but only these fail when no dummy input can be made
    needs_runtime_init: ClassVar[bool] = False
    #: whether new_layer can build a (parallel) layer for a span ``"start->end"`` of two modules
    accepts_spans: ClassVar[bool] = False

    def __init_subclass__(cls, replace: bool = False, **kwargs: Any) -> None:
        """A class declaring ``delta_type`` registers itself; ``class M(LoraModel, replace=True)``
        takes over a type already registered (else DuplicateDeltaTypeError)."""
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("delta_type")
        if isinstance(declared, str) and declared:
            register(declared, cls.config_class, cls, replace=replace)
        elif replace:
            raise DeltaConfigError(f"{cls.__name__} has replace=True but declares no delta_type to take over")

    def __init__(
        self,
        backbone_model: nn.Module,
        modified_modules: Sequence[str] | None = None,
        exclude_modules: Sequence[str] | None = None,
        unfrozen_modules: Sequence[str] | None = None,
        common_structure: bool = False,
        interactive_modify: bool | int = False,
        *,
        name: str | None = None,
        dummy_inputs: Any = None,
        order: float | None = None,
        **method_args: Any,
    ):
        position = 0 if order is None else _checked_position(order)
        if interactive_modify:
            modified_modules = choose_modules(backbone_model, interactive_modify)
        config = self.config_class.from_dict(
            {
                "modified_modules": modified_modules,
                "exclude_modules": exclude_modules,
                "unfrozen_modules": unfrozen_modules,
                "common_structure": common_structure,
                **method_args,
            }
        )
        self._setup(backbone_model, config, self.resolve_targets(backbone_model, config), name, dummy_inputs)
        self._order = (position, self._order[1], "")
        self.attach()

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_config(
        cls: type[D], config: DeltaConfig | dict, backbone_model: nn.Module, *, name: str | None = None,
        dummy_inputs: Any = None, order: float | None = None,
    ) -> D:
        """Build and attach a delta of this class from a config object or dict."""
        position = 0 if order is None else _checked_position(order)
        if isinstance(config, dict):
            config = cls.config_class.from_dict(config)
        obj = cls.build_detached(
            backbone_model, config, cls.resolve_targets(backbone_model, config), name=name, dummy_inputs=dummy_inputs
        )
        obj._order = (position, obj._order[1], "")
        obj.attach()
        return obj

    @classmethod
    def build_detached(
        cls: type[D], backbone_model: nn.Module, config: DeltaConfig, targets: Sequence[Target], *,
        name: str | None = None, dummy_inputs: Any = None,
    ) -> D:
        """A delta of this class on `targets` (see resolve_targets(); a checkpoint's paths give them through
        :func:`opendelta.targets.targets_at`), its layers built but not attached: the backbone is
        untouched until attach() (or load_trained_state())."""
        obj = cls.__new__(cls)
        obj._setup(backbone_model, config, targets, name, dummy_inputs)
        return obj

    @classmethod
    def plan(cls, backbone_model: nn.Module, config: DeltaConfig | None = None, **config_values: Any) -> list[str]:
        """The module paths this method would modify, without touching the model (a dry run);
        :meth:`resolve_targets` gives the same places as :class:`~opendelta.targets.Target` values."""
        return [target.path for target in cls.resolve_targets(backbone_model, config, **config_values)]

    @classmethod
    def resolve_targets(
        cls, backbone_model: nn.Module, config: DeltaConfig | None = None, **config_values: Any
    ) -> list[Target]:
        """Where this method acts on `backbone_model` (see :func:`opendelta.targets.resolve_config`),
        resolved once: construction builds a delta layer per target. Touches nothing."""
        if config is None:
            config = cls.config_class.from_dict(config_values)
        return resolve_config(
            backbone_model, config, cls.default_modified_modules, owner=cls.__name__, accepts_spans=cls.accepts_spans
        )

    def _setup(
        self, backbone: nn.Module, config: DeltaConfig, targets: Sequence[Target], name: str | None, dummy_inputs: Any
    ) -> None:
        """Build every delta layer without touching the backbone."""
        check_delta_name(name)
        for target in targets:
            if isinstance(target.module, nn.Sequential):  # its forward would run the delta layer as a stage
                raise UnsupportedModuleError(
                    f"{target.end!r} is an nn.Sequential, which runs every child module in turn, so a delta layer "
                    "cannot live inside it; address the module that contains it, or the modules inside it, instead."
                )
        paths = [target.path for target in targets]
        self._targets: dict[str, Target] = {target.path: target for target in targets}
        observations, unverified = self._observe_targets(backbone, paths, dummy_inputs)
        self.backbone_model = backbone
        self.config = config
        self.prepare(observations)
        with torch.inference_mode(False):  # layers built under inference_mode would be untrainable inference tensors
            self.layers: dict[str, DeltaLayer] = {
                t.path: self.new_layer(t.path, t.site, observations.get(t.path)) for t in targets
            }
        self.name = self._free_name(name)
        self._order: tuple[float, int, str] = (0, _creation_stamp(), "")  # see order_key
        self._attached = False
        self._set_state_dict = False
        self._state_dict_handle: Any = None
        self._input_grad_handle: Any = None
        self._originals: dict[str, torch.Tensor] = {}  # backbone tensors this delta trains: values before
        self._tuned: dict[str, torch.Tensor] = {}  # ... and their tuned values while detached
        self._flags: dict[str, bool] = {}  # backbone parameter -> requires_grad chosen by freeze_module
        self._flagged: dict[int, nn.Parameter] = {}  # the parameters whose flags it set while attached
        self._homes: dict[str, tuple[torch.dtype, torch.device] | None] = {}  # path -> dtype, device at detach
        self._home_slots: dict[str, tuple[dict, str] | None] = {}  # path -> where _home() looks
        self._merged: dict[str, dict[str, torch.Tensor]] = {}  # path -> parameter values before merge()
        self._unloaded = False  # merge_and_unload() folded it into the weights for good
        self._reach_check = (
            FirstForwardCheck(backbone, {t.path: list(t.modules) for t in targets})
            if unverified
            else None
        )

    def _observe_targets(
        self, backbone: nn.Module, paths: Sequence[str], dummy_inputs: Any
    ) -> tuple[dict[str, Observation], bool]:
        """The dummy pass every method runs: new_layer's observations, and proof that the forward calls
        each target (UnreachedModuleError otherwise), since a delta on a module never called does nothing.

        Where no dummy pass can run and the method needs no observations (LoRA on a plain module
        without dummy_inputs), the proof waits for the model's first forward: returns ``({}, True)``.
        """
        try:
            return self.runtime_observe(backbone, paths, dummy_inputs), False
        except RuntimeInitError:
            if self.needs_runtime_init or dummy_inputs is not None:
                raise
            return {}, True

    def runtime_observe(self, backbone: nn.Module, paths: Sequence[str], dummy_inputs: Any) -> dict[str, Observation]:
        """What new_layer learns from the dummy pass at the targets' `paths`; a method that needs more
        than shapes overrides this.

        A span's observation is its start's input and its end's output.
        """
        targets = [self._targets[p] for p in paths]
        seen = observe(backbone, list(dict.fromkeys(side for t in targets for side in t.sides)), dummy_inputs)
        for t in targets:
            if t.is_span:
                seen[t.path] = dataclasses.replace(
                    seen[t.end], input_shape=seen[t.start].input_shape, input_dtype=seen[t.start].input_dtype
                )
        return seen

    def prepare(self, observations: Mapping[str, Observation]) -> None:
        """The build step before :meth:`new_layer`: where a method keeps state for one build (whatever
        ``new_layer`` shares among layers, or checks across `targets`). Called once per build by every
        constructor (``__init__``, ``from_config``, ``from_finetuned``) with `backbone_model`,
        `config` and `targets` set, and the `observations` new_layer will get (empty where no dummy
        pass could run); by default nothing."""

    def new_layer(self, path: str, module: nn.Module | Span, observation: Observation | None) -> DeltaLayer:
        """The delta layer for the module (or span, see `accepts_spans`) at `path`; raise
        UnsupportedModuleError if it cannot act there."""
        raise NotImplementedError(f"{type(self).__name__} must implement new_layer()")

    def _free_name(self, requested: str | None) -> str:
        def taken(candidate: str) -> bool:
            for target in self._targets.values():
                module = target.module
                if candidate in module._modules or hasattr(module, candidate):
                    return True
                if target.is_span and candidate in getattr(site_of(target.modules[0]), "span_starts", {}):
                    return True
            return False

        if requested is not None:
            if taken(requested):
                raise LifecycleError(f"a delta or attribute named {requested!r} already exists on a target module; pick another name")
            return requested
        candidate, n = self.delta_type or "delta", 0
        while taken(candidate):
            n += 1
            candidate = f"{self.delta_type or 'delta'}_{n}"
        return candidate

    # ----------------------------------------------------------------- lifecycle

    @property
    def is_attached(self) -> bool:
        return self._attached

    @property
    def targets(self) -> Mapping[str, Target]:
        """Module path (or span ``"start->end"``) -> where its layer acts (:class:`~opendelta.targets.Target`); read-only."""
        return types.MappingProxyType(self._targets)

    def trained_backbone_tensors(self) -> dict[str, torch.Tensor]:
        """The backbone tensors this delta trains (an unfrozen head, ...) by name, with its values:
        the live parameters while attached, the values detach() took out while detached."""
        params = dict(self.backbone_model.named_parameters()) if self._attached and self._originals else {}
        return {n: params[n] if self._attached else self._tuned[n] for n in self._originals}

    @property
    def order(self) -> float:
        """This delta's position among the deltas it shares modules with (``order=``, default 0)."""
        return self._order[0]

    @property
    def order_key(self) -> OrderKey:
        """Where this delta runs among the deltas of its route on each module it modifies, ascending:
        (order, creation stamp, content digest, name). Fixed at creation, carried by checkpoints,
        so attach history never changes it (README: "Several deltas live on one backbone")."""
        return (*self._order, self.name)

    @property
    def is_merged(self) -> bool:
        return bool(self._merged)

    def _check_free(self, action: str) -> None:
        """Refuse to change the data flow while a mixed batch (in any thread) has planned it."""
        if mixing_anywhere(self.backbone_model):
            raise LifecycleError(
                f"cannot {action} delta {self.name!r} while this or another thread is inside a mixed_batch() on its "
                "backbone; leave the block first (in another thread: let its batch end)"
            )

    @_changes_data_flow
    def attach(self) -> DeltaBase:
        """Put the delta layers, the trained backbone tensors and the requires_grad flags freeze_module
        chose back into the backbone; the layers first follow any ``.to()`` move it made meanwhile."""
        if self._attached:
            raise LifecycleError(f"delta {self.name!r} is already attached; detach() it first")
        if self._unloaded:
            raise LifecycleError(
                f"delta {self.name!r} was merged into the weights by merge_and_unload(), so attaching it would apply it "
                "twice; load its checkpoint onto a fresh backbone instead."
            )
        self._check_free("attach")
        self._check_backbone_tensors("attach")
        self._follow_backbone()
        done: list[str] = []
        try:
            for path, layer in self.layers.items():
                add_delta(self._targets[path].site, self.name, layer, self.order_key)
                done.append(path)
            self._after_attach()
        except Exception:
            for path in reversed(done):
                remove_delta(self._targets[path].site, self.name)
            raise
        return self

    def _after_attach(self, input_grad_handle: Any = None) -> None:
        """Everything attach() does beyond the layers; on failure it undoes its own part and raises."""
        self._apply_backbone_changes()
        if input_grad_handle is None:
            input_grad_handle = require_input_grads(self.backbone_model)
        self._input_grad_handle = input_grad_handle
        if self._reach_check is not None:
            self._reach_check.install()
        self._attached = True
        if self._set_state_dict:
            self._install_state_dict_filter()

    def _check_backbone_tensors(self, action: str, leaving: DeltaBase | None = None) -> None:
        """Before a detached delta attaches: raise LifecycleError if another attached delta owns a
        backbone tensor it trains, or if that tensor changed since detach (attach would overwrite
        the change). `leaving` is a delta that detaches in the same step (switch)."""
        params = dict(self.backbone_model.named_parameters()) if self._tuned else {}
        for name, tuned in self._tuned.items():
            param = params.get(name)
            if param is None or param.shape != tuned.shape:
                raise LifecycleError(
                    f"cannot {action} delta {self.name!r}: the backbone tensor {name!r} it trains is "
                    f"{'gone' if param is None else f'now of shape {tuple(param.shape)}, not {tuple(tuned.shape)}'}; "
                    "attach it to the backbone it was trained on."
                )
            owner = leaving if leaving is not None and name in leaving._originals else None
            check_value_free(param, name, self, f"{action} delta {self.name!r}", also_free=owner)
            current = owner._originals[name] if owner is not None else param.detach()
            if param.is_meta:
                continue
            left = self._originals[name].to(param.device, param.dtype)  # what detach() left, moved as the backbone
            if not torch.equal(current.to(param.device, param.dtype), left):
                raise LifecycleError(
                    f"cannot {action} delta {self.name!r}: the backbone tensor {name!r} changed while the delta was "
                    f"detached, and {self.name!r} trains that tensor, so attaching would overwrite the change with its "
                    "trained value (and a later detach() would not bring the change back). Put back the value detach() "
                    "left there (the backbone's own, e.g. from a freshly loaded copy) and attach again; to keep your "
                    "change, attach the delta to another copy of the backbone."
                )

    def _apply_backbone_changes(self) -> None:
        """Swap in the trained values of the backbone tensors this delta owns and set the flags its
        freeze_module chose; all or nothing."""
        params = dict(self.backbone_model.named_parameters()) if self._tuned or self._flags else {}
        swapped: list[str] = []
        try:
            with torch.no_grad():
                for name, tuned in self._tuned.items():
                    param = params[name]
                    # what the backbone holds now: the original, moved along with any .to() since detach
                    self._originals[name] = param.detach().clone()
                    param.copy_(tuned)
                    claim_value(param, self)
                    swapped.append(name)
            for name, flag in self._flags.items():
                if name in params:  # another delta's parameter is here only while that delta is attached
                    set_flag(params[name], self, flag)
                    self._flagged[id(params[name])] = params[name]
        except Exception:
            self._undo_backbone_changes({n: self._originals[n] for n in swapped})
            raise
        self._tuned = {}

    def _undo_backbone_changes(self, originals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Put back the flags this delta set and the `originals` of the tensors it trains; return
        the values those tensors held (the trained ones)."""
        for param in reversed(self._flagged.values()):
            release_flag(param, self)
        self._flagged = {}
        params = dict(self.backbone_model.named_parameters()) if originals else {}
        tuned: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, original in originals.items():
                param = params[name]
                tuned[name] = param.detach().clone()
                self._originals[name] = original.to(param.device, param.dtype)  # the stash follows .to() moves
                param.copy_(self._originals[name])
                release_value(param, self)
        return tuned

    @_changes_data_flow
    def detach(self) -> DeltaBase:
        """Take the delta out; the backbone computes exactly what it computed before the delta came.

        A merged delta is unmerged first, so its modules get their original weights back bit for bit.
        """
        if not self._attached:
            raise LifecycleError(f"delta {self.name!r} is not attached")
        self._check_free("detach")
        if self._merged:
            self.unmerge()
        for path in reversed(list(self.layers)):
            remove_delta(self._targets[path].site, self.name)
        self._after_detach()
        return self

    def _after_detach(self) -> None:
        self._homes = {path: self._home(path) for path in self.layers}
        self._tuned = self._undo_backbone_changes(self._originals)
        if self._state_dict_handle is not None:
            self._state_dict_handle.remove()
            self._state_dict_handle = None
        if self._input_grad_handle is not None:
            self._input_grad_handle.remove()
            self._input_grad_handle = None
        if self._reach_check is not None:
            self._reach_check.remove()
        self._attached = False

    def _follow_backbone(self) -> None:
        """Move each (detached) layer as the backbone's ``.to()`` moved its module since detach, as
        if the layer had stayed attached: same device, and the new dtype if the dtype changed."""
        if not self._homes:
            return
        with torch.inference_mode(False):  # a conversion under inference_mode would make untrainable tensors
            for path, layer in self.layers.items():
                before = self._homes.get(path)
                now = self._home(path)
                if before is None or now is None or before == now:
                    continue
                if now[1] != before[1]:
                    layer.to(device=now[1])
                if now[0] != before[0]:
                    layer.to(dtype=now[0])
        self._homes = {}

    def _home(self, path: str) -> tuple[torch.dtype, torch.device] | None:
        """The dtype and device the layer at `path` follows (see :func:`_home_slot`; looked up once)."""
        slot = self._home_slots.get(path)
        t = slot[0].get(slot[1]) if slot is not None else None
        if t is None or not t.is_floating_point():
            slot = self._home_slots[path] = _home_slot(self.backbone_model, self._targets[path])
            if slot is None:
                return None
            t = slot[0][slot[1]]
        return t.dtype, t.device

    @_changes_data_flow
    def switch(self, to: DeltaBase) -> DeltaBase:
        """Detach this delta and attach `to` in one step; returns `to`.

        Equivalent to ``self.detach(); to.attach()``, but on the modules both deltas modify the
        hooks stay installed and only the delta children change, so serving many tasks on one
        backbone switches in well under a millisecond.
        """
        self._check_free("switch")
        if not isinstance(to, DeltaBase) or to.backbone_model is not self.backbone_model:
            raise LifecycleError(f"switch(to=...) needs another delta on the same backbone as {self.name!r}, got {to!r}")
        if not self._attached or self._merged:
            raise LifecycleError(f"switch() starts from an attached, unmerged delta; {self.name!r} is not")
        if to._attached:
            raise LifecycleError(f"delta {to.name!r} is already attached; switch to a detached delta")
        to._check_backbone_tensors("switch to", leaving=self)
        to._follow_backbone()
        old_by_module = {id(self._targets[p].site): p for p in self.layers}
        new_paths = {id(to._targets[p].site) for p in to.layers}
        done: list[tuple[str, str | None]] = []  # (new path, old path swapped out there)

        def undo_swaps() -> None:
            for path, old in reversed(done):
                module = to._targets[path].site
                if old is None:
                    remove_delta(module, to.name)
                else:
                    swap_delta(module, to.name, self.name, self.layers[old], self.order_key)

        try:
            for path, layer in to.layers.items():
                module = to._targets[path].site
                old = old_by_module.get(id(module))
                if old is None:
                    add_delta(module, to.name, layer, to.order_key)
                else:
                    swap_delta(module, self.name, to.name, layer, to.order_key)
                done.append((path, old))
        except Exception:
            undo_swaps()
            raise
        for path in reversed(list(self.layers)):
            if id(self._targets[path].site) not in new_paths:
                remove_delta(self._targets[path].site, self.name)
        # the input-grad hook acts on the backbone, not on one delta: hand it over instead of re-registering
        handle, self._input_grad_handle = self._input_grad_handle, None
        self._after_detach()
        try:
            to._after_attach(input_grad_handle=handle)
        except Exception:  # put self back exactly: its layers, then its tensors, flags and hooks
            for path in self.layers:
                if id(self._targets[path].site) not in new_paths:
                    add_delta(self._targets[path].site, self.name, self.layers[path], self.order_key)
            undo_swaps()
            self._homes = {}
            self._after_attach(input_grad_handle=handle)
            raise
        return to

    # ----------------------------------------------------------------- merging

    @_changes_data_flow
    def merge(self) -> DeltaBase:
        """Fold this delta into the weights of the modules it modifies, for zero-overhead inference.

        Only methods linear in a module's weights can merge (LoRA, IA3, BitFit on modules with a
        bias); others raise MergeError and nothing changes. The weights before the merge are kept
        (one copy of each merged tensor), so unmerge() and detach() restore them bit for bit.
        """
        if not self._attached:
            raise LifecycleError(f"delta {self.name!r} is detached; attach() it before merging")
        if self._merged:
            raise LifecycleError(f"delta {self.name!r} is already merged")
        scaling.check_unscaled(self, "merge")
        self._check_free("merge")
        folded: dict[str, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for path, layer in self.layers.items():
                folded[path] = layer.merged_parameters(self._targets[path].site)
        seen: dict[int, int] = {}
        for _, p in self.backbone_model.named_parameters(remove_duplicate=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
        for path, values in folded.items():
            shared = [key for key in values if seen.get(id(getattr(self._targets[path].site, key)), 0) > 1]
            if shared:
                raise MergeError(
                    f"{path}.{shared[0]} is tied to another module's parameter (e.g. an LM head tied to the input "
                    "embeddings), so merging would change that module too; keep this delta unmerged there."
                )
        saved: dict[str, dict[str, torch.Tensor]] = {}
        with torch.no_grad():
            for path, values in folded.items():
                module = self._targets[path].site
                remove_delta(module, self.name)
                saved[path] = {}
                for key, value in values.items():
                    param = getattr(module, key)
                    saved[path][key] = param.detach().clone()
                    param.copy_(value)
                module.__dict__.setdefault(_MERGED_ATTR, []).append(self.name)
        self._merged = saved
        self._homes = {path: self._home(path) for path in saved}  # the layers out of the model follow it on unmerge
        return self

    @_changes_data_flow
    def unmerge(self) -> DeltaBase:
        """Undo merge(): the original weights come back bit for bit and the delta runs as layers again."""
        if not self._merged:
            raise LifecycleError(f"delta {self.name!r} is not merged")
        self._check_free("unmerge")
        for path in self._merged:
            stack = self._targets[path].site.__dict__[_MERGED_ATTR]
            if stack[-1] != self.name:
                raise LifecycleError(
                    f"delta {stack[-1]!r} merged into {path} after {self.name!r}; unmerge {stack[-1]!r} first"
                )
        self._follow_backbone()
        with torch.no_grad():
            for path, entry in self._merged.items():
                module = self._targets[path].site
                for key, original in entry.items():
                    getattr(module, key).copy_(original)
                stack = module.__dict__[_MERGED_ATTR]
                stack.pop()
                if not stack:
                    del module.__dict__[_MERGED_ATTR]
                add_delta(module, self.name, self.layers[path], self.order_key)
        self._merged = {}
        return self

    def scale(self, value: float) -> scaling.ScaleHandle:
        """Run this delta as ``h + value * m(h)`` until the returned handle is removed (``with delta.scale(0.5):``
        scales one block); 1.0 is the trained delta bit for bit. See :mod:`opendelta.scaling`."""
        return scaling.set_scale(self, value)

    @property
    def scale_factor(self) -> float:
        """The scale this delta runs with (see :meth:`scale`)."""
        return scaling.scale_of(self)

    def merge_and_unload(self) -> nn.Module:
        """Fold this delta into the weights for good and take it out (PEFT's name); returns the backbone,
        now a plain model. See :func:`opendelta.export.merge_and_unload`."""
        export.merge_and_unload(self)
        self._unloaded = True
        return self.backbone_model

    def export_merged(self, directory: str | os.PathLike, *, max_shard_size: int | str = "50GB") -> str:
        """Write the backbone with this delta merged to `directory` (``from_pretrained`` loads it); the model in
        memory is left as it was. See :func:`opendelta.export.export_merged`."""
        return export.export_merged(self, directory, max_shard_size=max_shard_size)

    # ----------------------------------------------------------------- freezing

    def delta_parameters(self) -> list[nn.Parameter]:
        """This delta's own parameters, each once (layers may share one, e.g. Compacter's shared rules)."""
        unique = {id(p): p for layer in self.layers.values() for p in layer.parameters()}
        return list(unique.values())

    def freeze_module(
        self, module: nn.Module | None = None, exclude: Sequence[str] | None = None, set_state_dict: bool = True
    ) -> None:
        """Freeze every parameter except those `exclude` names (``"deltas"`` = all delta parameters).

        Names follow the addressing syntax and match module or parameter paths. With
        `set_state_dict`, ``backbone.state_dict()`` holds only trainable tensors from now on, except
        while this delta is merged: then the weights hold it and the state dict is the whole model.
        The flags belong to this delta: detach() puts the backbone's own back, attach() re-applies
        them; on a detached delta they are recorded and take effect at attach(). Backbone tensors
        left trainable become this delta's (saved with it, restored by detach) and stay so.
        """
        if exclude is None:
            exclude = self.config.unfrozen_modules or ["deltas"]
        check_name_list(exclude, "freeze_module exclude", "exclude")
        root = self.backbone_model if module is None else module
        prefix = _path_of(self.backbone_model, root)
        inside = {id(m) for m in root.modules()}  # this delta's layers are not in there while it is detached
        own = {
            id(p): p for path, layer in self.layers.items() if id(self._targets[path].module) in inside
            for p in layer.parameters()
        }
        own_ids = set(own)
        delta_ids = {id(p) for m in root.modules() if is_delta_module(m) for p in m.parameters()} | own_ids
        params = dict(root.named_parameters())
        trainable: set[int] = set(delta_ids) if "deltas" in exclude else set()
        names = [e for e in exclude if e != "deltas"]
        if names:
            module_paths = [p for p, _ in backbone_modules(root)]
            param_paths = [n for n, p in params.items() if id(p) not in delta_ids]
            for path in match_names(module_paths + param_paths, names, "freeze_module exclude"):
                if path in params:
                    trainable.add(id(params[path]))
                else:
                    trainable.update(id(p) for p in root.get_submodule(path).parameters() if id(p) not in delta_ids)
        flags = {prefix + n: id(p) in trainable for n, p in params.items() if id(p) not in own_ids}
        trained = {prefix + n: p for n, p in params.items() if id(p) in trainable and id(p) not in delta_ids}
        for name, param in trained.items():  # refuse before changing anything
            check_value_free(param, name, self, f"let delta {self.name!r} train {name!r}")
        with torch.no_grad():
            for name, param in trained.items():
                if name not in self._originals:
                    self._originals[name] = param.detach().clone()
                    if self._attached:
                        claim_value(param, self)
                    else:  # not trained yet: attach() puts the same value in
                        self._tuned[name] = param.detach().clone()
        for p in own.values():
            p.requires_grad_(id(p) in trainable)
        self._flags.update(flags)
        if self._attached:
            by_name = {prefix + n: p for n, p in params.items()}
            for name, flag in flags.items():
                set_flag(by_name[name], self, flag)
                self._flagged[id(by_name[name])] = by_name[name]
        if set_state_dict:
            self._set_state_dict = True
            if self._attached and self._state_dict_handle is None:
                self._install_state_dict_filter()

    def _install_state_dict_filter(self) -> None:
        def trainable_only(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
            if self._merged:  # the weights hold this delta: the state dict is a whole model, never a part of one
                return
            keep = {prefix + n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
            for key in [k for k in state_dict if k.startswith(prefix) and k not in keep]:
                del state_dict[key]

        self._state_dict_handle = self.backbone_model.register_state_dict_post_hook(trainable_only)

    # ----------------------------------------------------------------- reporting

    def parameter_counts(self) -> dict[str, int]:
        """Numbers of parameters: ``total`` (backbone + deltas), ``trainable``, ``delta`` (this delta's)."""
        return reporting.parameter_counts(self)

    def log(self, console: Console | None = None) -> None:
        """Print where this delta sits and the trainable / delta parameter counts and ratios."""
        reporting.log(self, console)

    def __repr__(self) -> str:
        state = ("merged" if self._merged else "attached") if self._attached else "detached"
        return f"{type(self).__name__}(name={self.name!r}, modules={len(self.layers)}, {state})"

    # ----------------------------------------------------------------- checkpoints

    def save_finetuned(
        self,
        finetuned_delta_path: str | os.PathLike = "./delta_checkpoint",
        *,
        format: str = "opendelta",
        arrival_timeout_s: float = ARRIVAL_TIMEOUT_S,
    ) -> str:
        """Save this delta (and the backbone tensors it trains, e.g. an unfrozen head).

        ``format="opendelta"`` writes safetensors + JSON; ``format="peft"`` writes a PEFT adapter
        folder (LoRA only). In a distributed run (DDP, FSDP2, DeepSpeed ZeRO-3) call it on every
        rank: the ranks gather the (possibly sharded) delta tensors and rank 0 writes. A rank that
        does not arrive within `arrival_timeout_s` makes it raise DistributedSaveError (gloo).
        """
        return serialization.save_delta(self, finetuned_delta_path, format, arrival_timeout_s)

    @classmethod
    def from_finetuned(
        cls: type[D],
        finetuned_delta_path: str | os.PathLike,
        backbone_model: nn.Module,
        *,
        name: str | None = None,
        dummy_inputs: Any = None,
        verify: bool = True,
        order: float | None = None,
    ) -> D:
        """Load a checkpoint written by save_finetuned() (or a PEFT LoRA adapter folder) onto
        `backbone_model` and attach it.

        Everything is checked before the backbone is touched, the cheap checks first: the config,
        the tensors' header against the module list and the backbone's shapes, then the tensors'
        SHA-256 (``verify=False`` skips only that). A checkpoint that does not fit raises
        IncompatibleCheckpointError, a damaged one CorruptCheckpointError, naming what differs.
        The delta keeps the place among other deltas its checkpoint records; `order` overrides its
        position.
        """
        return serialization.load_delta(  # type: ignore[return-value]
            finetuned_delta_path,
            backbone_model,
            expected=None if cls is DeltaBase else cls,
            name=name,
            dummy_inputs=dummy_inputs,
            verify=verify,
            position=None if order is None else _checked_position(order),
        )

    def load_trained_state(
        self,
        layer_states: Mapping[str, Mapping[str, torch.Tensor]],
        backbone_tensors: Mapping[str, torch.Tensor],
        *,
        order: tuple[float, int, str],
    ) -> DeltaBase:
        """Give a delta fresh from build_detached() the trained state a checkpoint holds, and attach it:
        each layer's state dict (by path), the trained values of the backbone tensors it trains (by
        name; attach() swaps them in, ownership checked), and its place among other deltas (order,
        creation stamp, content digest: the first three parts of order_key)."""
        if self._attached:
            raise LifecycleError(f"delta {self.name!r} is attached; load_trained_state() fills a newly built delta")
        for path, layer in self.layers.items():
            layer.load_state_dict(dict(layer_states[path]))
        params = dict(self.backbone_model.named_parameters())
        with torch.no_grad():  # as if detached after training: attach() checks ownership and swaps the values in
            for n, value in backbone_tensors.items():
                self._originals[n] = params[n].detach().clone()
                self._tuned[n] = value
        self._order = order
        return self.attach()


def _home_slot(backbone: nn.Module, target: Target) -> tuple[dict, str] | None:
    """Where the first floating-point backbone tensor of the module a delta at `target` acts on lives
    (its ``_parameters`` or ``_buffers`` dict and key), or, for a module without one (an
    activation), that of its nearest ancestor with one: what flows through the module follows
    that tensor's dtype and device when the backbone is moved."""
    parents = [*list(ancestors(target.end))[1:], ""] if target.end else []
    # lazily: the first module that has a floating-point tensor ends the search
    for module in itertools.chain([target.module], (backbone.get_submodule(p) for p in parents)):
        for m in itertools.chain([module], (m for _, m in backbone_modules(module))):
            for tensors in (m._parameters, m._buffers):
                for key, t in tensors.items():
                    if t is not None and t.is_floating_point():
                        return tensors, key
    return None


def _path_of(root: nn.Module, module: nn.Module) -> str:
    if module is root:
        return ""
    for path, candidate in root.named_modules():
        if candidate is module:
            return path + "."
    raise PatternError("freeze_module(module=...) must be a sub-module of the backbone")
