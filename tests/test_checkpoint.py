"""Checkpoints: safetensors + JSON, exact reload, atomic writes, typed errors that change nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opendelta import (
    AutoDeltaConfig,
    AutoDeltaModel,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DeltaConfigError,
    IncompatibleCheckpointError,
    LoraConfig,
    LoraModel,
    UnknownDeltaTypeError,
)
from opendelta.checkpoint import CONFIG_NAME, read_checkpoint

from conftest import FACTORIES, hidden, inputs_for, perturb, tiny_bert


def weights_file(ckpt: Path) -> Path:
    """The tensors file the checkpoint's config names."""
    return ckpt / json.loads((ckpt / CONFIG_NAME).read_text())["weights"]["file"]


def tuned_checkpoint(tmp_path: Path, kind: str = "bert", **kwargs):
    model = FACTORIES[kind]()
    delta = LoraModel(model, **kwargs)
    perturb(delta)
    out = hidden(model, inputs_for(kind))
    delta.save_finetuned(tmp_path / "ckpt")
    return tmp_path / "ckpt", out


def test_save_then_load_into_a_fresh_backbone_reproduces_outputs(family, tmp_path):
    ckpt, tuned = tuned_checkpoint(tmp_path, family)
    fresh = FACTORIES[family]()
    delta = AutoDeltaModel.from_finetuned(ckpt, fresh)
    assert isinstance(delta, LoraModel)
    assert torch.equal(hidden(fresh, inputs_for(family)), tuned)


def test_checkpoint_is_json_plus_safetensors_of_delta_tensors_only(tmp_path):
    ckpt, _ = tuned_checkpoint(tmp_path, lora_r=4)
    meta = json.loads((ckpt / CONFIG_NAME).read_text())
    assert sorted(p.name for p in ckpt.iterdir()) == [CONFIG_NAME, meta["weights"]["file"]]
    assert meta["delta_type"] == "lora" and meta["config"]["lora_r"] == 4
    assert meta["backbone"]["class"] == "BertModel" and meta["library_version"]
    assert "encoder.layer.0.attention.self.query" in meta["modules"] and len(meta["modules"]) == 4
    tensors = load_file(weights_file(ckpt))
    # the 4 lora_A and the 4 lora_B are stored as two stacked tensors, listed in the config
    assert sorted(tensors) == ["stack.0.lora_A", "stack.1.lora_B"]
    assert tensors["stack.0.lora_A"].shape == (4, 4, 32)
    assert meta["stacks"]["stack.0.lora_A"][0] == "delta.encoder.layer.0.attention.self.query.lora_A"
    unstacked = read_checkpoint(ckpt).tensors
    assert len(unstacked) == 8 and all(k.startswith("delta.") for k in unstacked)
    assert torch.equal(unstacked["delta.encoder.layer.0.attention.self.query.lora_A"], tensors["stack.0.lora_A"][0])
    assert weights_file(ckpt).read_bytes()[:8] != b"\x80\x02\x8a\nl\xfc\x9cF"  # not a pickle


def test_checkpoint_holds_the_unfrozen_head_and_reload_restores_it(tmp_path):
    model = tiny_bert()
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas", "pooler"])
    perturb(delta)
    with torch.no_grad():
        model.pooler.dense.bias.add_(0.5)
    tuned = model(**inputs_for("bert")).pooler_output
    delta.save_finetuned(tmp_path / "ckpt")
    fresh = tiny_bert()
    loaded = LoraModel.from_finetuned(tmp_path / "ckpt", fresh)
    assert torch.equal(fresh(**inputs_for("bert")).pooler_output, tuned)
    loaded.detach()
    assert torch.equal(fresh.pooler.dense.bias, tiny_bert().pooler.dense.bias)


def test_save_while_detached_saves_the_tuned_values(tmp_path):
    model = tiny_bert()
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas", "pooler"])
    with torch.no_grad():
        model.pooler.dense.bias.add_(0.5)
    perturb(delta)
    tuned = model(**inputs_for("bert")).pooler_output
    delta.detach()
    delta.save_finetuned(tmp_path / "ckpt")
    fresh = tiny_bert()
    AutoDeltaModel.from_finetuned(tmp_path / "ckpt", fresh)
    assert torch.equal(fresh(**inputs_for("bert")).pooler_output, tuned)


