"""The original OpenDelta's (0.3.2) documented API on top of opendelta's engine.

Scripts written for the original call helpers that opendelta's own API does not need
(``trainable_parameters_names``, ``find_module``...), pass arguments it does not have
(``log(delta_ratio=...)``, ``attach(module=...)``, ``backend="hf"``, ``save_finetuned(push_to_dc=...)``)
and extend ``DeltaBase`` by inserting their own modules (``insert_sequential_module``,
``insert_parallel_module``, ``replace_module``). :class:`OriginalAPI` gives ``DeltaBase`` all of it
(opendelta.original_config does the same for configs). Every
call lands on the engine: an inserted module becomes a delta layer on the engine's routes
(sequential = *after*, parallel, replace), so it attaches, detaches bit for bit, saves and loads
like a built-in method. Differences are listed in docs/migrating_from_opendelta.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from opendelta.errors import CheckpointError, DeltaConfigError, LifecycleError, PatternError
from opendelta.layer import WHOLE_BATCH, DeltaLayer
from opendelta.leniency import relax

if TYPE_CHECKING:
    from opendelta.config import DeltaConfig
    from opendelta.delta_base import DeltaBase

# ----------------------------------------------------------------- the extension interface's layers


class InsertedModule(DeltaLayer):
    """A user's module inserted with the original's calls, with the original's calling convention.

    The subclasses below fix the route: after the module (``post_forward(output)`` gives the new
    output, else ``forward(hidden)``), before it (``pre_forward(*args, **kwargs)`` gives the new
    ``(args, kwargs)``), or beside it (``forward(input)`` is added to the output).
    """

    mixed_rows = WHOLE_BATCH  # a user's module may look across the rows of a batch

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


class InsertedAfter(InsertedModule):
    route = "after"

    def route_output(self, h: torch.Tensor) -> torch.Tensor:
        post = getattr(self.inner, "post_forward", None)
        return post(h) if post is not None else self.inner(h)


class InsertedBefore(InsertedModule):
    route = "before"

    def route_call(self, args: tuple, kwargs: dict, input_name: str | None) -> tuple[tuple, dict]:
        new_args, new_kwargs = self.inner.pre_forward(*args, **kwargs)
        return tuple(new_args), dict(new_kwargs)


class InsertedParallel(InsertedModule):
    route = "parallel"

    def route_parallel(self, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        return h_out + self.inner(h_in)


class Replacement(InsertedModule):
    """The original's replace_module: `inner` computes the module's output in its place."""

    route = "replace"


# ----------------------------------------------------------------- DeltaBase


class OriginalAPI:
    """The original ``DeltaBase``'s helpers, nn.Module view and extension interface, for ``DeltaBase``.

    The original's DeltaBase was an ``nn.Module`` whose children were the delta modules; here the
    same calls (``parameters()``, ``named_parameters()``, ``state_dict()``, ``train()``...) see this
    delta's layers, named by where they sit in the backbone.
    """

    # ------------------------------------------------------------- nn.Module view of the deltas

    def named_modules(self, memo: Any = None, prefix: str = "", remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Module]]:
        """This delta's layers (and their sub-modules), named ``<module path>.<delta name>...``."""
        for path, layer in self.layers.items():  # type: ignore[attr-defined]
            base = f"{prefix}{path}.{self.name}" if path else f"{prefix}{self.name}"  # type: ignore[attr-defined]
            yield from layer.named_modules(prefix=base, remove_duplicate=remove_duplicate)

    def modules(self) -> Iterator[nn.Module]:
        for _, module in self.named_modules():
            yield module

    def children(self) -> Iterator[nn.Module]:
        yield from self.layers.values()  # type: ignore[attr-defined]

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """This delta's parameters, each once (a shared one under its first name)."""
        seen: set[int] = set()
        for path, layer in self.layers.items():  # type: ignore[attr-defined]
            base = f"{prefix}{path}.{self.name}" if path else f"{prefix}{self.name}"  # type: ignore[attr-defined]
            for name, p in layer.named_parameters(prefix=base, remove_duplicate=remove_duplicate):
                if remove_duplicate and id(p) in seen:
                    continue
                seen.add(id(p))
                yield name, p

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """This delta's tensors by their ``named_parameters`` names (buffers included)."""
        out: dict[str, torch.Tensor] = {}
        for path, layer in self.layers.items():  # type: ignore[attr-defined]
            base = f"{path}.{self.name}." if path else f"{self.name}."  # type: ignore[attr-defined]
            out.update(layer.state_dict(prefix=base, keep_vars=kwargs.get("keep_vars", False)))
        return out

    def train(self, mode: bool = True) -> OriginalAPI:
        for layer in self.layers.values():  # type: ignore[attr-defined]
            layer.train(mode)
        return self

    def eval(self) -> OriginalAPI:
        return self.train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "a delta model does not compute anything by itself: call the backbone model, which runs the attached deltas."
        )

    __call__ = forward

    # ------------------------------------------------------------- helpers of the original

    def trainable_parameters_names(self, module: nn.Module | None = None) -> list[str]:
        """Names of the trainable parameters of `module` (default: the backbone)."""
        module = self.backbone_model if module is None else module  # type: ignore[attr-defined]
        return [n for n, p in module.named_parameters() if p.requires_grad]

    def frozen_parameters_names(self, module: nn.Module | None = None) -> list[str]:
        """Names of the frozen parameters of `module` (default: the backbone)."""
        module = self.backbone_model if module is None else module  # type: ignore[attr-defined]
        return [n for n, p in module.named_parameters() if not p.requires_grad]

    def trainable_parameters(self, module: nn.Module | None = None) -> list[nn.Parameter]:
        """The trainable parameters of `module` (default: this delta's, as in the original)."""
        source = self if module is None else module
        return [p for _, p in source.named_parameters() if p.requires_grad]

    def num_trainable_parameters(self, module: nn.Module | None = None) -> int:
        """How many trainable numbers `module` (default: this delta) holds."""
        source = self if module is None else module
        return sum(p.numel() for p in source.parameters() if p.requires_grad)

    def num_total_parameters(self, module: nn.Module | None = None) -> int:
        """How many numbers `module` (default: this delta) holds."""
        source = self if module is None else module
        return sum(p.numel() for p in source.parameters())

    def find_key(self, key: str, target_list: Sequence[str]) -> bool:
        """Whether the module path `key` is addressed by `target_list` (and not excluded by this
        delta's exclude_modules), in opendelta's addressing syntax (plus the original's ``@`` names)."""
        from opendelta.addressing import matches
        from opendelta.structure.original_names import is_original_name

        for excluded in self.config.exclude_modules or ():  # type: ignore[attr-defined]
            if matches(key, excluded):
                return False
        plain = [t for t in target_list if not is_original_name(t)]
        if any(matches(key, t) for t in plain):
            return True
        roles = [t for t in target_list if is_original_name(t)]
        if roles:
            from opendelta.targets import resolve

            backbone = self.backbone_model  # type: ignore[attr-defined]
            return key in {t.path for t in resolve(backbone, roles, roles=True, strict=False)}
        return False

    def find_module(self, root_module: nn.Module, key: str) -> tuple[nn.Module, str, nn.Module]:
        """``(parent, child name, module)`` of the module at path `key` under `root_module`."""
        if not isinstance(key, str) or not key:
            raise PatternError(f"find_module needs a dotted module path, got {key!r}")
        parent_path, _, child = key.rpartition(".")
        try:
            parent = root_module.get_submodule(parent_path) if parent_path else root_module
            return parent, child, parent.get_submodule(child)
        except AttributeError:
            from opendelta.addressing import backbone_modules, suggest
            from opendelta.errors import NoMatchError

            raise NoMatchError(key, suggest(key, [p for p, _ in backbone_modules(root_module)]), "find_module") from None

    def set_active_state_dict(self, module: nn.Module) -> None:
        """Make ``state_dict()`` of `module` (the backbone) hold only trainable tensors, as
        ``freeze_module(set_state_dict=True)`` does."""
        if module is not self.backbone_model:  # type: ignore[attr-defined]
            raise LifecycleError("set_active_state_dict works on the delta's backbone model; pass delta.backbone_model")
        from opendelta.addressing import is_delta_module

        in_deltas = {id(p) for m in module.modules() if is_delta_module(m) for p in m.parameters()}
        kept = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in in_deltas]
        self.freeze_module(exclude=["deltas", *kept], set_state_dict=True)  # type: ignore[attr-defined]

    def create_config_from_model(self) -> DeltaConfig:
        """The delta's config (opendelta keeps one from construction on)."""
        return self.config  # type: ignore[attr-defined]

    def mark_as_delta(self, module: nn.Module | None = None) -> None:
        """Set ``_is_delta`` on every parameter of `module` (default: this delta's), as the original did."""
        for p in (self.parameters() if module is None else module.parameters()):
            p._is_delta = True  # type: ignore[attr-defined]

    def update_module(self, module: nn.Module, key: str) -> None:
        """Original-style methods implement this: build a module for the module at `key` and insert it."""
        raise NotImplementedError(f"{type(self).__name__} must implement update_module() (or new_layer())")

    def modify_module(self, module: nn.Module) -> None:
        """Original-style methods that change a module's own tensors implement this."""
        raise NotImplementedError(f"{type(self).__name__} does not implement modify_module()")

    # ------------------------------------------------------------- original-style methods

    @classmethod
    def builds_by_update_module(cls) -> bool:
        """Whether this class is written the original's way (``update_module`` calling insert_*)
        rather than opendelta's (``new_layer``)."""
        owner = next(k for k in cls.__mro__ if "new_layer" in k.__dict__)  # the engine's default raises
        return owner.__module__ == "opendelta.delta_base" and cls.update_module is not OriginalAPI.update_module

    def start_original_style(
        self, backbone_model: nn.Module, modified_modules: Sequence[str] | None, exclude_modules: Sequence[str] | None,
        unfrozen_modules: Sequence[str] | None, common_structure: bool, interactive_modify: bool | int,
        name: str | None, method_args: dict[str, Any],
    ) -> None:
        """DeltaBase.__init__ of an original-style class: an attached delta with no layers yet;
        the class's own __init__ then calls add_all_delta_to_backbone, whose update_module calls
        insert the layers."""
        from opendelta.interactive import choose_modules

        if interactive_modify:
            modified_modules = choose_modules(backbone_model, interactive_modify)
        config = self.config_class.from_dict(  # type: ignore[attr-defined]
            {"modified_modules": modified_modules, "exclude_modules": exclude_modules,
             "unfrozen_modules": unfrozen_modules, "common_structure": common_structure, **method_args},
            strict=True,
        )
        self._setup(backbone_model, config, [], name, None)  # type: ignore[attr-defined]
        self.attach()  # type: ignore[attr-defined]
        self.modified_modules = config.modified_modules
        self.exclude_modules = config.exclude_modules
        self.unfrozen_modules = config.unfrozen_modules or ["deltas"]
        self.common_structure = config.common_structure
        self.backend = "hf"
        self.delta_modules = nn.ModuleList()

    def add_all_delta_to_backbone(self, backbone: nn.Module, modified_modules: Sequence[str] | None) -> nn.Module:
        """Call update_module(backbone, path) for every module `modified_modules` (default: the
        class's defaults) addresses, minus exclude_modules."""
        from opendelta.targets import resolve_config

        # the original's classes keep their arguments as attributes (set after DeltaBase.__init__): the config records them
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self.config) if f.name in vars(self)}  # type: ignore[attr-defined]
        own.pop("modified_modules", None)
        config = dataclasses.replace(self.config, **own, modified_modules=None if modified_modules is None else list(modified_modules))  # type: ignore[attr-defined]
        defaults = tuple(type(self).default_modified_modules)  # type: ignore[attr-defined]
        for target in resolve_config(backbone, config, defaults, owner=type(self).__name__):
            self.update_module(backbone, target.path)
        self.config = config  # type: ignore[attr-defined]
        return backbone

    def layer_by_update_module(self, path: str, module: nn.Module) -> DeltaLayer:
        """new_layer() of an original-style class (a checkpoint being loaded): the layer its
        update_module inserts at `path`."""
        if not self.builds_by_update_module():
            raise NotImplementedError(f"{type(self).__name__} must implement new_layer()")
        for field in dataclasses.fields(self.config):  # type: ignore[attr-defined]
            if not hasattr(self, field.name):  # the original's classes read their arguments as attributes
                setattr(self, field.name, getattr(self.config, field.name))  # type: ignore[attr-defined]
        self._captured: list[DeltaLayer] = []
        try:
            self.update_module(self.backbone_model, path)  # type: ignore[attr-defined]
            if len(self._captured) != 1:
                raise LifecycleError(
                    f"{type(self).__name__}.update_module inserted {len(self._captured)} modules at {path!r}; "
                    "a delta inserts one module per addressed module."
                )
            return self._captured[0]
        finally:
            del self._captured

    # ------------------------------------------------------------- the extension interface

    def insert_module(
        self, module: nn.Module, method: str = "sequential", delta_module: nn.Module | None = None,
        delta_name: str = "delta", strict: bool = False, _delta_info: Any = None,
    ) -> None:
        """Put `delta_module` on `module`'s data flow: ``"sequential"`` (its ``post_forward``, else
        its forward, rewrites the output; a ``pre_forward`` rewrites the input), ``"parallel"``
        (its forward of the input is added to the output), or ``"before"`` / ``"after"``."""
        routes = {"sequential": None, "after": "after", "before": "before", "parallel": "parallel"}
        if method not in routes:
            raise PatternError(f"insert_module(method=...) takes one of {', '.join(map(repr, routes))}, got {method!r}")
        if delta_module is None:
            raise PatternError("insert_module needs delta_module=<the nn.Module to insert>")
        if _delta_info is not None:
            raise LifecycleError("_delta_info is the original's internal re-attach record; use attach() instead")
        route = routes[method]
        if route is None:
            route = "before" if hasattr(delta_module, "pre_forward") and not hasattr(delta_module, "post_forward") else "after"
        layer_class = {"after": InsertedAfter, "before": InsertedBefore, "parallel": InsertedParallel}[route]
        self._add_user_layer(module, layer_class(delta_module))

    def insert_sequential_module(self, module: nn.Module, delta_module: nn.Module | None = None, delta_name: str = "delta",
                                 strict: bool = False, _delta_info: Any = None) -> None:
        """Insert `delta_module` after `module` (``post_forward(output)``, else ``forward(hidden)``,
        gives the new output), or before it if it only has ``pre_forward``."""
        self.insert_module(module, "sequential", delta_module, delta_name, strict, _delta_info)

    def insert_parallel_module(self, module: nn.Module, delta_module: nn.Module | None = None, delta_name: str = "delta",
                               strict: bool = False, _delta_info: Any = None) -> None:
        """Insert `delta_module` beside `module`: its output on `module`'s input is added to `module`'s output."""
        self.insert_module(module, "parallel", delta_module, delta_name, strict, _delta_info)

    def replace_module(self, parent_module: nn.Module, child_name: str, child_module: nn.Module,
                       new_module: nn.Module, delta_name: str = "delta") -> None:
        """Let `new_module` compute in place of `parent_module.child_name` (the child stays in the
        model, so detach() gives it back exactly)."""
        if parent_module._modules.get(child_name) is not child_module:
            raise PatternError(f"{child_name!r} is not the child {type(child_module).__name__} of {type(parent_module).__name__}")
        self._add_user_layer(child_module, Replacement(new_module))

    def _add_user_layer(self, module: nn.Module, layer: DeltaLayer) -> None:
        """Register `layer` on the backbone module `module` as one of this delta's layers."""
        from opendelta.routing import add_delta
        from opendelta.targets import targets_at

        if hasattr(self, "_captured"):  # building for a checkpoint: layer_by_update_module takes it
            self._captured.append(layer)
            return
        backbone = self.backbone_model  # type: ignore[attr-defined]
        path = next((p for p, m in backbone.named_modules() if m is module), None)
        if path is None:
            raise PatternError(f"the {type(module).__name__} to insert into is not a module of this delta's backbone")
        if path in self.layers:  # type: ignore[attr-defined]
            raise LifecycleError(f"delta {self.name!r} already has a module at {path!r}; insert one per module")  # type: ignore[attr-defined]
        (target,), _ = targets_at(backbone, [path])
        like = next((p for p in module.parameters()), None)
        if like is not None:
            layer.to(device=like.device)
        if self.is_attached:  # type: ignore[attr-defined]
            add_delta(target.site, self.name, layer, self.order_key)  # type: ignore[attr-defined]
        self.layers[path] = layer  # type: ignore[attr-defined]
        self.register_target(target)
        if hasattr(self, "delta_modules"):
            self.delta_modules.append(layer)

    def register_target(self, target: Any) -> None:
        """Record a target added after construction (the extension interface)."""
        self._targets[target.path] = target  # type: ignore[attr-defined]

    # ------------------------------------------------------------- partial attach / detach

    def detach_part(self, module: nn.Module) -> OriginalAPI:
        """Take this delta's layers inside `module` out of the data flow (the rest stays)."""
        from opendelta.routing import remove_delta

        if not hasattr(self, "_parts_off"):
            self._parts_off: dict[str, DeltaLayer] = {}
        off = self._parts_off
        inside = {id(m) for m in module.modules()}
        for path, layer in self.layers.items():  # type: ignore[attr-defined]
            site = self._targets[path]  # type: ignore[attr-defined]
            if path not in off and all(id(m) in inside for m in site.modules):
                remove_delta(site.site, self.name)  # type: ignore[attr-defined]
                off[path] = layer
        return self

    def attach_part(self, module: nn.Module) -> OriginalAPI:
        """Put back this delta's layers inside `module` that detach(module=...) took out."""
        from opendelta.routing import add_delta

        off = getattr(self, "_parts_off", {})
        inside = {id(m) for m in module.modules()}
        for path in [p for p in off if all(id(m) in inside for m in self._targets[p].modules)]:  # type: ignore[attr-defined]
            add_delta(self._targets[path].site, self.name, off.pop(path), self.order_key)  # type: ignore[attr-defined]
        return self

    def all_parts_back(self) -> None:
        """Before a whole detach (or switch, merge): put back the layers a partial detach took out."""
        if getattr(self, "_parts_off", None):
            self.attach_part(self.backbone_model)  # type: ignore[attr-defined]

    # ------------------------------------------------------------- lenient arguments

    @staticmethod
    def check_save_arguments(delta: Any, state_dict: Mapping[str, torch.Tensor] | None, save_config: bool,
                             save_function: Any, push_to_dc: bool, delay_push: bool) -> None:
        """The original's save_finetuned arguments: DeltaCenter uploads are refused (it no longer
        exists); `state_dict` must hold what the delta saves anyway; the rest is accepted."""
        if push_to_dc:  # delay_push only postponed that upload
            raise CheckpointError(
                "push_to_dc uploads to the original OpenDelta's DeltaCenter, which no longer exists; save "
                "locally (save_finetuned(path)), or share it on the Hugging Face Hub with delta.push_to_hub('owner/name')."
            )
        if not save_config:
            relax(CheckpointError("save_config=False: opendelta always writes the config, which is the checkpoint's commit point"))
        if save_function is not torch.save and save_function is not None:
            relax(CheckpointError("save_function is ignored: opendelta writes safetensors, never pickles"))
        if state_dict is not None:
            backbone = delta.backbone_model.state_dict(keep_vars=True)
            own = {**{n: p for n, p in delta.backbone_model.named_parameters() if p.requires_grad}}
            for key, value in state_dict.items():
                current = backbone.get(key, own.get(key))
                if current is None or not torch.equal(current.detach().cpu(), value.detach().cpu()):
                    raise CheckpointError(
                        f"save_finetuned(state_dict=...) holds {key!r}, which is not this delta's current tensor; "
                        "opendelta saves the delta's own tensors: load the values into the model first, then save."
                    )

    @classmethod
    def from_config_and_state(
        cls, delta_config: DeltaConfig | None, state_dict: Mapping[str, torch.Tensor] | None,
        finetuned_delta_path: Any, backbone_model: nn.Module,
    ) -> DeltaBase:
        """The original's from_finetuned(delta_config=..., state_dict=...): build the delta from
        `delta_config` (else the folder's config) and load `state_dict` (else the folder's tensors),
        written either by opendelta (the backbone's state-dict keys) or by the original."""
        from opendelta.original_config import read_saved_config
        from opendelta.original_format import original_keys_as_backbone_keys
        from opendelta.registry import lookup

        if delta_config is None:
            delta_config = cls.config_class.from_finetuned(finetuned_delta_path)  # type: ignore[attr-defined]
        elif state_dict is None:
            saved = read_saved_config(finetuned_delta_path)
            if saved.to_dict() != delta_config.to_dict():
                raise DeltaConfigError(
                    f"delta_config differs from the config saved in {finetuned_delta_path!r} ({saved.to_dict()} vs "
                    f"{delta_config.to_dict()}); the saved tensors belong to the saved config: leave delta_config out."
                )
            return cls.from_finetuned(finetuned_delta_path, backbone_model)  # type: ignore[attr-defined]
        _, model_cls = lookup(delta_config.delta_type)
        delta = model_cls.from_config(delta_config, backbone_model)
        if state_dict is None:
            raise CheckpointError("from_finetuned(delta_config=...) without state_dict reads the folder's own config")
        own = {k for k in backbone_model.state_dict(keep_vars=True)}
        if not set(state_dict) <= own:  # keys as the original named its delta modules
            state_dict = original_keys_as_backbone_keys(delta_config.delta_type, state_dict, delta.name)
        result = backbone_model.load_state_dict(state_dict, strict=False)
        if result.unexpected_keys:
            delta.detach()
            raise CheckpointError(f"state_dict holds tensors this delta and backbone do not have: {result.unexpected_keys[:5]}")
        return delta

