"""Threads and asyncio tasks sharing one backbone: a mixed batch routes only the forwards of the
thread (or task) that entered it, and the deltas' set-up stays fixed while any thread mixes."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable

import pytest
import torch
from conftest import tiny_llama

from opendelta import DeltaBase, LifecycleError, LoraModel, MixedBatchError, mixed_batch
from opendelta.routing import mixing_anywhere, site_of

IDS = torch.randint(1, 99, (4, 6), generator=torch.Generator().manual_seed(5))
ROUNDS = 40  # per thread; each round is one forward of a tiny model (a few ms)
WAIT_S = 30  # a bound on every wait, so a broken lock fails the test instead of hanging it


def lora_tasks(model: torch.nn.Module, n: int, prefix: str = "task") -> list[DeltaBase]:
    """`n` LoRA deltas with distinct non-zero weights, all attached."""
    deltas = []
    for i in range(n):
        delta = LoraModel(model, name=f"{prefix}{i}")
        generator = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in delta.delta_parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
        deltas.append(delta)
    return deltas


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def mixed_logits(model: torch.nn.Module, deltas: list[DeltaBase], rows: list[int]) -> torch.Tensor:
    with mixed_batch(deltas, rows):
        return logits(model)


def run_together(*loops: Callable[[], None]) -> None:
    """Run each loop in its own thread, started together; re-raise the first error any of them hit."""
    start = threading.Barrier(len(loops))
    errors: list[BaseException] = []

    def run(loop: Callable[[], None]) -> None:
        try:
            start.wait(WAIT_S)
            loop()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(loop,)) for loop in loops]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    if errors:
        raise errors[0]


def test_a_plain_forward_in_another_thread_is_never_routed_by_a_mixed_batch() -> None:
    model = tiny_llama()
    deltas = lora_tasks(model, 3)
    rows = [0, 2, -1, 1]
    plain_reference = logits(model)
    mixed_reference = mixed_logits(model, deltas, rows)
    assert not torch.equal(plain_reference, mixed_reference)  # else routing mistakes would go unseen
    mixed_outputs: list[torch.Tensor] = []
    plain_outputs: list[torch.Tensor] = []

    def mixing() -> None:
        for _ in range(ROUNDS):
            mixed_outputs.append(mixed_logits(model, deltas, rows))

    def plain() -> None:
        for _ in range(ROUNDS):
            plain_outputs.append(logits(model))

    run_together(mixing, plain)
    assert len(mixed_outputs) == len(plain_outputs) == ROUNDS
    assert all(torch.equal(out, mixed_reference) for out in mixed_outputs)
    assert all(torch.equal(out, plain_reference) for out in plain_outputs)


def test_two_threads_each_run_their_own_mixed_batch_at_once() -> None:
    model = tiny_llama()
    deltas = lora_tasks(model, 3)
    plans = ([0, 1, 2, -1], [2, -1, 0, 0])
    references = [mixed_logits(model, deltas, rows) for rows in plans]
    assert not torch.equal(*references)
    outputs: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def loop(i: int) -> Callable[[], None]:
        def mixing() -> None:
            for _ in range(ROUNDS):
                outputs[i].append(mixed_logits(model, deltas, plans[i]))

        return mixing

    run_together(loop(0), loop(1))
    for reference, got in zip(references, outputs):
        assert len(got) == ROUNDS
        assert all(torch.equal(out, reference) for out in got)


def test_overlapping_mixed_batches_end_cleanly_in_either_order() -> None:
    model = tiny_llama()
    deltas = lora_tasks(model, 2)
    both_inside = threading.Barrier(2)
    first_left = threading.Event()

    def first() -> None:
        with mixed_batch(deltas, [0, 1, 1, 0]):
            both_inside.wait(WAIT_S)
        first_left.set()

    def second() -> None:
        with mixed_batch(deltas, [1, 0, -1, 1]):
            both_inside.wait(WAIT_S)
            assert first_left.wait(WAIT_S)
            assert mixing_anywhere(model)  # the first thread's exit does not end this thread's batch
            assert torch.equal(logits(model), mixed_logits_reference)

    mixed_logits_reference = mixed_logits(model, deltas, [1, 0, -1, 1])
    run_together(first, second)
    assert not mixing_anywhere(model)
    for delta in deltas:
        delta.detach()  # the lifecycle is free again


def test_lifecycle_changes_during_another_threads_mixed_batch_raise_and_change_nothing() -> None:
    model = tiny_llama()
    attached, spare = lora_tasks(model, 2)
    spare.detach()
    merged = lora_tasks(model, 1, prefix="merged")[0]
    merged.merge()
    before = logits(model)
    inside, leave = threading.Event(), threading.Event()

    def hold_a_mixed_batch() -> None:
        with mixed_batch([attached], [0, -1, 0, -1]):
            inside.set()
            assert leave.wait(WAIT_S)

    holder = threading.Thread(target=hold_a_mixed_batch)
    holder.start()
    try:
        assert inside.wait(WAIT_S)
        changes = {
            "attach": spare.attach,
            "detach": attached.detach,
            "switch": lambda: attached.switch(to=spare),
            "merge": attached.merge,
            "unmerge": merged.unmerge,
            "construct": lambda: LoraModel(model, name="late"),
        }
        for action, change in changes.items():
            with pytest.raises(LifecycleError, match="another thread is inside a mixed_batch"):
                change()
        assert attached.is_attached and not attached.is_merged
        assert not spare.is_attached
        assert merged.is_merged
        assert torch.equal(logits(model), before)
    finally:
        leave.set()
        holder.join(WAIT_S)
    assert not holder.is_alive()
    attached.switch(to=spare)  # and the lifecycle works again once the batch has ended
    assert spare.is_attached and not attached.is_attached


def test_a_mixed_batch_routes_only_its_own_asyncio_task() -> None:
    model = tiny_llama()
    deltas = lora_tasks(model, 2)
    rows = [1, -1, 0, 1]
    plain_reference = logits(model)
    mixed_reference = mixed_logits(model, deltas, rows)

    async def mixing() -> tuple[torch.Tensor, torch.Tensor]:
        with mixed_batch(deltas, rows):
            await asyncio.sleep(0)  # the plain task runs its forward here, inside this task's block
            here = logits(model)
            in_worker = await asyncio.to_thread(logits, model)  # runs in a copy of this task's context
        return here, in_worker

    async def plain() -> tuple[bool, torch.Tensor]:
        return mixing_anywhere(model), logits(model)

    async def main() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[bool, torch.Tensor]]:
        return await asyncio.gather(mixing(), plain())

    (here, in_worker), (overlapped, plain_out) = asyncio.run(main())
    assert overlapped  # the plain task's forward ran while the other task was inside its block
    assert torch.equal(here, mixed_reference)
    assert torch.equal(in_worker, mixed_reference)
    assert torch.equal(plain_out, plain_reference)


def test_a_mixed_batch_ended_in_another_thread_says_so_and_frees_the_backbone() -> None:
    # what a generator holding the block does when a thread pool resumes it on another thread
    model = tiny_llama()
    deltas = lora_tasks(model, 2)
    block = mixed_batch(deltas, [0, 1, 0, 1])
    contextvars.copy_context().run(block.__enter__)  # entered in a throwaway context, as a pool thread's copy
    errors: list[BaseException] = []

    def leave() -> None:
        try:
            block.__exit__(None, None, None)
        except BaseException as exc:
            errors.append(exc)

    other = threading.Thread(target=leave)
    other.start()
    other.join(WAIT_S)
    assert len(errors) == 1 and isinstance(errors[0], MixedBatchError)
    assert "ended in another thread" in str(errors[0])
    assert not mixing_anywhere(model)
    deltas[0].detach()  # the lifecycle is free again


def test_the_plan_is_visible_only_to_the_thread_that_entered() -> None:
    model = tiny_llama()
    deltas = lora_tasks(model, 2)
    site = site_of(model.model.layers[0].self_attn.q_proj)
    assert site is not None
    seen_elsewhere: list[object] = []
    with mixed_batch(deltas, [0, 1, 0, 1]):
        assert site.mix is not None
        other = threading.Thread(target=lambda: seen_elsewhere.append(site.mix))
        other.start()
        other.join(WAIT_S)
    assert seen_elsewhere == [None]
    assert site.mix is None
