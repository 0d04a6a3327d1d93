"""Common structure: role names resolve to the right modules in every mapped family."""

from __future__ import annotations

import pytest
import torch
from support.families import fresh
from torch import nn

from opendelta import LoraModel
from opendelta import structure
from opendelta.errors import StructureError
from opendelta.structure import ROLES, find_backbones, resolve_roles, role_map

_MODELS: dict[str, nn.Module] = {}


def tiny(name: str) -> nn.Module:
    """The family's tiny model, shared by the tests that only read its structure."""
    if name not in _MODELS:
        _MODELS[name] = fresh(name)
    return _MODELS[name]


def tiny_copy(name: str) -> nn.Module:
    """A private copy, for tests that attach deltas."""
    return fresh(name)


QV = {
    "BERT": ["encoder.layer.{i}.attention.self.query", "encoder.layer.{i}.attention.self.value"],
    "RoBERTa": ["roberta.encoder.layer.{i}.attention.self.query", "roberta.encoder.layer.{i}.attention.self.value"],
    "GPT-2": ["transformer.h.{i}.attn.c_attn"],
    "OPT": ["model.decoder.layers.{i}.self_attn.v_proj", "model.decoder.layers.{i}.self_attn.q_proj"],
    "LLaMA": ["model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.v_proj"],
    "ViT": ["vit.layers.{i}.attention.q_proj", "vit.layers.{i}.attention.v_proj"],
}


@pytest.mark.parametrize("name", sorted(QV))
def test_query_and_value_roles_resolve_to_each_layers_projections(name):
    expected = [p.format(i=i) for i in range(2) for p in QV[name]]
    assert resolve_roles(tiny(name), ["attn.q", "attn.v"]) == expected


def test_self_attention_roles_skip_cross_attention_in_encoder_decoders():
    paths = resolve_roles(tiny("T5"), ["attn.q"])
    assert paths == [f"{s}.block.{i}.layer.0.SelfAttention.q" for s in ("encoder", "decoder") for i in range(2)]


def test_cross_attention_roles_address_only_the_decoder_cross_attention():
    assert resolve_roles(tiny("BART"), ["xattn.q", "xattn.v"]) == [
        f"model.decoder.layers.{i}.encoder_attn.{p}" for i in range(2) for p in ("v_proj", "q_proj")
    ]


def test_stack_qualifier_restricts_a_role_to_that_stack():
    assert resolve_roles(tiny("T5"), ["decoder.attn.v"]) == [f"decoder.block.{i}.layer.0.SelfAttention.v" for i in range(2)]


def test_a_role_the_family_lacks_is_a_structure_error_naming_it():
    with pytest.raises(StructureError, match=r"'ffn'.*does not exist in this bert model"):
        resolve_roles(tiny("BERT"), ["ffn"])


def test_non_strict_resolution_skips_roles_the_family_lacks():
    assert resolve_roles(tiny("BERT"), ["ffn", "ffn.up"], strict=False) == [
        f"encoder.layer.{i}.intermediate.dense" for i in range(2)
    ]


def test_a_misspelled_role_is_an_error_with_the_close_spelling():
    with pytest.raises(StructureError, match=r"'attn\.q'"):
        resolve_roles(tiny("BERT"), ["atn.q"])


def test_role_map_names_a_fused_projection_by_its_fused_role():
    roles = role_map(tiny("GPT-2"))
    assert roles["transformer.h.0.attn.c_attn"] == "attn.qkv"
    assert roles["transformer.ln_f"] == "norm.final"
    assert set(roles.values()) <= set(ROLES)


# ----------------------------------------------------------------------------- wrapped models


class TwoBackbones(nn.Module):
    """A user's module holding two transformers backbones of different families."""

    def __init__(self) -> None:
        super().__init__()
        self.text = tiny("BERT")
        self.generator = tiny("GPT-2")


def test_a_users_module_holding_two_backbones_resolves_each_with_its_own_table():
    paths = resolve_roles(TwoBackbones(), ["attn.q"])
    assert paths == [f"text.encoder.layer.{i}.attention.self.query" for i in range(2)] + [
        f"generator.transformer.h.{i}.attn.c_attn" for i in range(2)
    ]


