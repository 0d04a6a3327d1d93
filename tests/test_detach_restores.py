"""Detach restores everything the delta changed, and every failed call changes nothing.

Each test compares a full snapshot of the backbone: parameter and buffer values (torch.equal,
same dtype), requires_grad flags, and state-dict keys.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import opendelta.backbone_changes
from opendelta import AdapterModel, IA3Model, LifecycleError, LoraModel, RuntimeInitError

from conftest import PlainNet, hidden, inputs_for, perturb, tiny_bert


def snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "keys": list(model.state_dict()),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    now = snapshot(model)
    assert now["keys"] == before["keys"]
    assert now["flags"] == before["flags"]
    for kind in ("params", "buffers"):
        assert list(now[kind]) == list(before[kind])
        for name, value in now[kind].items():
            assert value.dtype == before[kind][name].dtype and torch.equal(value, before[kind][name]), name


def train_pooler(model: nn.Module, by: float = 1.0) -> None:
    with torch.no_grad():
        model.pooler.dense.weight.add_(by)


def test_detach_restores_the_requires_grad_flags_freeze_module_set():
    model = tiny_bert()
    before = snapshot(model)
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas", "pooler"])
    delta.detach()
    assert_unchanged(model, before)


def test_attach_reapplies_the_flags_freeze_module_chose():
    model = tiny_bert()
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas", "pooler"])
    tuned = snapshot(model)
    delta.detach()
    delta.attach()
    assert_unchanged(model, tuned)


def test_two_deltas_that_froze_the_backbone_detach_in_either_order_to_the_original_flags():
    model = tiny_bert()
    before = snapshot(model)
    a = LoraModel(model, modified_modules=["query"])
    a.freeze_module(exclude=["deltas"])
    b = LoraModel(model, modified_modules=["value"])
    b.freeze_module(exclude=["deltas"])
    a.detach()
    backbone = {n: p.requires_grad for n, p in model.named_parameters() if ".lora" not in n}
    assert backbone == dict.fromkeys(backbone, False)  # b still wants its backbone frozen
    b.detach()
    assert_unchanged(model, before)


def test_a_second_delta_cannot_train_a_backbone_tensor_an_attached_delta_trains():
    model = tiny_bert()
    a = LoraModel(model, modified_modules=["query"])
    a.freeze_module(exclude=["deltas", "pooler"])
    b = LoraModel(model, modified_modules=["value"])
    before = snapshot(model)
    with pytest.raises(LifecycleError, match="pooler.dense.weight.*'lora'"):
        b.freeze_module(exclude=["deltas", "pooler"])
    assert_unchanged(model, before)


def test_deltas_that_train_the_same_tensor_take_turns_and_each_gets_its_own_value_back():
    model = tiny_bert()
    inputs = inputs_for("bert")
    bare = snapshot(model)
    a = LoraModel(model, modified_modules=["query"], name="task_a")
    a.freeze_module(exclude=["deltas", "pooler"])
    train_pooler(model, 1.0)
    a_out = model(**inputs).pooler_output
    a.detach()
    b = LoraModel(model, modified_modules=["value"], name="task_b")
    b.freeze_module(exclude=["deltas", "pooler"])
    train_pooler(model, 2.0)
    b_out = model(**inputs).pooler_output
    with_b = snapshot(model)
    with pytest.raises(LifecycleError, match="'pooler.dense.weight' is trained by delta 'task_b'.*Detach 'task_b'"):
        a.attach()
    assert_unchanged(model, with_b)
    b.detach()
    assert_unchanged(model, bare)
    a.attach()
    assert torch.equal(model(**inputs).pooler_output, a_out)
    assert a.switch(to=b) is b
    assert torch.equal(model(**inputs).pooler_output, b_out)
    b.detach()
    assert_unchanged(model, bare)


def test_attach_refuses_to_overwrite_an_edit_made_while_the_delta_was_detached():
    model = tiny_bert()
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas", "pooler"])
    train_pooler(model)
    delta.detach()
    with torch.no_grad():
        model.pooler.dense.weight[0, 0] = 5.0  # the user's own change to the detached backbone
    edited = snapshot(model)
    with pytest.raises(LifecycleError, match="'pooler.dense.weight' changed while the delta was detached"):
        delta.attach()
    assert_unchanged(model, edited)


def fail_the_third_flag(monkeypatch) -> None:
    """Make the third requires_grad flag the library sets raise (a failure half way through)."""
    calls = []
    real_set_flag = opendelta.backbone_changes.set_flag

    def fails_on_the_third(param, owner, flag):
        calls.append(param)
        if len(calls) == 3:
            raise RuntimeError("injected")
        real_set_flag(param, owner, flag)

    monkeypatch.setattr(opendelta.backbone_changes, "set_flag", fails_on_the_third)


def test_an_attach_that_fails_half_way_changes_nothing(monkeypatch):
    model = tiny_bert()
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas", "pooler"])
    train_pooler(model)
    delta.detach()
    detached = snapshot(model)
    fail_the_third_flag(monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):
        delta.attach()
    assert_unchanged(model, detached)
    assert not delta.is_attached
    monkeypatch.undo()
    delta.attach()
    assert model.pooler.dense.weight.requires_grad


@pytest.mark.parametrize("method", [LoraModel, AdapterModel, IA3Model])
def test_a_detached_delta_follows_a_dtype_move_of_the_backbone(method):
    inputs = inputs_for("bert")
    moved_attached = tiny_bert()
    reference = method(moved_attached)
    perturb(reference)
    moved_attached.to(torch.bfloat16)
    expected = hidden(moved_attached, inputs)

    model = tiny_bert()
    delta = method(model)
    perturb(delta)
    delta.detach()
    model.to(torch.bfloat16)
    delta.attach()
    assert {p.dtype for p in delta.delta_parameters()} == {torch.bfloat16}
    assert torch.equal(hidden(model, inputs), expected)


def test_the_backbone_tensors_a_detached_delta_trains_follow_a_dtype_move():
    inputs = inputs_for("bert")
    reference = tiny_bert()
    ref_delta = LoraModel(reference)
    ref_delta.freeze_module(exclude=["deltas", "pooler"])
    train_pooler(reference)
    reference.to(torch.bfloat16)
    expected = reference(**inputs).pooler_output
    ref_delta.detach()
    bare = snapshot(reference)

    model = tiny_bert()
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas", "pooler"])
    train_pooler(model)
    delta.detach()
    model.to(torch.bfloat16)
    delta.attach()
    assert torch.equal(model(**inputs).pooler_output, expected)
    delta.detach()
    assert_unchanged(model, bare)


def test_a_delta_on_a_module_without_parameters_follows_its_nearest_ancestor_with_them():
    model = PlainNet()
    delta = AdapterModel(model, modified_modules=["encoder.1"], dummy_inputs=(torch.randn(1, 8),))
    perturb(delta)
    delta.detach()
    model.to(torch.float64)
    delta.attach()
    assert {p.dtype for p in delta.delta_parameters()} == {torch.float64}
    assert model(torch.randn(2, 8, dtype=torch.float64)).dtype == torch.float64


class CountsCalls(nn.Module):
    """A stateful module: it counts its calls in place and re-assigns a running sum each call."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("total", torch.zeros(4))
        self.fail = fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.total = self.total + x.sum(0)
        h = self.inner(x)
        if self.fail:
            raise ValueError("the second half of this forward is broken")
        return self.out(h)


