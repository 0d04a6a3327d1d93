"""Checkpoints written by the original OpenDelta 0.3.2 load, read with torch.load(weights_only=True),
and `opendelta convert` rewrites them as safetensors + JSON.

opendelta==0.3.2 cannot be installed beside transformers 5, so the folders are built here exactly as
its save_finetuned wrote them (read from its source): ``config.json`` is the config's diff against
the defaults (``json.dumps(..., indent=2, sort_keys=True)``) with the backbone's class, checkpoint
name and MD5 hash and the library versions; ``pytorch_model.bin`` is ``torch.save`` of the
backbone's state dict after ``freeze_module(set_state_dict=True)``: the trainable tensors only, the
delta modules' under the name the original inserted them as (``...query.lora.lora_A``,
``...dense.adapter.modulelist.down_proj.weight``)."""

import json
import os
from pathlib import Path

import pytest
import torch
from compat_models import IDS, bert_masked_lm, outputs

from opendelta import AdapterModel, AutoDeltaModel, LoraModel
from opendelta.__main__ import main as opendelta_cli
from opendelta.errors import CorruptCheckpointError, IncompatibleCheckpointError
from opendelta.utils.model_md5 import gen_model_hash

INPUTS = {"input_ids": IDS}


def original_folder(tmp_path: Path, delta_type: str, model, tensors: dict, config: dict) -> Path:
    """Write the folder as OpenDelta 0.3.2's save_finetuned would have."""
    folder = tmp_path / f"original_{delta_type}"
    folder.mkdir()
    state = model.state_dict()  # an OrderedDict with _metadata, as the decorated state_dict returned
    for key in list(state):
        if key != "cls.predictions.bias":  # the one backbone tensor left trainable (an unfrozen head bias)
            del state[key]
    state.update(tensors)
    torch.save(state, folder / "pytorch_model.bin")
    values = {"delta_type": delta_type, "backbone_class": type(model).__name__, "backbone_checkpoint_name": "bert-base-cased",
              "backbone_hash": gen_model_hash(model), "opendelta_version": "0.3.0", "transformers_version": "4.40.2",
              "exclude_modules": ["lm_head"], "common_structure": None, **config}
    (folder / "config.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    return folder


def lora_tensors(model, paths, r=8):
    g = torch.Generator().manual_seed(1)
    out = {}
    for p in paths:
        linear = model.get_submodule(p)
        out[f"{p}.lora.lora_A"] = torch.randn(r, linear.in_features, generator=g) * 0.1
        out[f"{p}.lora.lora_B"] = torch.randn(linear.out_features, r, generator=g) * 0.1
    return out


PATHS = [f"bert.encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "value")]


def reference(delta_cls, paths, tensors, head_bias, layer_keys, **kwargs):
    """Outputs of opendelta's own delta holding the same numbers (the formulas are the same)."""
    model = bert_masked_lm()
    delta = delta_cls(model, modified_modules=paths, **kwargs)
    with torch.no_grad():
        for original_key, (path, key) in layer_keys.items():
            delta.layers[path].get_parameter(key).copy_(tensors[original_key])
        model.cls.predictions.bias.copy_(head_bias)
    return outputs(model, INPUTS)


def test_an_original_lora_checkpoint_loads_with_the_same_outputs(tmp_path):
    model = bert_masked_lm()
    tensors = lora_tensors(model, PATHS)
    head_bias = torch.linspace(-1, 1, 99)
    with torch.no_grad():
        model.cls.predictions.bias.copy_(head_bias)
    folder = original_folder(tmp_path, "lora", model, tensors, {"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                                                                 "modified_modules": ["query", "value"]})
    expected = reference(LoraModel, ["query", "value"], tensors, head_bias,
                         {f"{p}.lora.{k}": (p, k) for p in PATHS for k in ("lora_A", "lora_B")})
    fresh = bert_masked_lm()
    bare = outputs(fresh, INPUTS)
    delta = AutoDeltaModel.from_finetuned(str(folder), backbone_model=fresh)
    assert type(delta) is LoraModel and sorted(delta.layers) == sorted(PATHS)
    assert delta.config.backbone_class == "BertForMaskedLM" and delta.config.lora_r == 8
    assert all(torch.equal(a, b) for a, b in zip(outputs(fresh, INPUTS), expected))
    delta.detach()
    assert all(torch.equal(a, b) for a, b in zip(outputs(fresh, INPUTS), bare))


def test_an_original_adapter_checkpoint_loads_with_the_same_outputs(tmp_path):
    model = bert_masked_lm()
    paths = [f"bert.encoder.layer.{i}.attention.output.dense" for i in (0, 1)]
    g = torch.Generator().manual_seed(2)
    tensors = {}
    keys = {}
    for p in paths:
        for name, shape, ours in (("down_proj", (24, 32), "down"), ("up_proj", (32, 24), "up")):
            for part, size in (("weight", shape), ("bias", shape[:1])):
                key = f"{p}.adapter.modulelist.{name}.{part}"
                tensors[key] = torch.randn(*size, generator=g) * 0.1
                keys[key] = (p, f"{ours}.{part}")
    folder = original_folder(tmp_path, "adapter", model, tensors, {"bottleneck_dim": 24, "non_linearity": "gelu_new",
                                                                    "modified_modules": ["attention.output.dense"]})
    expected = reference(AdapterModel, ["attention.output.dense"], tensors, model.cls.predictions.bias.detach(), keys)
    fresh = bert_masked_lm()
    AutoDeltaModel.from_finetuned(folder, backbone_model=fresh)
    assert all(torch.equal(a, b) for a, b in zip(outputs(fresh, INPUTS), expected))


def test_opendelta_convert_rewrites_an_original_folder_as_safetensors(tmp_path, capsys):
    model = bert_masked_lm()
    tensors = lora_tensors(model, PATHS)
    folder = original_folder(tmp_path, "lora", model, tensors, {"lora_r": 8, "lora_alpha": 16, "modified_modules": ["query", "value"]})
    loaded = bert_masked_lm()
    AutoDeltaModel.from_finetuned(folder, backbone_model=loaded)
    assert opendelta_cli(["convert", str(folder), str(tmp_path / "converted")]) == 0
    written = sorted(os.listdir(tmp_path / "converted"))
    assert "delta_config.json" in written and any(f.endswith(".safetensors") for f in written)
    assert not any(f.endswith(".bin") for f in written)
    converted = bert_masked_lm()
    AutoDeltaModel.from_finetuned(tmp_path / "converted", backbone_model=converted)
    assert all(torch.equal(a, b) for a, b in zip(outputs(converted, INPUTS), outputs(loaded, INPUTS)))


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['COMPAT_MARKER']}",))


def test_a_pickle_holding_code_is_refused_and_never_run(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("COMPAT_MARKER", str(marker))
    model = bert_masked_lm()
    folder = original_folder(tmp_path, "lora", model, lora_tensors(model, PATHS), {"modified_modules": ["query"]})
    torch.save({"bert.encoder.layer.0.attention.self.query.lora.lora_A": Payload()}, folder / "pytorch_model.bin")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CorruptCheckpointError, match="does not unpickle"):
        AutoDeltaModel.from_finetuned(folder, backbone_model=model)
    assert not marker.exists()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_method_the_original_did_not_have_is_a_typed_error(tmp_path):
    model = bert_masked_lm()
    folder = original_folder(tmp_path, "ia3", model, {"bert.encoder.layer.0.output.dense.ia3.x": torch.ones(2)}, {})
    with pytest.raises(IncompatibleCheckpointError, match="ia3"):
        AutoDeltaModel.from_finetuned(folder, backbone_model=bert_masked_lm())
