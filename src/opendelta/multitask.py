"""Many tasks on one backbone: mixed-task batches, and a small registry of named task deltas.

``mixed_batch(deltas, rows)`` makes every forward in its block route batch row ``i`` through
``deltas[rows[i]]`` (``-1``: none of them). Each delta computes on its own rows only, gathered
and scattered on the batch dimension once per module; row indices are computed once, on entry.
Deltas outside the mix keep acting on every row.

``MultiTask`` names deltas by task and makes switching, merging and mixing read as one object;
the functional pieces (``mixed_batch``, ``DeltaBase.switch``, ``merge``/``unmerge``) work alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from opendelta.delta_base import DeltaBase
from opendelta.errors import LifecycleError, MixedBatchError
from opendelta.routing import DATA_FLOW_LOCK, RowRouting, Site, mixing_here, site_of, start_mixing


def _row_tensor(rows: Sequence[int] | torch.Tensor, n_deltas: int) -> torch.Tensor:
    """`rows` as a CPU int64 tensor; any integer dtype is read by value (a uint8 ``1`` is delta 1)."""
    try:
        table = torch.as_tensor(rows)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise MixedBatchError(
            f"rows must be a sequence of delta indices (integers in -1..{n_deltas - 1}, one per batch row), got {rows!r}"
        ) from exc
    if table.dtype == torch.bool:
        raise MixedBatchError(
            "rows is a boolean mask, but it must hold one delta index per batch row; for example "
            "mask.long() - 1 runs deltas[0] on the True rows and the bare backbone on the others"
        )
    if table.dim() != 1 or table.numel() == 0 or table.dtype.is_floating_point or table.dtype.is_complex:
        raise MixedBatchError(
            f"rows must be a non-empty 1-D sequence of integers (one delta index per batch row), got {rows!r}"
        )
    values = table.tolist()  # Python ints: exact for every integer dtype, unsigned 64-bit included
    bad = next((v for v in values if not -1 <= v < n_deltas), None)
    if bad is not None:
        raise MixedBatchError(
            f"rows holds index {bad}, but there are {n_deltas} deltas; use 0..{n_deltas - 1}, "
            "or -1 for a row that runs on the bare backbone"
        )
    return torch.tensor(values, dtype=torch.long)


def _check_deltas(deltas: Sequence[DeltaBase]) -> nn.Module:
    if isinstance(deltas, DeltaBase) or not deltas:
        raise MixedBatchError("deltas must be a non-empty list of delta models, e.g. mixed_batch([lora_a, lora_b], rows)")
    backbone = None
    for i, delta in enumerate(deltas):
        if not isinstance(delta, DeltaBase):
            raise MixedBatchError(f"deltas[{i}] is a {type(delta).__name__}, not a delta model")
        if backbone is None:
            backbone = delta.backbone_model
        elif delta.backbone_model is not backbone:
            raise MixedBatchError(
                f"deltas[{i}] ({delta.name!r}) lives on another backbone than deltas[0]; "
                "a mixed batch runs on one backbone: load that delta onto this model (from_finetuned)"
            )
        if any(other is delta for other in deltas[:i]):
            raise MixedBatchError(f"deltas[{i}] ({delta.name!r}) appears twice; list each delta once and repeat its index in rows")
        if not delta.is_attached:
            raise LifecycleError(f"delta {delta.name!r} is detached; attach() it before mixing (MultiTask.mixed does)")
        if delta.is_merged:
            raise LifecycleError(f"delta {delta.name!r} is merged into the weights; unmerge() it before mixing")
    assert backbone is not None
    if mixing_here(backbone):
        raise LifecycleError("this thread is already inside a mixed_batch() on this backbone; mixed batches do not nest")
    return backbone


def _site_device(module: nn.Module, delta: DeltaBase, path: str) -> torch.device:
    tensor = next(delta.layers[path].parameters(), None)
    if tensor is None:
        tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@contextmanager
def mixed_batch(
    deltas: Sequence[DeltaBase], rows: Sequence[int] | torch.Tensor, scales: Sequence[float] | torch.Tensor | None = None
) -> Iterator[None]:
    """Inside the block, row i of every forward (and of generate()) goes through ``deltas[rows[i]]``.

    ``-1`` is the bare backbone (with whatever deltas outside the mix are attached). The deltas
    must be attached and unmerged, on one backbone; each computes on its own rows only. A forward
    whose batch size differs from ``len(rows)`` raises MixedBatchError (beam search and
    num_return_sequences > 1 expand the batch). Prefix and soft-prompt deltas mix when every row
    gets a prefix (prompt) of the same length on the same modules; otherwise entering raises.
    The model is unchanged after the block, and after any error on entry.

    The routing is per thread: only forwards of the thread (or asyncio task) that entered the
    block are routed, so other threads' forwards on the backbone are untouched, and several
    threads can each run their own mixed batch on it at once. While any thread is inside a mixed
    batch, attaching, detaching, switching or merging a delta of that backbone raises LifecycleError.

    `scales` (one number per row) scales each row's delta change, ``h + scale * m(h)``, on top of
    the delta's own :meth:`~opendelta.DeltaBase.scale`; rows at 1.0 run exactly as without it.
    """
    with DATA_FLOW_LOCK:  # another thread's attach/detach cannot interleave with the checks and the plans
        backbone = _check_deltas(deltas)
        table = _row_tensor(rows, len(deltas))
        handle = start_mixing(backbone, _plans(deltas, table, _scale_tensor(scales, table.numel())))
    try:
        yield
    finally:
        handle.remove()


def _scale_tensor(scales: Sequence[float] | torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """`scales` as a CPU float64 tensor of one finite number per row, or None."""
    if scales is None:
        return None
    try:
        table = torch.as_tensor(scales, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise MixedBatchError(f"scales must be one number per batch row, got {scales!r}") from exc
    if table.dim() != 1 or table.numel() != batch or not bool(torch.isfinite(table).all()):
        raise MixedBatchError(f"scales must be {batch} finite numbers, one per batch row (as rows), got {scales!r}")
    return table


def _plans(deltas: Sequence[DeltaBase], table: torch.Tensor, scales: torch.Tensor | None = None) -> dict[Site, Any]:
    """Each site's plan for routing row i through ``deltas[table[i]]``, its change scaled by ``scales[i]``."""
    batch = table.numel()
    names = frozenset(d.name for d in deltas)
    if len(names) != len(deltas):
        raise MixedBatchError("two deltas of the mix share a name; give each delta its own name=")
    selected: dict[str, torch.Tensor] = {}
    scaled: dict[str, torch.Tensor] = {}  # delta name -> its rows' scales, where one is not 1.0
    idle: set[str] = set()
    for i, delta in enumerate(deltas):
        index = (table == i).nonzero().flatten()
        if index.numel() == 0:
            idle.add(delta.name)
            continue
        if index.numel() < batch:
            selected[delta.name] = index
        if scales is not None and bool((scales[index] != 1.0).any()):
            scaled[delta.name] = scales[index]
    on_device: dict[tuple[str, torch.device], torch.Tensor] = {}
    sites: dict[int, tuple[nn.Module, Site, torch.device]] = {}
    for delta in deltas:
        for path, target in delta.targets.items():
            module = target.module
            site = site_of(module)
            if site is not None and id(module) not in sites:
                sites[id(module)] = (module, site, _site_device(module, delta, path))
    plans: dict[Site, Any] = {}
    for module, site, device in sites.values():
        rows_here = {}
        for name, index in selected.items():
            if (name, device) not in on_device:
                on_device[(name, device)] = index.to(device)
            rows_here[name] = on_device[(name, device)]
        scales_here = {name: factors.to(device) for name, factors in scaled.items()}
        plans[site] = site.plan_mix(module, RowRouting(batch, names, rows_here, frozenset(idle), scales_here))
    return plans