def test_the_dummy_forward_of_runtime_init_leaves_every_buffer_as_it_was():
    model = CountsCalls()
    before = snapshot(model)
    delta = AdapterModel(model, modified_modules=["inner"], dummy_inputs=(torch.ones(2, 4),))
    delta.detach()
    assert_unchanged(model, before)


def test_a_dummy_forward_that_fails_after_changing_the_model_is_rolled_back():
    model = CountsCalls(fail=True)
    before = snapshot(model)
    with pytest.raises(RuntimeInitError, match="second half"):
        AdapterModel(model, modified_modules=["inner"], dummy_inputs=(torch.ones(2, 4),))
    assert_unchanged(model, before)


def test_freeze_module_on_a_detached_delta_waits_for_attach_and_saves_and_reloads(tmp_path):
    model = tiny_bert()
    inputs = inputs_for("bert")
    delta = LoraModel(model)
    perturb(delta)
    delta.detach()
    detached = snapshot(model)
    delta.freeze_module(exclude=["deltas", "pooler"])
    assert_unchanged(model, detached)  # recorded; the backbone is not this delta's while detached
    delta.save_finetuned(tmp_path)
    delta.attach()
    expected = model(**inputs).pooler_output
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora." in n or n.startswith("pooler.")
    }

    fresh = tiny_bert()
    LoraModel.from_finetuned(tmp_path, fresh)
    assert torch.equal(fresh(**inputs).pooler_output, expected)


