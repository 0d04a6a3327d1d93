"""The structure tree shows a quantized layer as the linear layer it computes: its (out, in) weight
shape, the quantized format and the bytes it stores against the dense float32 bytes."""

from __future__ import annotations

import pytest
from support.quantized import load_kind, save_tiny_llama
from torch import nn

from bigmodelvis import Visualization, format_count


def _bnb_4bit(layer: nn.Module) -> tuple[str, int]:
    state = layer.weight.quant_state  # codes, one absmax per block and the 16-value NF4 code book
    assert not state.nested
    return state.quant_type, layer.weight.data.nbytes + state.absmax.nbytes + state.code.nbytes


def _bnb_8bit(layer: nn.Module) -> tuple[str, int]:
    scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB  # one per output row
    return "int8", layer.weight.data.nbytes + scales.nbytes


def _torchao_int8(layer: nn.Module) -> tuple[str, int]:
    weight = layer.weight
    return "int8", weight.qdata.nbytes + weight.scale.nbytes + weight.zero_point.nbytes


def _torchao_nf4(layer: nn.Module) -> tuple[str, int]:
    w = layer.weight
    parts = (w.quantized_data, w.quantized_scalers, w.quantization_factor, w.scaler_mean, w.nf4)
    return "nf4", sum(part.nbytes for part in parts)


def _hqq_4bit(layer: nn.Module) -> tuple[str, int]:
    return "hqq-4bit", layer.W_q.nbytes + layer.meta["scale"].nbytes + layer.meta["zero"].nbytes


#: kind -> the format and stored bytes of a layer, read from that library's own fields
EXPECTED = {
    "bnb_4bit": _bnb_4bit, "bnb_8bit": _bnb_8bit, "torchao_int8": _torchao_int8, "torchao_nf4": _torchao_nf4,
    "hqq_4bit": _hqq_4bit,
}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _node(tree: dict, path: str) -> dict:
    """The node of `to_dict()`'s tree that stands for the module at `path`."""
    nodes = [tree]
    while path not in nodes[0]["paths"]:
        nodes = nodes[1:] + nodes[0]["children"]
    return nodes[0]


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_a_quantized_layer_shows_as_a_linear_layer_with_its_format_and_packed_bytes(saved_model, kind):
    model = load_kind(saved_model, kind)
    layer = model.get_submodule("model.layers.0.mlp.up_proj")  # (128, 64): out and in differ
    quantized_format, packed_bytes = EXPECTED[kind](layer)
    name = "W_q" if kind == "hqq_4bit" else "weight"
    visualization = Visualization(model)
    text = visualization.export_text()
    line = next(line for line in text.splitlines() if "up_proj" in line)
    dense = f"float32 {format_count(128 * 64 * 4)}B"
    assert f"{name}:[128,64] {quantized_format} ({format_count(packed_bytes)}B packed, {dense})" in line
    assert f"({type(layer).__name__})" in line
    [param] = _node(visualization.to_dict(), "model.layers.0.mlp.up_proj")["params"]
    assert (param["quantized"], param["packed_bytes"], param["shape"], param["numel"]) == (
        quantized_format, packed_bytes, [128, 64], 128 * 64,
    )
    # every linear layer counts as its out x in weights, so the model totals what the unquantized one does
    from transformers import LlamaForCausalLM

    dense_model = LlamaForCausalLM.from_pretrained(saved_model)
    assert visualization.to_dict()["numel"] == sum(p.numel() for p in dense_model.parameters())
