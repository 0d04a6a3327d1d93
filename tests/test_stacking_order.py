"""Stacked deltas compose in a fixed order on each module, whatever the attach history:
detach/attach sequences, switch(), unmerge(), checkpoints loaded in any order, mixed batches."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import pytest
import torch
from conftest import perturb, tiny_bert

from opendelta import (
    AdapterModel,
    AutoDeltaModel,
    BitFitModel,
    CorruptCheckpointError,
    DeltaBase,
    DeltaConfigError,
    IA3Model,
    LoraModel,
    ParallelAdapterModel,
    mixed_batch,
)
from opendelta.routing import site_of

BOTH = ["value", "output.dense"]
#: case -> the deltas it stacks, in creation order; each case holds pairs that do not commute
CASES: dict[str, list[tuple[type[DeltaBase], dict[str, Any]]]] = {
    "adapter+bitfit on value": [
        (AdapterModel, {"modified_modules": ["value"], "bottleneck_dim": 6}),
        (BitFitModel, {"modified_modules": ["value"]}),
    ],
    "two adapters on output.dense": [
        (AdapterModel, {"modified_modules": ["output.dense"], "bottleneck_dim": 6}),
        (AdapterModel, {"modified_modules": ["output.dense"], "bottleneck_dim": 4}),
    ],
    "seven deltas": [
        (LoraModel, {"modified_modules": ["value"]}),
        (IA3Model, {}),
        (AdapterModel, {"modified_modules": BOTH, "bottleneck_dim": 6}),
        (BitFitModel, {"modified_modules": BOTH}),
        (ParallelAdapterModel, {"modified_modules": BOTH, "bottleneck_dim": 6}),
        (LoraModel, {"modified_modules": BOTH, "lora_r": 4}),
        (AdapterModel, {"modified_modules": ["output.dense"], "bottleneck_dim": 4}),
    ],
}

IDS = torch.randint(1, 99, (5, 7), generator=torch.Generator().manual_seed(3))


def out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).last_hidden_state


def stack(model: torch.nn.Module, case: str, **kwargs: Any) -> list[DeltaBase]:
    """The case's deltas on `model`, created in order, each with its own non-zero values."""
    deltas = []
    for i, (cls, args) in enumerate(CASES[case]):
        delta = cls(model, **args, **kwargs.get(i, {}))
        perturb(delta, seed=10 + i)
        deltas.append(delta)
    return deltas


def load_in_order(paths: list[str], order: list[int]) -> torch.nn.Module:
    """A fresh backbone with the checkpoints `paths[i]` loaded for i in `order`."""
    model = tiny_bert()
    for i in order:
        AutoDeltaModel.from_finetuned(paths[i], model)
    return model


@pytest.mark.parametrize("case", CASES)
def test_the_stacked_deltas_do_not_commute(case: str, tmp_path) -> None:
    """The other tests would pass vacuously if order did not matter: reversing it changes the outputs."""
    model = tiny_bert()
    deltas = stack(model, case)
    paths = [d.save_finetuned(tmp_path / str(i)) for i, d in enumerate(deltas)]
    reversed_model = tiny_bert()
    for i, path in enumerate(paths):
        AutoDeltaModel.from_finetuned(path, reversed_model, order=-i)  # the first created now runs last
    assert not torch.equal(out(reversed_model), out(model))


@pytest.mark.parametrize("case", CASES)
def test_detaching_and_reattaching_one_delta_restores_the_outputs(case: str) -> None:
    model = tiny_bert()
    deltas = stack(model, case)
    reference = out(model)
    for delta in deltas:
        delta.detach()
        delta.attach()
        assert torch.equal(out(model), reference)


@pytest.mark.parametrize("case", ["adapter+bitfit on value", "two adapters on output.dense"])
def test_every_attach_order_gives_the_same_outputs(case: str) -> None:
    model = tiny_bert()
    deltas = stack(model, case)
    reference = out(model)
    for detach_order, attach_order in itertools.product(itertools.permutations(deltas), repeat=2):
        for delta in detach_order:
            delta.detach()
        for delta in attach_order:
            delta.attach()
        assert torch.equal(out(model), reference)