@pytest.mark.parametrize("method", [LoraModel, AdapterModel])
def test_a_delta_built_under_inference_mode_trains_afterwards(method):
    model = tiny_bert()
    with torch.inference_mode():
        delta = method(model)
    assert not any(p.is_inference() for p in delta.delta_parameters())
    delta.freeze_module(exclude=["deltas"])
    perturb(delta)
    hidden(model, inputs_for("bert")).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.delta_parameters())


def test_a_detached_delta_follows_a_device_move_of_the_backbone():
    model = tiny_bert()
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas", "pooler"])
    delta.detach()
    model.to("meta")  # a device move that every machine can make
    delta.attach()
    assert {p.device.type for p in delta.delta_parameters()} == {"meta"}
    assert hidden(model, inputs_for("bert")).is_meta


def test_a_switch_to_a_delta_whose_tensor_another_attached_delta_trains_changes_nothing():
    model = tiny_bert()
    b = LoraModel(model, modified_modules=["query"], name="task_b")
    b.freeze_module(exclude=["deltas", "pooler"])
    train_pooler(model)
    b.detach()
    owner = LoraModel(model, modified_modules=["key"], name="owner")
    owner.freeze_module(exclude=["deltas", "pooler"])
    a = LoraModel(model, modified_modules=["query"], name="task_a")
    perturb(a)
    before = snapshot(model)
    with pytest.raises(LifecycleError, match="'pooler.dense.weight' is trained by delta 'owner'"):
        a.switch(to=b)
    assert_unchanged(model, before)
    assert a.is_attached and not b.is_attached


def test_loading_a_checkpoint_whose_tensor_an_attached_delta_trains_changes_nothing(tmp_path):
    trained = tiny_bert()
    saved = LoraModel(trained)
    saved.freeze_module(exclude=["deltas", "pooler"])
    train_pooler(trained)
    saved.save_finetuned(tmp_path)

    model = tiny_bert()
    owner = LoraModel(model, modified_modules=["key"], name="owner")
    owner.freeze_module(exclude=["deltas", "pooler"])
    before = snapshot(model)
    with pytest.raises(LifecycleError, match="'pooler.dense.weight' is trained by delta 'owner'"):
        LoraModel.from_finetuned(tmp_path, model)
    assert_unchanged(model, before)


def test_a_merged_delta_follows_a_dtype_move_when_unmerged():
    inputs = inputs_for("bert")
    reference = tiny_bert()
    perturb(LoraModel(reference))
    reference.to(torch.bfloat16)
    expected = hidden(reference, inputs)

    model = tiny_bert()
    delta = LoraModel(model)
    perturb(delta)
    delta.merge()
    model.to(torch.bfloat16)
    delta.unmerge()
    assert {p.dtype for p in delta.delta_parameters()} == {torch.bfloat16}
    assert torch.equal(hidden(model, inputs), expected)


def test_a_discarded_model_with_an_attached_frozen_delta_is_freed():
    model = tiny_bert()
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas", "pooler"])  # the flag and value claims must not keep the model alive
    alive = weakref.ref(model)
    del model, delta
    gc.collect()
    assert alive() is None


# ----------------------------------------------------------------- switch and freeze_module


