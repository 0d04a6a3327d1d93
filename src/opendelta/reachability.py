"""Whether the backbone's forward calls each module a delta is addressed to.

A delta lives in its module's call (hooks, a replaced forward), so on a module the forward never
calls it silently does nothing: ``nn.MultiheadAttention`` hands ``out_proj.weight`` to
``F.multi_head_attention_forward`` and never calls ``out_proj``. Construction refuses such modules
with :class:`UnreachedModuleError`; this file records what a forward calls and reads, and explains
what it did not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn
from torch.overrides import TorchFunctionMode

from opendelta.errors import UnreachedModuleError


class ParameterReads(TorchFunctionMode):
    """Records which parameters of `modules` (path -> module) torch functions take as arguments:
    a module whose weight is read but which is never called is read directly by the code around it."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        super().__init__()
        self._owner = {id(p): path for path, m in modules.items() for p in m.parameters(recurse=False)}
        self.read: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        for value in (*args, *(kwargs or {}).values()):
            for item in value if isinstance(value, (tuple, list)) else (value,):
                path = self._owner.get(id(item))
                if path is not None:
                    self.read.add(path)
        return func(*args, **(kwargs or {}))


def unreached_error(
    model: nn.Module, missing: Sequence[str], read: Iterable[str] | None, during: str = "the dummy forward pass"
) -> UnreachedModuleError:
    """The error naming every module in `missing` that `during` never called, each with the likely reason.

    `read` holds those whose parameters were read meanwhile (None: not recorded).
    """
    modules = dict(model.named_modules())
    read = set(read) if read is not None else None
    reasons = []
    for path in missing:
        module = modules[path]
        parent_path = path.rpartition(".")[0]
        parent = f"its parent {parent_path!r} ({type(modules[parent_path]).__name__})" if path else "its caller"
        if read is not None and path in read:
            why = (
                f"{parent} reads its weights directly instead of calling it (as nn.MultiheadAttention does with "
                "out_proj; calling its .forward() also skips the call), so a delta there would never run; address "
                "the parent, or modules the forward does call"
            )
        elif read is not None:
            why = (
                "it was neither called nor were its weights read: it runs only on some inputs or code paths "
                "(a branch this input does not take, only in generate(), ...) or not at all; pass dummy_inputs= "
                "that reach it, or leave it out of modified_modules"
            )
        else:
            why = (
                f"either {parent} reads its weights directly instead of calling it (as nn.MultiheadAttention does "
                "with out_proj), or it runs only on some inputs; address modules the forward calls (pass "
                "dummy_inputs= at construction to check this there)"
            )
        reasons.append(f"{path or '<the model itself>'!r} ({type(module).__name__}): {why}")
    return UnreachedModuleError(
        f"{during} never called {len(missing)} addressed module(s), so a delta on them would silently do "
        f"nothing: " + "; ".join(reasons) + "."
    )


class FirstForwardCheck:
    """Checks at the end of the backbone's next forwards that each of `targets` (path -> modules) was
    called, for deltas built without a dummy pass; once all were, it removes itself.

    Like a hook handle: ``install()`` puts its hooks on, ``remove()`` takes them off and leaves no trace.
    """

    def __init__(self, model: nn.Module, targets: Mapping[str, Sequence[nn.Module]]):
        self.model = model
        self.pending = {path: tuple(modules) for path, modules in targets.items()}
        self._called: set[int] = set()
        self._handles: list[Any] = []

    def install(self) -> None:
        if self._handles or not self.pending:
            return
        for module in {id(m): m for ms in self.pending.values() for m in ms}.values():
            self._handles.append(module.register_forward_pre_hook(self._record))
        self._handles.append(self.model.register_forward_hook(self._check))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, module: nn.Module, args: tuple) -> None:
        self._called.add(id(module))

    def _check(self, model: nn.Module, args: tuple, output: Any) -> None:
        missing = [p for p, ms in self.pending.items() if not all(id(m) in self._called for m in ms)]
        self._called.clear()
        if missing:
            raise unreached_error(self.model, missing, None, during="the model's first forward since the delta was built")
        self.pending = {}
        self.remove()
