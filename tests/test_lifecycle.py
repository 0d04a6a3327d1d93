"""Delta lifecycle: attach/detach exactness, several deltas at once, freezing, state_dict."""

from __future__ import annotations

import pytest
import torch

from opendelta import LifecycleError, LoraModel, NoMatchError
from opendelta.leniency import OriginalBehaviourWarning, strict_mode

from conftest import FACTORIES, PlainNet, hidden, inputs_for, perturb, tiny_bert


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_detach_restores_the_backbone_bit_for_bit(family):
    model = FACTORIES[family]()
    inputs = inputs_for(family)
    ref, keys, state = hidden(model, inputs), list(model.state_dict()), snapshot(model)
    delta = LoraModel(model)
    perturb(delta)
    assert not torch.equal(hidden(model, inputs), ref)
    delta.detach()
    assert torch.equal(hidden(model, inputs), ref)
    assert list(model.state_dict()) == keys
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_reattach_reproduces_the_tuned_output(family):
    model = FACTORIES[family]()
    inputs = inputs_for(family)
    delta = LoraModel(model)
    perturb(delta)
    tuned = hidden(model, inputs)
    for _ in range(3):
        delta.detach()
        delta.attach()
    assert torch.equal(hidden(model, inputs), tuned)


def test_double_attach_and_double_detach_raise_and_change_nothing():
    model = tiny_bert()
    delta = LoraModel(model)
    with pytest.raises(LifecycleError, match="already attached"):
        delta.attach()
    assert len(list(model.encoder.layer[0].attention.self.query._forward_hooks)) == 1
    delta.detach()
    with pytest.raises(LifecycleError, match="not attached"):
        delta.detach()


def test_several_deltas_live_on_one_backbone_and_detach_in_any_order():
    model = tiny_bert()
    inputs = inputs_for("bert")
    ref = hidden(model, inputs)
    a = LoraModel(model, modified_modules=["query", "value"])
    b = LoraModel(model, modified_modules=["query", "output.dense"], lora_r=2)
    assert (a.name, b.name) == ("lora", "lora_1")
    perturb(a)
    perturb(b)
    both = hidden(model, inputs)
    a.detach()
    only_b = hidden(model, inputs)
    b.detach()
    assert torch.equal(hidden(model, inputs), ref)
    a.attach()
    only_a = hidden(model, inputs)
    b.attach()
    assert torch.allclose(hidden(model, inputs), both, atol=1e-6)
    a.detach()
    assert torch.allclose(hidden(model, inputs), only_b, atol=1e-6)
    b.detach()
    a.attach()
    assert torch.equal(hidden(model, inputs), only_a)


def test_an_explicit_name_that_is_taken_is_an_error():
    model = tiny_bert()
    LoraModel(model, name="task")
    with pytest.raises(LifecycleError, match="'task'"):
        LoraModel(model, name="task")


def test_delta_parameters_are_registered_on_the_backbone_under_the_delta_name():
    model = tiny_bert()
    LoraModel(model, name="sentiment")
    names = [n for n, _ in model.named_parameters() if "sentiment" in n]
    assert "encoder.layer.0.attention.self.query.sentiment.lora_A" in names and len(names) == 8


def test_freeze_module_leaves_only_what_exclude_names_trainable():
    model = tiny_bert()
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas", "pooler"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora." in n or n.startswith("pooler.")}


def test_freeze_module_unknown_exclude_name_is_an_error_in_strict_mode():
    delta = LoraModel(tiny_bert())
    with strict_mode(), pytest.raises(NoMatchError, match="poler"):
        delta.freeze_module(exclude=["deltas", "poler"])


def test_freeze_module_unknown_exclude_name_warns_naming_the_close_one_by_default():
    """As the original OpenDelta ignored it (tutorial lists are written for several families)."""
    delta = LoraModel(tiny_bert())
    with pytest.warns(OriginalBehaviourWarning, match="'poler'.*Did you mean: 'pooler'"):
        delta.freeze_module(exclude=["deltas", "poler"])


def test_set_state_dict_keeps_only_trainable_tensors_and_follows_later_unfreezing():
    model = tiny_bert()
    own_keys = set(model.state_dict())
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas"], set_state_dict=True)
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters() if ".lora." in n}
    model.pooler.dense.weight.requires_grad_(True)
    assert "pooler.dense.weight" in model.state_dict()
    delta.detach()
    assert set(model.state_dict()) == own_keys


def test_detach_restores_backbone_tensors_the_delta_trained():
    model = tiny_bert()
    inputs = inputs_for("bert")
    ref = hidden(model, inputs)
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas", "pooler"])
    with torch.no_grad():
        model.pooler.dense.weight.add_(1.0)  # "training" the unfrozen pooler
    perturb(delta)
    tuned_pooler = model(**inputs).pooler_output
    delta.detach()
    assert torch.equal(hidden(model, inputs), ref)
    assert torch.equal(model.pooler.dense.weight, tiny_bert().pooler.dense.weight)
    delta.attach()
    assert torch.equal(model(**inputs).pooler_output, tuned_pooler)


def test_a_failed_construction_leaves_the_model_as_it_was():
    model = PlainNet()
    x = torch.randn(2, 8)
    ref = model(x)
    with pytest.raises(NoMatchError):
        LoraModel(model, modified_modules=["encoder.0", "encodr.2"])
    assert torch.equal(model(x), ref)
    assert not any("lora" in n for n in model.state_dict())


def test_plan_is_a_dry_run():
    model = tiny_bert()
    before = list(model.named_modules())
    paths = LoraModel.plan(model, modified_modules=["query"], exclude_modules=["layer.0"])
    assert paths == ["encoder.layer.1.attention.self.query"]
    assert list(model.named_modules()) == before


def test_works_on_a_plain_module():
    model = PlainNet()
    x = torch.randn(2, 8)
    ref = model(x)
    delta = LoraModel(model, modified_modules=["encoder.0", "head"])
    perturb(delta)
    delta.freeze_module()
    model(x).sum().backward()
    assert all(p.grad is not None for p in delta.delta_parameters())
    delta.detach()
    assert torch.equal(model(x), ref)


def test_log_reports_counts(capsys):
    delta = LoraModel(tiny_bert())
    delta.freeze_module()
    delta.log()
    counts = delta.parameter_counts()
    out = capsys.readouterr().out
    assert counts["trainable"] == counts["delta"] == 4 * (8 * 32 + 32 * 8)
    assert f"{counts['delta']:,}" in out and "modified modules" in out