def delta_grads_after_a_step(model: nn.Module) -> set[str]:
    """One backward on the tiny BERT; the names of the parameters it gave a gradient."""
    model.zero_grad(set_to_none=True)
    hidden(model, inputs_for("bert")).pow(2).mean().backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


def names_of(model: nn.Module, delta: LoraModel) -> set[str]:
    own = {id(p) for p in delta.delta_parameters()}
    return {n for n, p in model.named_parameters() if id(p) in own}


def two_tasks(model: nn.Module) -> tuple[LoraModel, LoraModel]:
    """Task a attached and frozen for training; task b built beside it, detached, never frozen."""
    a = LoraModel(model, modified_modules=["query", "value"], name="task_a")
    b = LoraModel(model, modified_modules=["query", "value"], name="task_b")
    b.detach()
    perturb(a)
    perturb(b)
    a.freeze_module(exclude=["deltas"])
    return a, b


def test_switching_to_a_delta_that_never_froze_trains_only_that_delta():
    model = tiny_bert()
    a, b = two_tasks(model)
    a.switch(to=b)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == names_of(model, b)
    assert delta_grads_after_a_step(model) == names_of(model, b)
    assert all(p.grad is None for p in a.delta_parameters())


def test_switching_back_trains_only_the_first_delta_again():
    model = tiny_bert()
    a, b = two_tasks(model)
    a.switch(to=b).switch(to=a)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names_of(model, a)
    assert delta_grads_after_a_step(model) == names_of(model, a)
    assert all(p.grad is None for p in b.delta_parameters())


def test_detaching_after_switches_restores_flags_the_user_had_set_unevenly():
    model = tiny_bert()
    model.embeddings.requires_grad_(False)  # the user's own freeze, before any delta
    model.encoder.layer[0].attention.output.dense.bias.requires_grad_(False)
    before = snapshot(model)
    a, b = two_tasks(model)
    a.switch(to=b).switch(to=a).switch(to=b)
    b.detach()
    assert_unchanged(model, before)
    a.attach()  # each keeps its freeze: b took a's over as its own at the first switch
    b.attach()
    a.detach()
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names_of(model, b)
    b.detach()
    assert_unchanged(model, before)


def test_a_delta_that_froze_keeps_its_own_freeze_through_a_switch():
    model = tiny_bert()
    a, b = two_tasks(model)
    b.freeze_module(exclude=["deltas", "pooler"])  # recorded while detached
    a.switch(to=b)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == names_of(model, b) | {"pooler.dense.weight", "pooler.dense.bias"}


def test_a_taken_over_freeze_trains_the_same_backbone_tensors_from_the_backbones_values():
    model = tiny_bert()
    bare = snapshot(model)
    a = LoraModel(model, modified_modules=["query"], name="task_a")
    a.freeze_module(exclude=["deltas", "pooler"])
    train_pooler(model, 1.0)
    a_pooler = model.pooler.dense.weight.detach().clone()
    b = LoraModel(model, modified_modules=["value"], name="task_b")
    b.detach()
    a.switch(to=b)
    assert model.pooler.dense.weight.requires_grad
    assert torch.equal(model.pooler.dense.weight, bare["params"]["pooler.dense.weight"])  # not a's trained value
    train_pooler(model, 2.0)
    b.detach()
    assert_unchanged(model, bare)
    a.attach()
    assert torch.equal(model.pooler.dense.weight, a_pooler)
    a.detach()
    assert_unchanged(model, bare)


def test_a_switch_that_fails_after_taking_over_the_freeze_leaves_the_taker_unfrozen(monkeypatch):
    model = tiny_bert()
    bare_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    a, b = two_tasks(model)
    before = snapshot(model)
    fail_the_third_flag(monkeypatch)
    with pytest.raises(RuntimeError, match="injected"):
        a.switch(to=b)
    assert_unchanged(model, before)
    assert a.is_attached and not b.is_attached
    monkeypatch.undo()
    a.detach()
    b.attach()  # b froze nothing itself: the backbone keeps its own flags
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert flags == {**bare_flags, **dict.fromkeys(names_of(model, b), True)}
