"""The original DeltaBase's helpers and arguments, with what each returned in the original."""

import pytest
import torch
from compat_models import IDS, bert, outputs, train_a_little

from opendelta import AutoDeltaConfig, LoraConfig, LoraModel, SoftPromptModel, set_strict, strict_mode
from opendelta.errors import CheckpointError, CheckpointPathError, DeltaConfigError
from opendelta.leniency import OriginalBehaviourWarning

INPUTS = {"input_ids": IDS}


@pytest.fixture
def tuned():
    model = bert()
    delta = LoraModel(backbone_model=model, modified_modules=["query", "value"])
    delta.freeze_module(exclude=["deltas", "pooler"], set_state_dict=True)
    return model, delta


def test_module_view_lists_the_delta_parameters_as_the_original_nn_module_did(tuned):
    model, delta = tuned
    names = [n for n, _ in delta.named_parameters()]
    assert names[:2] == ["encoder.layer.0.attention.self.query.lora.lora_A", "encoder.layer.0.attention.self.query.lora.lora_B"]
    assert len(list(delta.parameters())) == 8 and list(delta.state_dict()) == names
    assert delta.num_total_parameters() == delta.num_trainable_parameters() == 4 * 2 * 8 * 32
    assert len(delta.trainable_parameters()) == 8
    assert delta.num_trainable_parameters(model) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert set(delta.trainable_parameters_names()) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(delta.frozen_parameters_names()) == {n for n, p in model.named_parameters() if not p.requires_grad}
    with pytest.raises(RuntimeError, match="backbone"):
        delta(IDS)


def test_find_key_and_find_module(tuned):
    model, delta = tuned
    assert delta.find_key("encoder.layer.1.attention.self.query", ["query"])
    assert delta.find_key("encoder.layer.1.attention.self.query", ["attn@.q@"])
    assert not delta.find_key("encoder.layer.1.attention.self.key", ["query", "attn@.v@"])
    parent, name, child = delta.find_module(model, "encoder.layer.1.attention.self.query")
    assert (parent, name, child) == (model.encoder.layer[1].attention.self, "query", model.encoder.layer[1].attention.self.query)


def test_config_helpers(tuned):
    _, delta = tuned
    assert delta.create_config_from_model() is delta.config
    delta.mark_as_delta()
    assert all(p._is_delta for p in delta.parameters())
    assert '"delta_type": "lora"' in delta.config.to_json_string() and "lora_r" not in delta.config.to_diff_dict()
    delta.config.update({"lora_r": 4})
    assert delta.config.to_diff_dict()["lora_r"] == 4
    with pytest.raises(DeltaConfigError, match="lora_r"):
        delta.config.update({"lora_r": "4"})


def test_partial_detach_and_attach_restore_exactly(tuned):
    model, delta = tuned
    bare_model = bert()
    train_a_little(model, INPUTS)
    full = outputs(model, INPUTS)
    delta.detach(module=model.encoder.layer[1])
    only_first = outputs(model, INPUTS)
    assert not torch.equal(only_first[0], full[0])
    delta.attach(module=model.encoder.layer[1], reset_state_dict=True)
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, INPUTS), full))
    delta.detach(module=model.encoder.layer[0])
    delta.detach(reset_state_dict=True)  # a whole detach after a partial one
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, INPUTS), outputs(bare_model, INPUTS)))
    delta.attach()
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, INPUTS), full))


def test_log_takes_the_originals_arguments(tuned, capsys):
    _, delta = tuned
    delta.log(delta_ratio=True, trainable_ratio=True, visualization=True)
    assert "lora (LoraLayer)" in capsys.readouterr().out
    delta.log(module=None, delta_ratio=True, trainable_ratio=True, visualization=False, cuda_memory=True)
    assert "LoraLayer" not in capsys.readouterr().out


def test_from_config_takes_check_hash_and_overrides():
    delta = LoraModel.from_config(LoraConfig(lora_r=4), bert(), check_hash=True, lora_r=2)
    assert delta.config.lora_r == 2 and delta.layers["encoder.layer.0.attention.self.query"].lora_A.shape[0] == 2


def test_save_finetuned_accepts_the_originals_arguments_and_refuses_the_deltacenter(tuned, tmp_path):
    model, delta = tuned
    delta.save_finetuned(tmp_path / "a", save_config=True, state_dict=model.state_dict(), list_tags=["NLI"],
                         dict_tags={"purpose": "x"}, usage="", test_result=None, delay_push=True)
    with pytest.raises(CheckpointError, match="DeltaCenter, which no longer exists"):
        delta.save_finetuned(tmp_path / "b", push_to_dc=True, center_args={"name": "x"})
    assert not (tmp_path / "b").exists()
    other = {k: v + 1 for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="not this delta's current tensor"):
        delta.save_finetuned(tmp_path / "c", state_dict=other)


