"""Saving deltas from a distributed run: every rank gathers the delta tensors, rank 0 writes.

Under DDP the tensors are replicated; under FSDP2 (``fully_shard``) they are ``DTensor`` shards
and under DeepSpeed ZeRO-3 partitioned parameters. Gathering a sharded tensor is a collective,
so a distributed save must be called on every rank, in the same order. A save reached by only
some ranks would hang; :func:`all_ranks_arrive` turns that into an error naming the absent
ranks (on gloo, which can tell who is missing; other backends wait like any collective).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from opendelta.errors import DistributedSaveError

#: how long a distributed save waits for every rank to arrive before it raises
ARRIVAL_TIMEOUT_S = 300.0


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_ranks_arrive(what: str, timeout_s: float = ARRIVAL_TIMEOUT_S) -> None:
    """Wait until every rank has called `what`; raise DistributedSaveError naming those that did not."""
    rank, world = rank_and_world()
    if world == 1:
        return
    if dist.get_backend() != "gloo":
        dist.barrier()
        return
    try:
        dist.monitored_barrier(timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as exc:
        raise DistributedSaveError(
            f"rank {rank}: {what} must be called on every rank of the {world}-process group (it gathers "
            f"sharded tensors collectively, then rank 0 writes); not every rank arrived within {timeout_s:.0f} s: "
            f"{exc}. Call it unconditionally on all ranks, not under `if rank == 0`."
        ) from exc


def full_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole, local copies of `tensors`, gathering FSDP2 and ZeRO-3 shards (a collective when sharded).

    Every rank must pass the same keys in the same order.
    """
    zero3 = [t for t in tensors.values() if hasattr(t, "ds_id")]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            return {k: _whole(t) for k, t in tensors.items()}
    return {k: _whole(t) for k, t in tensors.items()}


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    full_tensor = getattr(tensor, "full_tensor", None)  # a DTensor
    value = full_tensor() if full_tensor is not None else tensor
    return value.detach().clone()


def on_rank_zero(what: str, write: Callable[[], Any]) -> None:
    """Run `write` on rank 0 only; every rank returns once it is done and raises if it failed."""
    rank, world = rank_and_world()
    if world == 1:
        write()
        return
    error: Exception | None = None
    if rank == 0:
        try:
            write()
        except Exception as exc:  # every rank must learn of it, or the others would wait forever
            error = exc
    status = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(status, src=0)
    if error is not None:
        raise error
    if status[0] is not None:
        raise DistributedSaveError(f"rank 0 failed to write {what}: {status[0]}")


def unsharded_class(model: nn.Module) -> type[nn.Module]:
    """The model's own class, seen through FSDP2's ``FSDP<Name>`` wrapper class."""
    cls = type(model)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return cls
    if isinstance(model, FSDPModule):
        return next(base for base in cls.__bases__ if not issubclass(base, FSDPModule))
    return cls


def tensor_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """A parameter's full shape, also for a ZeRO-3 partitioned one (whose local shape is empty)."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))
