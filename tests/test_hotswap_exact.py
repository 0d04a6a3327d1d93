"""Hot-swap at full rank is exact: the compiled slot computes what the same delta attached normally computes, bit for bit."""

from __future__ import annotations

import pytest
import torch
from support.ecosystem_fixtures import randomize_deltas, tiny_batch, tiny_bert

from opendelta import DeltaConfigError, LoraModel
from opendelta.hotswap import LoraSlot

PLACES = ["query", "value"]
RANK = 4


class CountingBackend:
    """A torch.compile backend that counts the graphs dynamo compiles and runs them eagerly (the same kernels as eager)."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs) -> object:
        self.compiles += 1
        return gm.forward


def _tasks(n: int) -> list[LoraModel]:
    """Rank-RANK LoRA deltas with different alphas, half of them rsLoRA, on a donor copy of the backbone."""
    donor = tiny_bert()
    tasks = []
    for i in range(n):
        task = LoraModel(donor, modified_modules=PLACES, lora_r=RANK, lora_alpha=1.5 + 0.7 * i, use_rslora=i % 2 == 1,
                         name=f"task{i}")
        randomize_deltas(task, seed=10 + i)
        task.detach()
        tasks.append(task)
    return tasks


def _attached_normally(model: torch.nn.Module, task: LoraModel) -> LoraModel:
    delta = LoraModel.from_config(task.config, model, name="normal")
    with torch.no_grad():
        for path, layer in task.layers.items():
            delta.layers[path].lora_A.copy_(layer.lora_A)
            delta.layers[path].lora_B.copy_(layer.lora_B)
    return delta


def test_twenty_swaps_at_full_rank_equal_each_delta_attached_normally_bit_for_bit_without_recompiling():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_bert()
    slot = LoraSlot(model, PLACES, max_rank=RANK, name="slot")
    tasks = _tasks(4)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    batch = tiny_batch()
    batch.pop("labels")
    with torch.no_grad():
        compiled(**batch)
    reference = tiny_bert()
    wanted = []
    for task in tasks:
        normal = _attached_normally(reference, task)
        with torch.no_grad():
            wanted.append(reference(**batch).logits)
        normal.detach()
    for swap in range(20):
        slot.load(tasks[swap % len(tasks)])
        with torch.no_grad():
            got = compiled(**batch).logits
        assert torch.equal(got, wanted[swap % len(tasks)]), f"swap {swap}"
    assert backend.compiles == 1
    assert sum(torch._dynamo.utils.counters["recompiles"].values()) == 0


def test_a_dora_delta_is_refused_by_the_slot():
    slot = LoraSlot(tiny_bert(), ["query"], max_rank=4)
    dora = LoraModel(tiny_bert(), modified_modules=["query"], lora_r=4, use_dora=True, name="dora")
    with pytest.raises(DeltaConfigError, match="magnitude"):
        slot.load(dora)