@pytest.mark.parametrize("case", CASES)
def test_a_random_walk_of_detach_and_attach_gives_one_output_per_set_of_attached_deltas(case: str) -> None:
    """200 seeded toggles: whenever the same deltas are attached, the outputs are the same bits."""
    model = tiny_bert()
    seen = {frozenset(): out(model)}
    deltas = stack(model, case)
    seen[frozenset(range(len(deltas)))] = out(model)
    walk = random.Random(13)
    for _ in range(200):
        delta = walk.choice(deltas)
        delta.detach() if delta.is_attached else delta.attach()
        attached = frozenset(i for i, d in enumerate(deltas) if d.is_attached)
        now = out(model)
        assert torch.equal(seen.setdefault(attached, now), now)
    assert len(seen) > 2  # the walk visited partial stacks too


def test_switch_puts_the_incoming_delta_at_its_own_place() -> None:
    model = tiny_bert()
    first, second, third = (
        AdapterModel(model, modified_modules=["output.dense"], bottleneck_dim=n, name=f"d{n}") for n in (6, 4, 5)
    )
    for seed, delta in enumerate((first, second, third)):
        perturb(delta, seed=seed)
    second.detach()
    first_and_third = out(model)
    first.detach()
    second.attach()
    assert second.switch(to=first) is first  # first swaps in where second was, but runs before third
    assert torch.equal(out(model), first_and_third)
    first.detach()
    third.detach()
    second.attach()
    second.switch(to=third)
    first.attach()
    assert torch.equal(out(model), first_and_third)


def test_unmerge_puts_the_delta_back_at_its_place() -> None:
    model = tiny_bert()
    ia3 = IA3Model(model, modified_modules=["value"])  # scales value's output; the adapter comes after it
    adapter = AdapterModel(model, modified_modules=["value"], bottleneck_dim=6)
    perturb(ia3, seed=1)
    perturb(adapter, seed=2)
    reference = out(model)
    ia3.merge()
    ia3.unmerge()
    assert torch.equal(out(model), reference)


@pytest.mark.parametrize("case", CASES)
def test_checkpoints_loaded_in_any_order_give_the_same_model(case: str, tmp_path) -> None:
    model = tiny_bert()
    deltas = stack(model, case)
    reference = out(model)
    paths = [d.save_finetuned(tmp_path / str(i)) for i, d in enumerate(deltas)]
    indices = list(range(len(paths)))
    if len(indices) <= 3:
        orders = list(itertools.permutations(indices))
    else:
        shuffles = random.Random(5)
        orders = [indices[::-1], *(shuffles.sample(indices, len(indices)) for _ in range(4))]
    for order in orders:
        assert torch.equal(out(load_in_order(paths, list(order))), reference)


def _forget_order(path) -> None:
    """Make the checkpoint at `path` look like one written before checkpoints recorded the order."""
    config = path / "delta_config.json"
    meta = json.loads(config.read_text())
    del meta["order"]
    config.write_text(json.dumps(meta))


@pytest.mark.parametrize("case", ["two adapters on output.dense", "seven deltas"])
def test_checkpoints_without_a_recorded_order_load_in_any_order_to_the_same_model(case: str, tmp_path) -> None:
    model = tiny_bert()
    paths = [d.save_finetuned(tmp_path / str(i)) for i, d in enumerate(stack(model, case))]
    for i in range(len(paths)):
        _forget_order(tmp_path / str(i))
    forward = out(load_in_order(paths, list(range(len(paths)))))
    assert torch.equal(out(load_in_order(paths, list(range(len(paths)))[::-1])), forward)


def test_peft_checkpoints_load_in_any_order_to_the_same_model(tmp_path) -> None:
    """PEFT folders record no order: two LoRAs on the same modules are summed in an order fixed by
    their contents, so their floating-point sum is the same bits whichever loads first."""
    model = tiny_bert()
    paths = []
    for i in range(2):
        lora = LoraModel(model, modified_modules=BOTH, lora_r=4)
        perturb(lora, seed=i)
        paths.append(lora.save_finetuned(tmp_path / str(i), format="peft"))
    assert torch.equal(out(load_in_order(paths, [0, 1])), out(load_in_order(paths, [1, 0])))