def test_auto_config_and_from_config_place_defaults():
    config = AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": 2})
    assert isinstance(config, LoraConfig) and config.lora_r == 2 and config.lora_alpha == 16
    model = tiny_bert()
    delta = AutoDeltaModel.from_config(config, backbone_model=model)
    assert isinstance(delta, LoraModel) and len(delta.layers) == 4
    assert delta.layers["encoder.layer.0.attention.self.query"].lora_A.shape == (2, 32)


def test_auto_config_from_finetuned_reads_type_and_arguments(tmp_path):
    ckpt, _ = tuned_checkpoint(tmp_path, lora_r=4, lora_alpha=3)
    config = AutoDeltaConfig.from_finetuned(ckpt)
    assert isinstance(config, LoraConfig) and (config.lora_r, config.lora_alpha) == (4, 3)


def test_unknown_config_keys_and_types_are_errors():
    with pytest.raises(DeltaConfigError, match="lora_rank"):
        AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_rank": 4})
    with pytest.raises(UnknownDeltaTypeError, match="'lorra'.*'lora'"):
        AutoDeltaConfig.from_dict({"delta_type": "lorra"})
    with pytest.raises(DeltaConfigError, match="delta_type"):
        AutoDeltaConfig.from_dict({"lora_r": 4})


# ---------------------------------------------------------------- bad input loses nothing


def assert_untouched(model, ref_state, ref_out):
    assert list(model.state_dict()) == list(ref_state)
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(hidden(model, inputs_for("bert")), ref_out)


@pytest.fixture
def fresh_bert():
    model = tiny_bert()
    return model, {k: v.clone() for k, v in model.state_dict().items()}, hidden(model, inputs_for("bert"))


def test_missing_directory(fresh_bert, tmp_path):
    model, state, out = fresh_bert
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint directory"):
        AutoDeltaModel.from_finetuned(tmp_path / "nope", model)
    assert_untouched(model, state, out)


def test_directory_without_config(fresh_bert, tmp_path):
    model, state, out = fresh_bert
    with pytest.raises(CheckpointNotFoundError, match=CONFIG_NAME):
        AutoDeltaModel.from_finetuned(tmp_path, model)
    assert isinstance(CheckpointNotFoundError("x"), FileNotFoundError)


def test_missing_weights_file(fresh_bert, tmp_path):
    model, state, out = fresh_bert
    ckpt, _ = tuned_checkpoint(tmp_path)
    weights = weights_file(ckpt)
    weights.unlink()
    with pytest.raises(CheckpointNotFoundError, match=weights.name):
        AutoDeltaModel.from_finetuned(ckpt, model)
    assert_untouched(model, state, out)