def test_from_finetuned_takes_the_originals_arguments(tuned, tmp_path):
    model, delta = tuned
    train_a_little(model, INPUTS)
    expected = outputs(model, INPUTS)
    delta.save_finetuned(tmp_path / "ckpt")
    for kwargs in ({"cache_dir": str(tmp_path)}, {"delta_config": LoraConfig.from_finetuned(tmp_path / "ckpt")},
                   {"state_dict": model.state_dict(), "delta_config": delta.config}):
        fresh = bert()
        path = "ckpt" if "cache_dir" in kwargs else tmp_path / "ckpt"
        LoraModel.from_finetuned(path, fresh, check_hash=False, local_files_only=True, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(outputs(fresh, INPUTS), expected)), kwargs
    with pytest.raises(CheckpointPathError, match="force_download=True downloads from the Hugging Face Hub"):
        LoraModel.from_finetuned(tmp_path / "ckpt", bert(), force_download=True)


def test_backend_hf_is_accepted_and_bmt_is_a_typed_error():
    assert LoraModel(bert(), backend="hf").config.backend == "hf"
    assert AutoDeltaConfig.from_dict({"delta_type": "adapter", "backend": "hf"}).backend == "hf"
    with pytest.raises(DeltaConfigError, match="BMTrain is not supported|BMTrain.*not supported"):
        LoraModel(bert(), backend="bmt")


def test_soft_prompt_other_expand_ids():
    SoftPromptModel(bert(), soft_token_num=4, other_expand_ids={"attention_mask": 1, "token_type_ids": 0})
    with pytest.raises(DeltaConfigError, match="other_expand_ids"):
        SoftPromptModel(bert(), soft_token_num=4, other_expand_ids={"attention_mask": 0})


def test_config_dicts_drop_script_keys_with_a_warning_and_keep_typos_errors():
    with pytest.warns(OriginalBehaviourWarning, match="'output_dir'"):
        config = AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": 4, "output_dir": "x", "learning_rate": 3e-4})
    assert config.lora_r == 4
    with pytest.raises(DeltaConfigError, match="'lora_rr'.*'lora_r'"):
        AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_rr": 4})
    with strict_mode(), pytest.raises(DeltaConfigError, match="output_dir"):
        AutoDeltaConfig.from_dict({"delta_type": "lora", "output_dir": "x"})
    set_strict(True)
    try:
        with pytest.raises(DeltaConfigError, match="output_dir"):
            AutoDeltaConfig.from_dict({"delta_type": "lora", "output_dir": "x"})
    finally:
        set_strict(False)


def test_strict_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv("OPENDELTA_STRICT", "1")
    from opendelta import leniency

    monkeypatch.setattr(leniency, "_strict", None)
    assert leniency.is_strict()
    monkeypatch.setenv("OPENDELTA_STRICT", "0")
    assert not leniency.is_strict()


def test_original_common_structure_names_as_modified_modules():
    model = bert()
    assert sorted(LoraModel.plan(model, modified_modules=["attn@.q@", "attn@.v@"])) == sorted(
        f"encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "value"))
    assert LoraModel.plan(model, modified_modules=["ff@.w2@"]) == [f"encoder.layer.{i}.output.dense" for i in (0, 1)]
    assert LoraModel.plan(model, modified_modules=["attn.proj"], common_structure=True) == [
        f"encoder.layer.{i}.attention.output.dense" for i in (0, 1)]
    from opendelta.errors import StructureError

    with pytest.raises(StructureError, match="'atn@'.*Did you mean 'attn@'"):
        LoraModel.plan(model, modified_modules=["atn@"])
    from opendelta import CommonStructureMap

    assert CommonStructureMap(model).transform("encoder.layer.0.attention.self.query")[0] == "attn@.q@"


def test_a_module_name_transformers_5_renamed_is_used_under_its_new_name_with_a_warning():
    import transformers as tf

    torch.manual_seed(0)
    model = tf.BeitModel(tf.BeitConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                       image_size=16, patch_size=8))
    with pytest.warns(OriginalBehaviourWarning, match="'query' names no module; transformers 5 calls it 'q_proj'"):
        assert LoraModel.plan(model, modified_modules=["query"]) == ["layers.0.attention.q_proj"]
    from opendelta.errors import NoMatchError

    with strict_mode(), pytest.raises(NoMatchError, match="'query'.*q_proj"):
        LoraModel.plan(model, modified_modules=["query"])


def test_set_active_state_dict_keeps_only_trainable_tensors():
    model = bert()
    delta = LoraModel(backbone_model=model, modified_modules=["query"])
    delta.freeze_module(exclude=["deltas"], set_state_dict=False)
    assert len(model.state_dict()) > len(delta.trainable_parameters_names())
    delta.set_active_state_dict(model)
    assert sorted(model.state_dict()) == sorted(delta.trainable_parameters_names())
    delta.detach()
    assert len(model.state_dict()) == len(bert().state_dict())
