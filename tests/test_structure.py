"""Common structure: role names resolve to the right modules in every mapped family."""

from __future__ import annotations

import pytest
from family_zoo import BY_NAME

from opendelta.errors import StructureError
from opendelta.structure import ROLES, resolve_roles, role_map

_MODELS: dict = {}


def tiny(name: str):
    if name not in _MODELS:
        _MODELS[name] = BY_NAME[name].build()
    return _MODELS[name]


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
