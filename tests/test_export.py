"""Shipping a tuned delta as a plain model: the save trap, merge_and_unload, export_merged."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file
from support.ecosystem_fixtures import randomize_deltas, tiny_batch, tiny_bert
from support.numerics import assert_within_noise, float32_noise
from torch import nn
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

from opendelta import AdapterModel, BitFitModel, IA3Model, LifecycleError, LoraModel, MergeError, PrefixModel
from opendelta.addressing import is_delta_module


def _inputs() -> dict[str, torch.Tensor]:
    batch = tiny_batch()
    batch.pop("labels")
    return batch


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs()).logits


MERGEABLE = [
    pytest.param(lambda m: LoraModel(m, modified_modules=["query", "value", "output.dense"], lora_r=4), id="lora"),
    pytest.param(
        lambda m: LoraModel(m, modified_modules=["query"], lora_r=4, use_rslora=True, rank_pattern={"layer.0.attention.self.query": 2}),
        id="lora-rslora-rank-pattern",
    ),
    pytest.param(
        lambda m: IA3Model(m, modified_modules=["key", "value", "output.dense"], feedforward_modules=["layer.0.output.dense"]),
        id="ia3",
    ),
    pytest.param(lambda m: BitFitModel(m, modified_modules=["query", "intermediate.dense"]), id="bitfit"),
]


# ----------------------------------------------------------------- the save trap


def test_save_pretrained_of_a_merged_model_with_a_state_dict_filter_writes_the_whole_model(tmp_path):
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query", "value"], lora_r=4)
    randomize_deltas(delta)
    delta.freeze_module(exclude=["deltas", "classifier"], set_state_dict=True)
    assert len(model.state_dict()) == 10  # 8 LoRA factors and the head: the filter a trainer's checkpoint relies on
    delta.merge()
    merged = _logits(model)
    model.save_pretrained(tmp_path)

    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(tiny_bert().state_dict())
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(reloaded), merged)


def test_the_state_dict_filter_comes_back_on_unmerge():
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query"], lora_r=4)
    delta.freeze_module(set_state_dict=True)
    trainable = set(model.state_dict())
    delta.merge()
    delta.unmerge()
    assert set(model.state_dict()) == trainable


def test_the_whole_state_dict_export_reads_is_only_the_exporting_threads():
    # export_merged reads the whole model through the filter; another thread meanwhile still gets the
    # trainable tensors only
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query"], lora_r=4)
    delta.freeze_module(set_state_dict=True)
    trainable = set(model.state_dict())
    seen: list[set[str]] = []
    with delta._changes.unfiltered_state_dict():
        whole = set(model.state_dict())
        other = threading.Thread(target=lambda: seen.append(set(model.state_dict())))
        other.start()
        other.join()
    assert seen == [trainable] and trainable < whole
    assert set(model.state_dict()) == trainable


# ----------------------------------------------------------------- merge_and_unload


@pytest.mark.parametrize("make", MERGEABLE)
def test_merge_and_unload_leaves_a_plain_model_computing_the_merged_outputs(make):
    model = tiny_bert()
    delta = make(model)
    randomize_deltas(delta)
    delta.freeze_module(exclude=["deltas", "classifier"], set_state_dict=True)
    with torch.no_grad():
        model.classifier.weight.add_(0.5)  # a trained head: part of the shipped model
    unmerged = _logits(model)
    delta.merge()
    merged = _logits(model)
    delta.unmerge()

    returned = delta.merge_and_unload()

    assert returned is model
    assert torch.equal(_logits(model), merged)
    assert_within_noise(merged, unmerged, float32_noise(model, lambda m, _: m(**_inputs()).logits))
    assert not any(is_delta_module(m) for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert set(model.state_dict()) == set(tiny_bert().state_dict())
    assert all(p.requires_grad for p in model.parameters())  # the backbone's own flags
    assert not delta.is_attached


def test_a_delta_unloaded_into_the_weights_cannot_attach_again():
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query"], lora_r=4)
    randomize_deltas(delta)
    delta.merge_and_unload()
    with pytest.raises(LifecycleError, match="twice"):
        delta.attach()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda m: AdapterModel(m, modified_modules=["attention.output.dense"]), id="adapter"),
        pytest.param(lambda m: PrefixModel(m, modified_modules=["attention.self"], prefix_token_num=2), id="prefix"),
    ],
)
def test_a_delta_that_cannot_merge_raises_and_changes_nothing(make, tmp_path):
    model = tiny_bert()
    delta = make(model)
    randomize_deltas(delta)
    before = _logits(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(MergeError, match="save_finetuned"):
        delta.merge_and_unload()
    with pytest.raises(MergeError, match="save_finetuned"):
        delta.export_merged(tmp_path / "out")

    assert delta.is_attached and not delta.is_merged
    assert torch.equal(_logits(model), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not (tmp_path / "out").exists()


def test_bitfit_on_a_module_without_a_bias_cannot_merge():
    model = tiny_bert()
    model.bert.encoder.layer[0].attention.self.query.bias = None
    delta = BitFitModel(model, modified_modules=["layer.0.attention.self.query"])
    with pytest.raises(MergeError, match="has none"):
        delta.merge_and_unload()
    assert delta.is_attached


# ----------------------------------------------------------------- export_merged


@pytest.mark.parametrize("make", MERGEABLE)
def test_export_merged_loads_with_from_pretrained_and_equals_the_merged_model(make, tmp_path):
    model = tiny_bert()
    delta = make(model)
    randomize_deltas(delta)
    delta.freeze_module(exclude=["deltas"], set_state_dict=True)
    before = _logits(model)
    tensors = {k: v.clone() for k, v in model.state_dict().items()}  # filtered: the delta's trainable tensors
    delta.merge()
    merged = _logits(model)
    model.save_pretrained(tmp_path / "merged-in-place")
    delta.unmerge()

    delta.export_merged(tmp_path / "out")

    assert delta.is_attached and not delta.is_merged
    assert torch.equal(_logits(model), before)  # the model in memory is as it was
    after = model.state_dict()  # the state-dict filter is on again
    assert list(after) == list(tensors) and all(torch.equal(after[k], v) for k, v in tensors.items())
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(_logits(reloaded), merged)
    # the same tensors as saving the model merged in place (what export_merged did before it built the state dict)
    written, reference = load_file(tmp_path / "out/model.safetensors"), load_file(tmp_path / "merged-in-place/model.safetensors")
    assert list(written) == list(reference) and all(torch.equal(written[k], v) for k, v in reference.items())


def test_export_merged_of_a_gpt2_conv1d_lora_keeps_the_tied_head(tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    model = GPT2LMHeadModel(config).eval()
    delta = LoraModel(model, modified_modules=["c_attn", "c_proj"], lora_r=4)
    randomize_deltas(delta)
    ids = torch.randint(0, 99, (2, 6), generator=torch.Generator().manual_seed(3))
    delta.merge()
    with torch.no_grad():
        merged = model(ids).logits
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    delta.unmerge()
    delta.export_merged(tmp_path)
    written = load_file(tmp_path / "model.safetensors")  # Conv1D's merged weight is a transposed view: stored dense
    assert all(torch.equal(v, reference[k]) for k, v in written.items())
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, merged)


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 4)
        self.register_buffer("offset", torch.arange(4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x))) + self.offset


def test_export_merged_of_a_plain_module_is_a_safetensors_state_dict(tmp_path):
    torch.manual_seed(0)
    model = _Mlp()
    x = torch.randn(3, 8)
    delta = LoraModel(model, modified_modules=["up", "down"], lora_r=2, dummy_inputs=x)
    randomize_deltas(delta)
    delta.merge()
    merged = model(x)
    delta.unmerge()

    path = delta.export_merged(tmp_path)

    fresh = _Mlp()
    fresh.load_state_dict(load_file(f"{path}/model.safetensors"))
    assert torch.equal(fresh(x), merged)


def test_export_merged_refuses_while_another_delta_is_attached_unmerged(tmp_path):
    model = tiny_bert()
    lora = LoraModel(model, modified_modules=["query"], lora_r=4)
    AdapterModel(model, modified_modules=["attention.output.dense"])
    with pytest.raises(LifecycleError, match="not merged"):
        lora.export_merged(tmp_path / "out")
    assert not lora.is_merged and not (tmp_path / "out").exists()


def test_export_merged_of_a_detached_delta_is_refused(tmp_path):
    delta = LoraModel(tiny_bert(), modified_modules=["query"], lora_r=4)
    delta.detach()
    with pytest.raises(LifecycleError, match="detached"):
        delta.export_merged(tmp_path)
    with pytest.raises(LifecycleError, match="detached"):
        delta.merge_and_unload()
