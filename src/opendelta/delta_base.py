"""The delta lifecycle shared by every method: place, build, attach, freeze, detach, save, load.

A method subclasses :class:`DeltaBase`, names its config class and default positions, and
implements :meth:`DeltaBase.new_layer`; everything else lives here and knows no method (saving
and loading in serialization.py, parameter counts and log() in reporting.py, behind thin methods).
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch
from rich.console import Console
from torch import nn

from opendelta import export, hub, hub_cache, offload, reporting, scaling, serialization
from opendelta.backbone_changes import BackboneChanges
from opendelta.config import DeltaConfig, check_delta_name, check_name_list
from opendelta.distributed import ARRIVAL_TIMEOUT_S
from opendelta.errors import DeltaConfigError, LifecycleError, RuntimeInitError
from opendelta.fused import FuseHandle, set_fused
from opendelta.interactive import choose_modules
from opendelta.layer import DeltaLayer
from opendelta.merging import check_last_merged, merge_layers, unmerge_layers
from opendelta.ordering import checked_position, creation_stamp
from opendelta.original_api import OriginalAPI
from opendelta.placement import LayerHomes
from opendelta.precision import keep_precision
from opendelta.quantized import guard_cpu_repack
from opendelta.reachability import FirstForwardCheck
from opendelta.registry import RegisteredConfig, RegisteredType, register
from opendelta.routing import (
    DATA_FLOW_LOCK,
    OrderKey,
    Span,
    add_delta,
    changes_data_flow,
    mixing_anywhere,
    remove_delta,
    site_of,
    switch_deltas,
)
from opendelta.runtime_init import Observation, observe_targets
from opendelta.targets import Target, check_hostable, free_name, resolve_config

D = TypeVar("D", bound="DeltaBase")


class DeltaBase(OriginalAPI):
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
        if self.builds_by_update_module():  # a method written the original OpenDelta's way (original_api.py)
            return self.start_original_style(backbone_model, modified_modules, exclude_modules, unfrozen_modules,
                                             common_structure, interactive_modify, name, method_args)
        if interactive_modify:
            modified_modules = choose_modules(backbone_model, interactive_modify)
        config = self.config_class.from_dict(
            {
                "modified_modules": modified_modules,
                "exclude_modules": exclude_modules,
                "unfrozen_modules": unfrozen_modules,
                "common_structure": common_structure,
                **method_args,
            },
            strict=True,
        )
        self._build(backbone_model, config, name, dummy_inputs, order)

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_config(
        cls: type[D], config: DeltaConfig | dict, backbone_model: nn.Module, check_hash: bool = True, *,
        name: str | None = None, dummy_inputs: Any = None, order: float | None = None, **overrides: Any,
    ) -> D:
        """Build and attach a delta of this class from a config object or dict; `overrides` replace
        config values. (`check_hash` is the original's; a config holds no backbone hash here.)"""
        if isinstance(config, dict) or overrides:
            config = cls.config_class.from_dict({**(config if isinstance(config, dict) else config.to_dict()), **overrides})
        obj = cls.__new__(cls)
        obj._build(backbone_model, config, name, dummy_inputs, order)
        return obj

    def _build(self, backbone: nn.Module, config: DeltaConfig, name: str | None, dummy_inputs: Any, order: Any) -> None:
        position = 0 if order is None else checked_position(order)  # checked before anything is built
        self._setup(backbone, config, self.resolve_targets(backbone, config), name, dummy_inputs)
        self._order = (position, self._order[1], "")
        self.attach()

    @classmethod
    def build_detached(
        cls: type[D], backbone_model: nn.Module, config: DeltaConfig, targets: Sequence[Target], *,
        name: str | None = None, dummy_inputs: Any = None, proven_by: Sequence[DeltaBase] = (),
    ) -> D:
        """A delta of this class on `targets` (see resolve_targets(); a checkpoint's paths give them through
        :func:`opendelta.targets.targets_at`), its layers built but not attached: the backbone is
        untouched until attach() (or load_trained_state()).

        `proven_by`: deltas on the same backbone whose dummy pass already proved the forward calls these
        targets' modules (see :meth:`proven_targets`); if together they cover every target and this
        method needs no observations, no dummy pass runs (arithmetic builds its results this way)."""
        obj = cls.__new__(cls)
        obj._setup(backbone_model, config, targets, name, dummy_inputs, proven_by)
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
        self, backbone: nn.Module, config: DeltaConfig, targets: Sequence[Target], name: str | None, dummy_inputs: Any,
        proven_by: Sequence[DeltaBase] = (),
    ) -> None:
        """Build every delta layer without touching the backbone."""
        check_delta_name(name)
        check_hostable(targets)
        paths = [target.path for target in targets]
        self._targets: dict[str, Target] = {target.path: target for target in targets}
        guard_cpu_repack(backbone)  # before any forward of ours: a repacked 4-bit weight breaks backward
        if not self.needs_runtime_init and dummy_inputs is None and _all_proven(backbone, targets, proven_by):
            observations, unverified = {}, False  # what the dummy pass would prove is proven; nothing to observe
        else:
            observations, unverified = self._observe_targets(backbone, paths, dummy_inputs)
        self.backbone_model = backbone
        self.config = config
        with torch.inference_mode(False):  # layers built under inference_mode would be untrainable inference tensors
            self.prepare(observations)  # which may make tensors the layers share
            self.layers: dict[str, DeltaLayer] = {
                t.path: self.new_layer(t.path, t.site, observations.get(t.path)) for t in targets
            }
        offload.check_placement(backbone, ((t.path, t.module, self.layers[t.path]) for t in targets))
        keep_precision(self.layers.values(), config.delta_dtype)
        self.name = free_name(targets, name, self.delta_type or "delta")
        self._order: tuple[float, int, str] = (0, creation_stamp(), "")  # see order_key
        self._attached = False
        self._unloaded = False  # merge_and_unload() folded it into the weights for good
        self._changes = BackboneChanges(
            self, FirstForwardCheck(backbone, {t.path: list(t.modules) for t in targets}) if unverified else None
        )
        self._homes = LayerHomes(backbone, self._targets, self.layers)
        self._merged: dict[str, dict[str, torch.Tensor]] = {}  # path -> parameter values before merge()

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
        return observe_targets(backbone, [self._targets[p] for p in paths], dummy_inputs)

    def prepare(self, observations: Mapping[str, Observation]) -> None:
        """The build step before :meth:`new_layer`: where a method keeps state for one build (whatever
        ``new_layer`` shares among layers, or checks across `targets`). Called once per build by every
        constructor (``__init__``, ``from_config``, ``from_finetuned``) with `backbone_model`,
        `config` and `targets` set, and the `observations` new_layer will get (empty where no dummy
        pass could run); by default nothing."""

    def new_layer(self, path: str, module: nn.Module | Span, observation: Observation | None) -> DeltaLayer:
        """The delta layer for the module (or span, see `accepts_spans`) at `path`; raise
        UnsupportedModuleError if it cannot act there."""
        return self.layer_by_update_module(path, module)  # an original-style class, else NotImplementedError

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
        return self._changes.trained_tensors(self._attached)

    def proven_targets(self) -> dict[str, tuple[nn.Module, ...]]:
        """Target path -> its modules, for the targets the backbone's forward was shown to call (by the
        dummy pass at construction, or since by a real forward): all of them once the proof is done."""
        check = self._changes.reach_check
        pending = check.pending if check is not None else {}
        return {path: target.modules for path, target in self._targets.items() if path not in pending}

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

    def _placed(self) -> list[tuple[nn.Module | Span, DeltaLayer]]:
        return [(self._targets[path].site, layer) for path, layer in self.layers.items()]

    def _check_free(self, action: str) -> None:
        """Refuse to change the data flow while a mixed batch (in any thread) has planned it."""
        if mixing_anywhere(self.backbone_model):
            raise LifecycleError(
                f"cannot {action} delta {self.name!r} while this or another thread is inside a mixed_batch() on its "
                "backbone; leave the block first (in another thread: let its batch end)"
            )

    @changes_data_flow
    def attach(self, module: nn.Module | None = None, reset_state_dict: bool = True) -> DeltaBase:
        """Put the delta layers, the trained backbone tensors and the requires_grad flags freeze_module
        chose back into the backbone; the layers first follow any ``.to()`` move it made meanwhile.
        With `module` (a sub-module), only the layers inside it (see OriginalAPI.attach_part)."""
        if module is not None and module is not self.backbone_model:
            return self.attach_part(module)  # type: ignore[return-value]
        if self._attached:
            raise LifecycleError(f"delta {self.name!r} is already attached; detach() it first")
        if self._unloaded:
            raise LifecycleError(
                f"delta {self.name!r} was merged into the weights by merge_and_unload(), so attaching it would apply it "
                "twice; load its checkpoint onto a fresh backbone instead."
            )
        self._check_free("attach")
        self._changes.check_can_apply("attach")
        self._homes.follow()
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
        self._changes.apply(input_grad_handle)
        self._attached = True

    @changes_data_flow
    def detach(self, module: nn.Module | None = None, reset_state_dict: bool = True) -> DeltaBase:
        """Take the delta out; the backbone computes exactly what it computed before the delta came.

        A merged delta is unmerged first, so its modules get their original weights back bit for bit.
        With `module` (a sub-module), only the layers inside it leave (see OriginalAPI.detach_part).
        """
        if module is not None and module is not self.backbone_model:
            return self.detach_part(module)  # type: ignore[return-value]
        if not self._attached:
            raise LifecycleError(f"delta {self.name!r} is not attached")
        self.all_parts_back()
        self._check_free("detach")
        if self._merged:
            self.unmerge()
        for path in reversed(list(self.layers)):
            remove_delta(self._targets[path].site, self.name)
        self._after_detach()
        return self

    def _after_detach(self, keep_input_grads: bool = False) -> Any:
        self._homes.record(self.layers)
        handle = self._changes.undo(keep_input_grads)
        self._attached = False
        return handle

    @changes_data_flow
    def switch(self, to: DeltaBase) -> DeltaBase:
        """Detach this delta and attach `to` in one step; returns `to`.

        Equivalent to ``self.detach(); to.attach()``, but on the modules both deltas modify the
        hooks stay installed and only the delta children change, so serving many tasks on one
        backbone switches in well under a millisecond. One difference: if `to` never called
        freeze_module and this delta did, `to` takes over this delta's freeze (records the same
        calls as its own), so training task after task keeps the backbone frozen.
        """
        self._check_free("switch")
        if not isinstance(to, DeltaBase) or to.backbone_model is not self.backbone_model:
            raise LifecycleError(f"switch(to=...) needs another delta on the same backbone as {self.name!r}, got {to!r}")
        if not self._attached or self._merged:
            raise LifecycleError(f"switch() starts from an attached, unmerged delta; {self.name!r} is not")
        if to._attached:
            raise LifecycleError(f"delta {to.name!r} is already attached; switch to a detached delta")
        to._changes.check_can_apply("switch to", leaving=self._changes)
        to._homes.follow()
        put_back = switch_deltas(self.name, self.order_key, self._placed(), to.name, to.order_key, to._placed())
        handle = self._after_detach(keep_input_grads=True)  # the input-grad hook acts on the backbone: hand it over
        forget_freeze: Callable[[], None] = lambda: None
        try:
            forget_freeze = to._changes.take_over_freeze(self._changes)
            to._after_attach(input_grad_handle=handle)
        except Exception:  # put self back exactly: its layers, then its tensors, flags and hooks
            forget_freeze()
            put_back()
            self._homes.forget()
            self._after_attach(input_grad_handle=handle)
            raise
        return to

    # ----------------------------------------------------------------- merging

    @changes_data_flow
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
        self._merged = merge_layers(self.backbone_model, self._targets, self.layers, self.name)
        self._homes.record(self._merged)  # the layers out of the model follow it on unmerge
        return self

    @changes_data_flow
    def unmerge(self) -> DeltaBase:
        """Undo merge(): the original weights come back bit for bit and the delta runs as layers again."""
        if not self._merged:
            raise LifecycleError(f"delta {self.name!r} is not merged")
        self._check_free("unmerge")
        check_last_merged(self._targets, self._merged, self.name)
        self._homes.follow()
        unmerge_layers(self._targets, self.layers, self._merged, self.name, self.order_key)
        self._merged = {}
        return self

    def scale(self, value: float) -> scaling.ScaleHandle:
        """Run this delta as ``h + value * m(h)`` until the returned handle is removed (``with delta.scale(0.5):``
        scales one block); 1.0 is the trained delta bit for bit. See :mod:`opendelta.scaling`."""
        return scaling.set_scale(self, value)

    def fuse(self) -> FuseHandle:
        """Serve this delta fused, until the returned handle is removed: on each linear module where it is the
        only delta, a forward that records no gradient computes one linear map with a cached merged weight
        kept beside the untouched backbone weight (one extra copy per module). See :mod:`opendelta.fused`."""
        return set_fused(self.name, self.layers, self._refresh_routes, lambda: self._check_free("fuse or unfuse"))

    def _refresh_routes(self) -> None:
        """Re-decide the routes of the modules this delta's layers act on now (a changed run-time setting)."""
        if not self._attached or self._merged:
            return
        with DATA_FLOW_LOCK:
            for site, _ in self._placed():
                for module in (site.start, site.end) if isinstance(site, Span) else (site,):
                    routes = site_of(module)
                    if routes is not None:
                        routes.refresh(module)

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
        them; on a detached delta they are recorded and take effect at attach(); switch() hands them
        to a delta that never froze (see there). Backbone tensors
        left trainable become this delta's (saved with it, restored by detach) and stay so.
        """
        if exclude is None:
            exclude = self.config.unfrozen_modules or ["deltas"]
        check_name_list(exclude, "freeze_module exclude", "exclude")
        self._changes.freeze(module, exclude, set_state_dict, self._attached)

    # ----------------------------------------------------------------- reporting

    def parameter_counts(self) -> dict[str, int]:
        """Numbers of parameters: ``total`` (backbone + deltas), ``trainable``, ``delta`` (this delta's)."""
        return reporting.parameter_counts(self)

    def log(self, module: nn.Module | None = None, delta_ratio: bool = True, trainable_ratio: bool = True,
            visualization: bool = True, cuda_memory: bool = True, *, console: Console | None = None) -> None:
        """Print the tree of `module` (default: the backbone; ``visualization=False`` skips it), where
        this delta sits, and the trainable / delta parameter counts and ratios."""
        reporting.log(self, console, module=module, visualization=visualization, cuda_memory=cuda_memory)

    def __repr__(self) -> str:
        state = ("merged" if self._merged else "attached") if self._attached else "detached"
        return f"{type(self).__name__}(name={self.name!r}, modules={len(self.layers)}, {state})"

    # ----------------------------------------------------------------- checkpoints

    def save_finetuned(
        self,
        finetuned_delta_path: str | os.PathLike = "./delta_checkpoint",
        save_config: bool = True,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        save_function: Callable[..., Any] | None = torch.save,
        push_to_dc: bool = False,
        *,
        format: str = "opendelta",
        arrival_timeout_s: float = ARRIVAL_TIMEOUT_S,
        delay_push: bool = False,
        **center_args: Any,
    ) -> str:
        """Save this delta (and the backbone tensors it trains, e.g. an unfrozen head).

        ``format="opendelta"`` writes safetensors + JSON; ``format="peft"`` writes a PEFT adapter
        folder (methods PEFT also has, docs/shipping.md). In a distributed run (DDP, FSDP2, DeepSpeed
        ZeRO-3) call it on every rank: the ranks gather the (possibly sharded) delta tensors and rank 0
        writes. A rank that does not arrive within `arrival_timeout_s` makes it raise DistributedSaveError (gloo).
        """
        # the original's arguments (save_config, state_dict, DeltaCenter ones in center_args): see original_api.py
        self.check_save_arguments(self, state_dict, save_config, save_function, push_to_dc, delay_push)
        return serialization.save_delta(self, finetuned_delta_path, format, arrival_timeout_s)

    @classmethod
    def from_finetuned(
        cls: type[D],
        finetuned_delta_path: str | os.PathLike,
        backbone_model: nn.Module,
        delta_config: DeltaConfig | None = None,
        cache_dir: str | os.PathLike | None = None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        *,
        name: str | None = None,
        dummy_inputs: Any = None,
        verify: bool = True,
        order: float | None = None,
        force_download: bool = False,
        check_hash: bool = True,
        local_files_only: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
    ) -> D:
        """Load a checkpoint written by save_finetuned() (or a PEFT LoRA adapter folder) onto
        `backbone_model` and attach it.

        Everything is checked before the backbone is touched, the cheap checks first: the config,
        the tensors' header against the module list and the backbone's shapes, then the tensors'
        SHA-256 (``verify=False`` skips only that). A checkpoint that does not fit raises
        IncompatibleCheckpointError, a damaged one CorruptCheckpointError, naming what differs.
        The delta keeps the place among other deltas its checkpoint records; `order` overrides its
        position.

        A Hugging Face Hub repo id ("owner/name") is fetched through the Hub cache (`revision`,
        `cache_dir`, `local_files_only`, `force_download`, `token`; see opendelta.hub): the config
        first, the weights only once the backbone fits. An existing local folder wins over a repo id.
        """
        if delta_config is not None or state_dict is not None:  # the original's other ways in (original_api.py)
            return cls.from_config_and_state(delta_config, state_dict, finetuned_delta_path, backbone_model)  # type: ignore[return-value]
        load_args: dict[str, Any] = dict(
            expected=None if cls is DeltaBase else cls, name=name, dummy_inputs=dummy_inputs, verify=verify,
            position=None if order is None else checked_position(order),
        )
        repo_id = hub_cache.hub_repo_id(finetuned_delta_path, cache_dir, force_download)
        if repo_id is not None:
            return hub.load_from_hub(  # type: ignore[return-value]
                repo_id, backbone_model, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                force_download=force_download, token=token, **load_args,
            )
        folder = hub_cache.local_folder(finetuned_delta_path, cache_dir)
        return serialization.load_delta(folder, backbone_model, **load_args)  # type: ignore[return-value]

    def push_to_hub(
        self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
        commit_message: str | None = None, revision: str | None = None, base_model: str | None = None,
    ) -> str:
        """Save this delta with a model card (README.md) and upload it to the Hugging Face Hub repo
        `repo_id`, created if needed; returns the commit URL. See opendelta.hub."""
        return hub.push_to_hub(
            self, repo_id, private=private, token=token, commit_message=commit_message, revision=revision,
            base_model=base_model,
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
        self._changes.load(backbone_tensors)  # as if detached after training: attach() swaps the values in
        self._order = order
        return self.attach()


def _all_proven(backbone: nn.Module, targets: Sequence[Target], proven_by: Sequence[DeltaBase]) -> bool:
    """Whether deltas in `proven_by` on `backbone` proved that its forward calls every target's very modules."""
    proven: dict[str, tuple[nn.Module, ...]] = {}
    for delta in proven_by:
        if delta.backbone_model is backbone:
            proven.update(delta.proven_targets())
    return bool(targets) and all(
        t.path in proven and len(proven[t.path]) == len(t.modules) and all(a is b for a, b in zip(proven[t.path], t.modules))
        for t in targets
    )
