"""Hot-swapping LoRA weights in a compiled model: 100 swaps, no recompilation, outputs as in eager mode (the eager
slot bit for bit at every rank; the delta attached normally within float rounding below max_rank)."""

from __future__ import annotations

import pytest
import torch
from support.ecosystem_fixtures import randomize_deltas, tiny_batch, tiny_bert
from support.numerics import assert_within_noise, float32_noise

from opendelta import DeltaConfigError, IncompatibleCheckpointError, LoraModel
from opendelta.hotswap import LoraSlot

PLACES = ["query", "value"]


class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo compiles and runs them eagerly."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs) -> object:
        self.compiles += 1
        return gm.forward


def _inputs() -> dict[str, torch.Tensor]:
    batch = tiny_batch()
    batch.pop("labels")
    return batch


def test_a_hundred_swaps_in_a_compiled_model_never_recompile_and_match_eager():
    torch._dynamo.reset()
    model = tiny_bert()
    slot = LoraSlot(model, PLACES, max_rank=8, name="slot")
    donor = tiny_bert()  # the tasks live detached on another copy: only their factors are read
    tasks = []
    for i, rank in enumerate([2, 8, 4, 8]):
        task = LoraModel(donor, modified_modules=PLACES, lora_r=rank, lora_alpha=3.0 * (i + 1), use_rslora=i % 2 == 1,
                         name=f"task{i}")
        randomize_deltas(task, seed=i)
        task.detach()
        tasks.append(task)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    inputs = _inputs()
    with torch.no_grad():
        compiled(**inputs)
    assert backend.compiles == 1

    eager = tiny_bert()
    noise = float32_noise(eager, lambda m, _: m(**inputs).logits)
    eager_served = tiny_bert()
    eager_slot = LoraSlot(eager_served, PLACES, max_rank=8, name="slot")
    for swap in range(100):
        task = tasks[swap % len(tasks)]
        slot.load(task)
        eager_slot.load(task)
        with torch.no_grad():
            got = compiled(**inputs).logits
            # the same padded shapes in eager mode: the same kernels, so bit for bit at every rank
            assert torch.equal(got, eager_served(**inputs).logits)
        if swap < len(tasks):  # each task once against the eager model with that task attached
            task_on_eager = LoraModel(eager, modified_modules=PLACES, lora_r=task.config.lora_r,
                                      lora_alpha=task.config.lora_alpha, use_rslora=task.config.use_rslora)
            with torch.no_grad():
                for path, layer in task.layers.items():
                    task_on_eager.layers[path].lora_A.copy_(layer.lora_A)
                    task_on_eager.layers[path].lora_B.copy_(layer.lora_B)
                want = eager(**inputs).logits
            task_on_eager.detach()
            assert_within_noise(got, want, noise)
    assert backend.compiles == 1  # 100 swaps, 0 recompiles
    slot.clear()
    with torch.no_grad():
        assert torch.equal(compiled(**inputs).logits, tiny_bert()(**inputs).logits)


def test_a_delta_too_large_or_elsewhere_is_refused_and_the_slot_keeps_its_weights():
    model = tiny_bert()
    slot = LoraSlot(model, ["query"], max_rank=4)
    donor = tiny_bert()
    small = LoraModel(donor, modified_modules=["query"], lora_r=2, name="small")
    randomize_deltas(small)
    slot.load(small)
    before = [layer.lora_A.clone() for layer in slot.delta.layers.values()]
    with pytest.raises(IncompatibleCheckpointError, match="rank <= 4"):
        slot.load(LoraModel(donor, modified_modules=["query"], lora_r=8, name="big"))
    with pytest.raises(IncompatibleCheckpointError, match="does not"):
        slot.load(LoraModel(donor, modified_modules=["value"], lora_r=2, name="other"))
    assert all(torch.equal(b, layer.lora_A) for b, layer in zip(before, slot.delta.layers.values()))
    with pytest.raises(DeltaConfigError, match="max_rank"):
        LoraSlot(tiny_bert(), ["query"], max_rank=0)