def test_corrupt_config(fresh_bert, tmp_path):
    model, state, out = fresh_bert
    ckpt, _ = tuned_checkpoint(tmp_path)
    (ckpt / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        AutoDeltaModel.from_finetuned(ckpt, model)
    assert_untouched(model, state, out)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_truncated_or_altered_weights(fresh_bert, tmp_path, damage):
    model, state, out = fresh_bert
    ckpt, _ = tuned_checkpoint(tmp_path)
    weights = weights_file(ckpt)
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checksum|truncated"):
        AutoDeltaModel.from_finetuned(ckpt, model)
    assert_untouched(model, state, out)


def test_unreadable_safetensors_with_matching_checksum_is_corrupt(fresh_bert, tmp_path):
    model, state, out = fresh_bert
    ckpt, _ = tuned_checkpoint(tmp_path)
    weights_file(ckpt).write_bytes(b"garbage")
    meta = json.loads((ckpt / CONFIG_NAME).read_text())
    meta["weights"]["sha256"] = hashlib.sha256(b"garbage").hexdigest()
    (ckpt / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match="safetensors"):
        AutoDeltaModel.from_finetuned(ckpt, model)
    assert_untouched(model, state, out)


def test_unknown_delta_type_in_checkpoint(fresh_bert, tmp_path):
    model, state, out = fresh_bert
    ckpt, _ = tuned_checkpoint(tmp_path)
    meta = json.loads((ckpt / CONFIG_NAME).read_text())
    meta["delta_type"] = "mystery"
    (ckpt / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(UnknownDeltaTypeError, match="mystery"):
        AutoDeltaModel.from_finetuned(ckpt, model)
    assert_untouched(model, state, out)


def test_wrong_backbone_names_the_missing_modules(tmp_path):
    ckpt, _ = tuned_checkpoint(tmp_path, "llama")
    model = tiny_bert()
    state, out = {k: v.clone() for k, v in model.state_dict().items()}, hidden(model, inputs_for("bert"))
    with pytest.raises(IncompatibleCheckpointError, match="LlamaForCausalLM.*model.layers.0.self_attn.q_proj"):
        AutoDeltaModel.from_finetuned(ckpt, model)
    assert_untouched(model, state, out)


def test_wrong_shapes_are_named(tmp_path):
    ckpt, _ = tuned_checkpoint(tmp_path)
    model = tiny_bert(hidden_size=48, intermediate_size=37)
    state, out = {k: v.clone() for k, v in model.state_dict().items()}, hidden(model, inputs_for("bert"))
    with pytest.raises(IncompatibleCheckpointError, match=r"attention.self.query.lora_A: checkpoint \(8, 32\) vs backbone \(8, 48\)"):
        AutoDeltaModel.from_finetuned(ckpt, model)
    assert_untouched(model, state, out)


def test_loading_with_the_wrong_class_is_an_error(tmp_path):
    from opendelta import DeltaBase, DeltaConfig, DeltaLayer
    from opendelta.registry import unregister

    class OtherConfig(DeltaConfig):
        pass

    class Other(DeltaBase):
        config_class = OtherConfig
        delta_type = "test_other_method"

        def new_layer(self, path, module, observation):
            return DeltaLayer()

    try:
        ckpt, _ = tuned_checkpoint(tmp_path)
        with pytest.raises(IncompatibleCheckpointError, match="LoraModel"):
            Other.from_finetuned(ckpt, tiny_bert())
    finally:
        unregister("test_other_method")


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    ckpt, _ = tuned_checkpoint(tmp_path)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    model = tiny_bert()
    delta = LoraModel(model, lora_r=2)
    import opendelta.checkpoint_files as checkpoint_files

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_files, "save_safetensors", disk_full)
    with pytest.raises(OSError, match="No space"):
        delta.save_finetuned(ckpt)
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before  # no temporary files left either


def test_save_overwrites_a_checkpoint_and_keeps_other_files(tmp_path):
    ckpt, _ = tuned_checkpoint(tmp_path)
    (ckpt / "README.txt").write_text("mine")
    model = tiny_bert()
    delta = LoraModel(model, lora_r=2)
    perturb(delta)
    out = hidden(model, inputs_for("bert"))
    delta.save_finetuned(ckpt)
    assert (ckpt / "README.txt").read_text() == "mine"
    fresh = tiny_bert()
    AutoDeltaModel.from_finetuned(ckpt, fresh)
    assert torch.equal(hidden(fresh, inputs_for("bert")), out)


def test_checkpoint_bytes_are_delta_bytes_plus_a_small_header(tmp_path):
    ckpt, _ = tuned_checkpoint(tmp_path)
    delta_bytes = 4 * 2 * (8 * 32) * 4
    total = sum(p.stat().st_size for p in ckpt.iterdir())
    assert delta_bytes < total < delta_bytes + 16 * 1024


def test_checkpoint_overhead_on_a_30_layer_llama_stays_below_16_kib(tmp_path):
    """Bytes on disk beyond the delta tensors themselves (JSON config + safetensors header) for 60 LoRA modules."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=30, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=99)
    delta = LoraModel(LlamaForCausalLM(config))
    delta.freeze_module()
    delta.save_finetuned(tmp_path)
    tensor_bytes = sum(p.numel() * p.element_size() for p in delta.backbone_model.parameters() if p.requires_grad)
    disk = sum(f.stat().st_size for f in tmp_path.iterdir())
    assert len(delta.layers) == 60
    assert disk - tensor_bytes < 16 * 1024


@pytest.mark.parametrize("format", ["pickle", ["peft"], None])
def test_an_unknown_save_format_is_a_typed_error_naming_the_known_ones_and_writes_nothing(tmp_path, format):
    delta = LoraModel(tiny_bert(), lora_r=2)
    with pytest.raises(CheckpointError, match=r"unknown checkpoint format.*'opendelta', 'peft'"):
        delta.save_finetuned(tmp_path / "ckpt", format=format)
    assert not (tmp_path / "ckpt").exists()
