"""AutoDelta: configs from dicts, default positions from the common structure, checkpoints, registration."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from support.families import fresh
from torch import nn

from opendelta import AutoDeltaConfig, AutoDeltaModel, DeltaBase, DeltaConfig, DeltaLayer, LoraConfig, LoraModel
from opendelta.errors import DeltaConfigError, UnknownDeltaTypeError
from opendelta.registry import unregister
from opendelta.runtime_init import synthesize_inputs


def test_from_dict_builds_the_methods_config_with_defaults_filled_in():
    config = AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": 4})
    assert isinstance(config, LoraConfig)
    assert (config.lora_r, config.lora_alpha, config.modified_modules) == (4, 16, None)


def test_from_dict_rejects_an_unknown_key_and_suggests_the_close_one():
    with pytest.raises(DeltaConfigError, match=r"no argument 'lora_rr'.*'lora_r'"):
        AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_rr": 4})


def test_from_dict_needs_a_delta_type():
    with pytest.raises(DeltaConfigError, match="delta_type"):
        AutoDeltaConfig.from_dict({"lora_r": 4})


def test_an_unknown_delta_type_names_the_known_ones_and_how_to_register():
    with pytest.raises(UnknownDeltaTypeError, match=r"'lorra'.*'lora'.*AutoDeltaModel\.register"):
        AutoDeltaConfig.from_dict({"delta_type": "lorra"})


def test_from_config_places_the_method_at_its_default_positions():
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict({"delta_type": "lora"}), backbone_model=fresh("LLaMA"))
    assert isinstance(delta, LoraModel)
    assert list(delta.layers) == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]


def test_from_config_honours_named_modules_over_the_defaults():
    config = AutoDeltaConfig.from_dict({"delta_type": "lora", "modified_modules": ["o_proj"]})
    delta = AutoDeltaModel.from_config(config, backbone_model=fresh("LLaMA"))
    assert list(delta.layers) == [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]


def test_from_finetuned_restores_type_arguments_and_outputs_into_a_fresh_backbone(tmp_path):
    model = fresh("GPT-2")
    delta = AutoDeltaModel.from_config({"delta_type": "lora", "lora_r": 3}, backbone_model=model)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.normal_(0, 0.1)
        inputs = synthesize_inputs(model)
        tuned = model(**inputs).logits
    delta.save_finetuned(tmp_path)
    config = AutoDeltaConfig.from_finetuned(tmp_path)
    assert (type(config), config.lora_r) == (LoraConfig, 3)
    other = fresh("GPT-2")
    loaded = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=other)
    assert isinstance(loaded, LoraModel) and list(loaded.layers) == list(delta.layers)
    with torch.no_grad():
        assert torch.equal(other(**inputs).logits, tuned)


# ----------------------------------------------------------------------------- a user's own method


@dataclass
class ScaleConfig(DeltaConfig):
    init: float = 0.0


class ScaleLayer(DeltaLayer):
    """h_out <- h_out + h_out * s (per feature)."""

    route = "after"

    def __init__(self, features: int, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((features,), init))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.scale


class ScaleModel(DeltaBase):
    default_modified_modules = ("attn.o",)

    def new_layer(self, path, module, observation):
        return ScaleLayer(module.out_features, self.config.init)


@pytest.fixture
def scale_registered():
    AutoDeltaModel.register("scale", ScaleConfig, ScaleModel)
    yield
    unregister("scale")


def test_a_registered_user_method_gets_defaults_and_checkpoints(scale_registered, tmp_path):
    model = fresh("LLaMA")
    delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict({"delta_type": "scale", "init": 0.5}), model)
    assert list(delta.layers) == [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]
    inputs = synthesize_inputs(model)
    with torch.no_grad():
        tuned = model(**inputs).logits
    delta.save_finetuned(tmp_path)
    other = fresh("LLaMA")
    loaded = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=other)
    assert isinstance(loaded, ScaleModel) and loaded.config.init == 0.5
    with torch.no_grad():
        assert torch.equal(other(**inputs).logits, tuned)