@pytest.mark.parametrize(
    "order",
    ["first", [0, 1], None, {"position": "0", "created": 1}, {"position": 0, "created": -1},
     {"position": 0, "created": 1.5}, {"position": True, "created": 1}, {"created": 1}],
)
def test_a_malformed_recorded_order_is_refused_and_changes_nothing(order: Any, tmp_path) -> None:
    path = AdapterModel(tiny_bert(), modified_modules=["output.dense"]).save_finetuned(tmp_path / "a")
    config = tmp_path / "a" / "delta_config.json"
    meta = json.loads(config.read_text())
    meta["order"] = order
    config.write_text(json.dumps(meta))
    model = tiny_bert()
    bare = out(model)
    with pytest.raises(CorruptCheckpointError, match="order"):
        AutoDeltaModel.from_finetuned(path, model)
    assert torch.equal(out(model), bare) and all(site_of(m) is None for m in model.modules())


def test_order_places_a_delta_before_or_after_the_others() -> None:
    """order=1 puts the first-created delta after the second: the model of the two created the other way round."""
    model = tiny_bert()
    late = AdapterModel(model, modified_modules=["output.dense"], bottleneck_dim=6, order=1)
    early = AdapterModel(model, modified_modules=["output.dense"], bottleneck_dim=4)
    perturb(late, seed=1)
    perturb(early, seed=2)
    assert (late.order, early.order) == (1, 0) and early.order_key < late.order_key
    swapped = tiny_bert()
    early_twin = AdapterModel(swapped, modified_modules=["output.dense"], bottleneck_dim=4)
    late_twin = AdapterModel(swapped, modified_modules=["output.dense"], bottleneck_dim=6)
    for delta, twin in ((late, late_twin), (early, early_twin)):
        for path, layer in delta.layers.items():
            twin.layers[path].load_state_dict(layer.state_dict())
    assert torch.equal(out(model), out(swapped))


@pytest.mark.parametrize("order", ["1", float("nan"), float("inf"), True, [1]])
def test_a_bad_order_raises_and_changes_nothing(order: Any) -> None:
    model = tiny_bert()
    bare = out(model)
    with pytest.raises(DeltaConfigError, match="order"):
        AdapterModel(model, modified_modules=["output.dense"], order=order)
    assert torch.equal(out(model), bare) and all(site_of(m) is None for m in model.modules())


def test_a_loaded_delta_keeps_its_place_unless_order_is_given(tmp_path) -> None:
    model = tiny_bert()
    first, second = stack(model, "two adapters on output.dense")
    loaded = AutoDeltaModel.from_finetuned(first.save_finetuned(tmp_path / "a"), tiny_bert())
    assert loaded.order_key[:3] == first.order_key[:3]
    moved = AutoDeltaModel.from_finetuned(tmp_path / "a", tiny_bert(), order=2.5)
    assert moved.order == 2.5 and moved.order_key[1] == first.order_key[1]


def test_a_mixed_batch_composes_in_the_same_order_whatever_the_attach_history() -> None:
    model = tiny_bert()
    first, second = stack(model, "two adapters on output.dense")
    plain = out(model)
    with mixed_batch([first], [0] * 5):  # every row: the mix's own delta, with `second` outside the mix
        assert torch.equal(out(model), plain)
    rows = [0, 1, -1, 0, 1]
    with mixed_batch([first, second], rows):
        mixed = out(model)
    with mixed_batch([second], [0, -1, 0, 0, -1]):  # `first` outside the mix acts on every row
        partly = out(model)
    for delta in (first, second, first):
        delta.detach()
        delta.attach()
    with mixed_batch([first, second], rows):
        assert torch.equal(out(model), mixed)
    with mixed_batch([second], [0, -1, 0, 0, -1]):
        assert torch.equal(out(model), partly)