def test_a_classification_head_wrapper_resolves_through_its_backbone():
    assert resolve_roles(tiny("XLM-RoBERTa"), ["attn.v"]) == [
        f"roberta.encoder.layer.{i}.attention.self.value" for i in range(2)
    ]


def test_clip_towers_are_text_and_vision_stacks():
    assert resolve_roles(tiny("CLIP"), ["vision.attn.q"]) == [
        f"vision_model.encoder.layers.{i}.self_attn.q_proj" for i in range(2)
    ]


def test_a_stack_qualifier_on_a_model_without_that_stack_is_an_error():
    with pytest.raises(StructureError, match=r"no decoder stack"):
        resolve_roles(tiny("LLaMA"), ["decoder.attn.q"])


# ----------------------------------------------------------------------------- inference


@pytest.mark.parametrize("name", ["BERT", "GPT-2", "T5", "LLaMA", "Phi-3"])
def test_inference_without_a_table_finds_the_tables_attention_and_ffn_projections(name, monkeypatch):
    model = tiny(name)
    roles = ["attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down"]
    from_table = [resolve_roles(model, [r]) for r in roles]
    monkeypatch.setattr(structure, "FAMILIES", {})
    assert [b.source for b in find_backbones(model)] == ["inferred"]
    assert [resolve_roles(model, [r]) for r in roles] == from_table


def test_inference_reports_what_it_found(monkeypatch):
    monkeypatch.setattr(structure, "FAMILIES", {})
    (backbone,) = find_backbones(tiny("LLaMA"))
    assert "layer stack 'model.layers': 2 x LlamaDecoderLayer" in backbone.notes
    assert "  attn.q: self_attn.q_proj" in backbone.notes


def test_inference_finds_ffn_projections_by_shape_when_names_say_nothing(monkeypatch):
    monkeypatch.setattr(structure, "FAMILIES", {})
    (backbone,) = find_backbones(tiny("ALBERT"))
    assert backbone.role_paths("ffn.up") == ["encoder.albert_layer_groups.0.albert_layers.0.ffn"]
    assert any("found by shape" in note for note in backbone.notes)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(8, 8) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.out(torch.softmax(self.query(x) @ self.key(x).transpose(-1, -2), -1) @ self.value(x))
        return h + self.fc2(torch.relu(self.fc1(h)))


class UserTransformer(nn.Module):
    """A user's own transformer: no config, no transformers."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_lora_defaults_work_on_a_users_own_transformer_by_inference():
    model = UserTransformer()
    assert LoraModel.plan(model) == [f"blocks.{i}.{p}" for i in range(3) for p in ("query", "value")]
    assert resolve_roles(model, ["attn.o", "ffn.down"]) == [f"blocks.{i}.{p}" for i in range(3) for p in ("out", "fc2")]


def test_a_model_with_no_layer_stack_is_a_structure_error_saying_what_to_do():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(StructureError, match=r"no repeated layer stack.*modified_modules=\["):
        LoraModel(model)


def test_a_role_inference_cannot_find_names_the_role_and_the_way_out():
    with pytest.raises(StructureError, match=r"'ffn.gate'.*structural inference found no such module.*name the modules"):
        resolve_roles(UserTransformer(), ["ffn.gate"])


# ----------------------------------------------------------------------------- common_structure=True


def test_common_structure_names_work_as_modified_modules_on_any_family():
    for name in ("BERT", "LLaMA"):
        delta = LoraModel(tiny_copy(name), modified_modules=["attn.q", "attn.v"], common_structure=True)
        assert list(delta.layers) == LoraModel.plan(tiny(name))


def test_common_structure_with_a_stack_qualifier_addresses_one_stack():
    delta = LoraModel(tiny_copy("BART"), modified_modules=["decoder.attn.q", "xattn.v"], common_structure=True)
    assert set(delta.layers) == {
        f"model.decoder.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "encoder_attn.v_proj")
    }
