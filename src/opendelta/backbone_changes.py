"""What one delta changes in its backbone besides adding its layers: the values of backbone tensors
it trains (an unfrozen head, LayerNorms), the ``requires_grad`` flags its ``freeze_module`` chose,
the state-dict filter, the input-gradient hook (input_grads.py) and the first-forward reach check
(reachability.py). Attach applies them, detach undoes them bit for bit; the claims (claims.py)
keep two attached deltas from owning one tensor or flag. A delta that never froze takes over the
freeze of the delta it replaces in a switch (:meth:`BackboneChanges.take_over_freeze`).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from opendelta.addressing import backbone_modules, is_delta_module, match_names
from opendelta.claims import check_value_free, claim_value, release_flag, release_value, set_flag
from opendelta.errors import LifecycleError, PatternError
from opendelta.input_grads import require_input_grads
from opendelta.leniency import OriginalBehaviourWarning
from opendelta.offload import check_trainable
from opendelta.reachability import FirstForwardCheck

if TYPE_CHECKING:
    from opendelta.delta_base import DeltaBase


@dataclass(frozen=True)
class FreezeRequest:
    """One freeze_module call as it was made: the sub-module's path (``""``: the backbone), the
    resolved `exclude` names and `set_state_dict`; replayed to hand a freeze to another delta."""

    path: str
    exclude: tuple[str, ...]
    set_state_dict: bool


class BackboneChanges:
    """The backbone tensors, flags and state-dict filter owned by one delta (`owner`)."""

    def __init__(self, owner: DeltaBase, reach_check: FirstForwardCheck | None = None) -> None:
        # weakly: a delta the user drops goes away at once (no reference cycle), and with it its claims
        self._owner = weakref.ref(owner)
        self.backbone = owner.backbone_model
        #: where no dummy pass could prove each target is called: the check at the first real forward
        self.reach_check = reach_check
        self.input_grad_handle: Any = None
        self.originals: dict[str, torch.Tensor] = {}  # backbone tensors the delta trains: values before
        self.tuned: dict[str, torch.Tensor] = {}  # ... and their tuned values while detached
        self.flags: dict[str, bool] = {}  # backbone parameter -> requires_grad chosen by freeze_module
        self.flagged: dict[int, nn.Parameter] = {}  # the parameters whose flags it set while attached
        self.filter_state_dict = False
        self._state_dict_handle: Any = None
        self.requests: list[FreezeRequest] = []  # the freeze_module calls behind `flags`, in order
        # the threads inside unfiltered_state_dict(): only their state_dict() calls see the whole model
        self._unfiltered_threads: list[int] = []

    @property
    def owner(self) -> DeltaBase:
        owner = self._owner()
        assert owner is not None, "a delta's backbone changes outlived the delta"
        return owner

    def trained_tensors(self, attached: bool) -> dict[str, torch.Tensor]:
        """The trained tensors by name: the live parameters while `attached`, else the values detach took out."""
        params = dict(self.backbone.named_parameters()) if attached and self.originals else {}
        return {n: params[n] if attached else self.tuned[n] for n in self.originals}

    def check_can_apply(self, action: str, leaving: BackboneChanges | None = None) -> None:
        """Before a detached delta attaches: raise LifecycleError if another attached delta owns a
        backbone tensor it trains, or if that tensor changed since detach (attach would overwrite
        the change). `leaving` belongs to a delta that detaches in the same step (switch)."""
        name_of = self.owner.name
        params = dict(self.backbone.named_parameters()) if self.tuned else {}
        for name, tuned in self.tuned.items():
            param = params.get(name)
            if param is None or param.shape != tuned.shape:
                raise LifecycleError(
                    f"cannot {action} delta {name_of!r}: the backbone tensor {name!r} it trains is "
                    f"{'gone' if param is None else f'now of shape {tuple(param.shape)}, not {tuple(tuned.shape)}'}; "
                    "attach it to the backbone it was trained on."
                )
            handing_over = leaving is not None and name in leaving.originals
            also_free = leaving.owner if handing_over else None
            check_value_free(param, name, self.owner, f"{action} delta {name_of!r}", also_free=also_free)
            current = leaving.originals[name] if handing_over else param.detach()
            if param.is_meta:
                continue
            left = self.originals[name].to(param.device, param.dtype)  # what detach() left, moved as the backbone
            if not torch.equal(current.to(param.device, param.dtype), left):
                raise LifecycleError(
                    f"cannot {action} delta {name_of!r}: the backbone tensor {name!r} changed while the delta was "
                    f"detached, and {name_of!r} trains that tensor, so attaching would overwrite the change with its "
                    "trained value (and a later detach() would not bring the change back). Put back the value detach() "
                    "left there (the backbone's own, e.g. from a freshly loaded copy) and attach again; to keep your "
                    "change, attach the delta to another copy of the backbone."
                )

    def apply(self, input_grad_handle: Any = None) -> None:
        """Swap in the trained values and set the flags (all or nothing), then install the state-dict
        filter, the input-gradient hook (or take over `input_grad_handle`) and the reach check."""
        params = dict(self.backbone.named_parameters()) if self.tuned or self.flags else {}
        swapped: list[str] = []
        try:
            with torch.no_grad():
                for name, tuned in self.tuned.items():
                    param = params[name]
                    # what the backbone holds now: the original, moved along with any .to() since detach
                    self.originals[name] = param.detach().clone()
                    param.copy_(tuned)
                    claim_value(param, self.owner)
                    swapped.append(name)
            for name, flag in self.flags.items():
                if name in params:  # another delta's parameter is here only while that delta is attached
                    set_flag(params[name], self.owner, flag)
                    self.flagged[id(params[name])] = params[name]
        except Exception:
            self._put_back({n: self.originals[n] for n in swapped})
            raise
        self.tuned = {}
        if self.filter_state_dict:
            self._install_state_dict_filter()
        self.input_grad_handle = require_input_grads(self.backbone) if input_grad_handle is None else input_grad_handle
        if self.reach_check is not None:
            self.reach_check.install()

    def undo(self, keep_input_grads: bool = False) -> Any:
        """Put back the backbone's own values and flags, keeping the trained values for the next apply(),
        and remove the hooks; with `keep_input_grads`, hand back the input-gradient hook instead of
        removing it (switch passes it to the next delta: it acts on the backbone, not on one delta)."""
        self.tuned = self._put_back(self.originals)
        if self._state_dict_handle is not None:
            self._state_dict_handle.remove()
            self._state_dict_handle = None
        handle, self.input_grad_handle = self.input_grad_handle, None
        if handle is not None and not keep_input_grads:
            handle.remove()
            handle = None
        if self.reach_check is not None:
            self.reach_check.remove()
        return handle

    def _put_back(self, originals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Put back the flags this delta set and the `originals` of the tensors it trains; return
        the values those tensors held (the trained ones)."""
        for param in reversed(self.flagged.values()):
            release_flag(param, self.owner)
        self.flagged = {}
        params = dict(self.backbone.named_parameters()) if originals else {}
        tuned: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, original in originals.items():
                param = params[name]
                tuned[name] = param.detach().clone()
                self.originals[name] = original.to(param.device, param.dtype)  # the stash follows .to() moves
                param.copy_(self.originals[name])
                release_value(param, self.owner)
        return tuned

    def load(self, backbone_tensors: Mapping[str, torch.Tensor]) -> None:
        """Record a checkpoint's trained values for a detached delta: apply() swaps them in, ownership checked."""
        params = dict(self.backbone.named_parameters())
        with torch.no_grad():
            for n, value in backbone_tensors.items():
                self.originals[n] = params[n].detach().clone()
                self.tuned[n] = value

    def freeze(self, module: nn.Module | None, exclude: Sequence[str], set_state_dict: bool, attached: bool) -> None:
        """The body of :meth:`DeltaBase.freeze_module` (see there), `exclude` already checked."""
        root = self.backbone if module is None else module
        prefix = _path_of(self.backbone, root)
        inside = {id(m) for m in root.modules()}  # the delta's layers are not in there while it is detached
        targets = self.owner.targets
        own = {
            id(p): p for path, layer in self.owner.layers.items() if id(targets[path].module) in inside
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
            for path in match_names(module_paths + param_paths, names, "freeze_module exclude", strict=None):
                if path in params:
                    trainable.add(id(params[path]))
                else:
                    trainable.update(id(p) for p in root.get_submodule(path).parameters() if id(p) not in delta_ids)
        flags = {prefix + n: id(p) in trainable for n, p in params.items() if id(p) not in own_ids}
        trained = {prefix + n: p for n, p in params.items() if id(p) in trainable and id(p) not in delta_ids}
        for name, param in trained.items():  # refuse before changing anything
            check_trainable(name, self.backbone.get_submodule(name.rpartition(".")[0]))
            check_value_free(param, name, self.owner, f"let delta {self.owner.name!r} train {name!r}")
        with torch.no_grad():
            for name, param in trained.items():
                if name not in self.originals:
                    self.originals[name] = param.detach().clone()
                    if attached:
                        claim_value(param, self.owner)
                    else:  # not trained yet: attach() puts the same value in
                        self.tuned[name] = param.detach().clone()
        for p in own.values():
            p.requires_grad_(id(p) in trainable)
        self.flags.update(flags)
        if attached:
            by_name = {prefix + n: p for n, p in params.items()}
            for name, flag in flags.items():
                set_flag(by_name[name], self.owner, flag)
                self.flagged[id(by_name[name])] = by_name[name]
        if set_state_dict:
            self.filter_state_dict = True
            if attached and self._state_dict_handle is None:
                self._install_state_dict_filter()
        self.requests.append(FreezeRequest(prefix.rstrip("."), tuple(exclude), set_state_dict))

    def take_over_freeze(self, leaving: BackboneChanges) -> Callable[[], None]:
        """Before this (detached) delta replaces `leaving` in a switch: if it never froze and `leaving`
        did, record `leaving`'s freeze_module calls as its own, so the backbone stays frozen for the
        next task (the original OpenDelta's freeze outlived the delta; ours is undone by the last
        detach). Backbone tensors `leaving` trained become this delta's, from the backbone's own
        values. Returns the undo, for a switch that fails afterwards."""
        if self.requests or not leaving.requests:
            return lambda: None
        saved = (dict(self.originals), dict(self.tuned), dict(self.flags), self.filter_state_dict)
        own = [p for layer in self.owner.layers.values() for p in layer.parameters()]
        own_flags = [p.requires_grad for p in own]

        def forget() -> None:
            self.originals, self.tuned, self.flags, self.filter_state_dict = saved
            self.requests = []
            for p, flag in zip(own, own_flags):
                p.requires_grad_(flag)

        try:
            with warnings.catch_warnings():  # an unmatched exclude name was reported at the call itself
                warnings.simplefilter("ignore", OriginalBehaviourWarning)
                for request in leaving.requests:
                    module = self.backbone.get_submodule(request.path) if request.path else None
                    self.freeze(module, request.exclude, request.set_state_dict, attached=False)
        except Exception:
            forget()
            raise
        return forget

    @contextlib.contextmanager
    def unfiltered_state_dict(self) -> Iterator[None]:
        """Inside, the backbone's ``state_dict()`` is not cut down to the trainable tensors (export_merged
        reads the whole model from it without merging the delta into the live weights). Only the calling
        thread's calls are affected: another thread's ``state_dict()`` stays filtered meanwhile."""
        self._unfiltered_threads.append(threading.get_ident())
        try:
            yield
        finally:
            self._unfiltered_threads.remove(threading.get_ident())

    def _install_state_dict_filter(self) -> None:
        def trainable_only(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
            if self.owner.is_merged or threading.get_ident() in self._unfiltered_threads:  # a whole model, never a part of one
                return
            keep = {prefix + n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
            for key in [k for k in state_dict if k.startswith(prefix) and k not in keep]:
                del state_dict[key]

        self._state_dict_handle = self.backbone.register_state_dict_post_hook(trainable_only)


def _path_of(root: nn.Module, module: nn.Module) -> str:
    if module is root:
        return ""
    for path, candidate in root.named_modules():
        if candidate is module:
            return path + "."
    raise PatternError("freeze_module(module=...) must be a sub-module of the backbone")