class MultiTask:
    """Named task deltas on one backbone: switch the active task, merge it, or mix tasks per row.

    ``tasks = MultiTask(backbone, {"sst2": lora_a, "mnli": lora_b})``; ``tasks.activate("mnli")``
    leaves exactly that task attached (``None``: none); ``with tasks.mixed(["sst2", None, "mnli"]):``
    runs one batch with a task per row (attaching what the mix needs and restoring afterwards).
    """

    def __init__(self, backbone_model: nn.Module, deltas: dict[str, DeltaBase] | None = None):
        self.backbone_model = backbone_model
        self.deltas: dict[str, DeltaBase] = {}
        for task, delta in (deltas or {}).items():
            self.add(task, delta)

    def add(self, task: str, delta: DeltaBase) -> DeltaBase:
        """Register `delta` under the name `task`."""
        if task in self.deltas:
            raise LifecycleError(f"task {task!r} is already registered; pick another name or remove() it first")
        if not isinstance(delta, DeltaBase) or delta.backbone_model is not self.backbone_model:
            raise MixedBatchError(f"task {task!r}: {delta!r} is not a delta on this MultiTask's backbone")
        self.deltas[task] = delta
        return delta

    def remove(self, task: str) -> DeltaBase:
        """Unregister `task` (detaching its delta if attached) and return its delta."""
        delta = self._get(task)
        if delta.is_attached:
            delta.detach()
        return self.deltas.pop(task)

    def _get(self, task: str) -> DeltaBase:
        if task not in self.deltas:
            raise MixedBatchError(f"unknown task {task!r}; registered: {', '.join(self.deltas) or 'none'}")
        return self.deltas[task]

    @property
    def active(self) -> list[str]:
        """The tasks whose deltas are attached."""
        return [task for task, delta in self.deltas.items() if delta.is_attached]

    def activate(self, task: str | None) -> None:
        """Leave exactly `task` attached (``None``: no task), switching in place where possible."""
        target = None if task is None else self._get(task)
        attached = [d for d in self.deltas.values() if d.is_attached and d is not target]
        if target is not None and not target.is_attached and attached and not attached[-1].is_merged:
            attached.pop().switch(to=target)
        for delta in attached:
            delta.detach()
        if target is not None and not target.is_attached:
            target.attach()

    @contextmanager
    def mixed(self, tasks: Sequence[str | None]) -> Iterator[None]:
        """A mixed batch with one task (or ``None``) per row; deltas it attaches are detached after."""
        order: list[str] = []
        for task in tasks:
            if task is not None and task not in order:
                self._get(task)
                order.append(task)
        rows = [-1 if t is None else order.index(t) for t in tasks]
        if not order:
            raise MixedBatchError("a mixed batch needs at least one task; for the bare backbone use activate(None)")
        # other attached tasks join the mix with no rows, so they stay out of every row
        order += [t for t, d in self.deltas.items() if d.is_attached and t not in order]
        deltas = [self.deltas[t] for t in order]
        attached_here = [d for d in deltas if not d.is_attached]
        for delta in attached_here:
            delta.attach()
        try:
            with mixed_batch(deltas, rows):
                yield
        finally:
            for delta in reversed(attached_here):
                delta.detach()
