"""Merging into a quantized weight, on a tiny LLaMA on CPU quantized by bitsandbytes (4-bit NF4 and
8-bit, through BitsAndBytesConfig), torchao (int8 weight-only through TorchAoConfig, NF4) and hqq
(4-bit, by direct replacement): the merge dequantizes, adds the delta and re-quantizes with the
layer's own quantizer; unmerge and detach put the original packed bytes back.

The merged weight cannot be exact: it lands on the quantization grid again. Its error is measured
against the quantization noise floor, the error the bare backbone already has against the dense
weights it was quantized from."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
import support.quantized as quantized_support
from support.quantized import IDS, KINDS, assert_same_packed_state, dense_copy, load_kind, packed_state, save_tiny_llama
from torch import nn
from transformers import LlamaForCausalLM

from opendelta.quantized import dequantized_weight, is_quantized

#: weight-started LoRA, one start per kind: merging one folds in s (B A - B0 A0), the change since its start
STARTS = dict(zip(KINDS, ["pissa", "olora", "pissa_niter_2", "olora", "pissa"]))
#: (kind, delta config) merged: LoRA, plain and weight-started, on every kind; IA3 (rows rescaled: one NF4 block
#: per row here) on bitsandbytes
CASES = [
    *((kind, {"delta_type": "lora"}) for kind in KINDS),
    *((kind, {"delta_type": "lora", "init_lora_weights": init}) for kind, init in STARTS.items()),
    ("bnb_4bit", {"delta_type": "ia3"}), ("bnb_8bit", {"delta_type": "ia3"}),
]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def perturbed(model: nn.Module, config: dict):
    """A delta whose merge changes the weights by about 0.4 of their norm (LoRA) or 5% (IA3): a fresh
    one changes nothing."""
    return quantized_support.perturbed(model, config, 0.02)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(("kind", "config"), CASES, ids=["-".join([kind, *map(str, c.values())]) for kind, c in CASES])
def test_merge_requantizes_within_the_noise_floor_and_unmerge_or_detach_restore_the_packed_bytes(
    saved_model, kind, config
):
    model = load_kind(saved_model, kind)
    original = LlamaForCausalLM.from_pretrained(saved_model).eval()  # the dense weights the backbone was quantized from
    dense = dense_copy(model, LlamaForCausalLM.from_pretrained(saved_model))
    names = [name for name, module in model.named_modules() if is_quantized(module)]
    before = packed_state(model)
    bare = logits(model)
    floor_logits = (logits(original) - bare).norm()
    # the noise floor: each quantized weight's relative error against the dense weight, and its spread over layers
    floors = [relative(dense.get_submodule(n).weight, original.get_submodule(n).weight) for n in names]
    spread = max(floors) / min(floors)
    unquantized = {n: dense.get_submodule(n).weight.detach().clone() for n in names}

    deltas = [perturbed(m, config) for m in (model, dense)]
    attached = packed_state(model)  # the backbone's bytes and the delta's
    unmerged = logits(model)
    for delta in deltas:
        delta.merge()  # the dense copy's merge is exact (fp32): the weights the quantized merge aims at
    merged = logits(model)
    growth, merged_sites = 1.0, 0
    for n in names:
        target = dense.get_submodule(n).weight.detach()
        if torch.equal(target, unquantized[n]):
            continue  # no delta here
        merged_sites += 1
        # re-quantizing is a fresh quantization of the target: its relative error is one more draw of the floor's
        assert relative(dequantized_weight(model.get_submodule(n)), target) <= max(floors) * spread
        growth = max(growth, (target.norm() / unquantized[n].norm()).item())
    assert merged_sites > 0
    # the logits move by the merged layers' errors, each at most the floor's (scaled with the weight's size)
    assert 0 < (merged - unmerged).norm() <= spread * growth * floor_logits

    deltas[0].unmerge()
    assert_same_packed_state(model, attached)
    assert torch.equal(logits(model), unmerged)
    deltas[0].merge()
    deltas[0].detach()  # straight from merged
    assert_same_packed_state(model, before)
    assert torch.equal(logits(model), bare)


def test_merging_into_a_torchao_weight_it_cannot_requantize_is_a_typed_error_that_changes_nothing():
    quantization = pytest.importorskip("torchao.quantization")
    from support.families import fresh

    from opendelta.errors import MergeError

    model = fresh("llama").eval()
    quantization.quantize_(model.model, quantization.IntxWeightOnlyConfig(weight_dtype=torch.int8))
    delta = perturbed(model, {"delta_type": "lora"})
    before = packed_state(model)
    tuned = logits(model)
    with pytest.raises(MergeError, match="IntxUnpackedToInt8Tensor"):
        delta.merge()
    assert not delta.is_merged
    assert_same_packed_state(model, before)
    assert torch.equal(logits(model), tuned)


@pytest.mark.parametrize("kind", ["bnb_8bit", "hqq_4bit"])
def test_export_merged_of_a_quantized_backbone_writes_the_requantized_weights_and_leaves_the_packed_bytes(
    saved_model, kind, tmp_path
):
    # a quantized weight's merged value is what its backend re-quantizes: export_merged merges in place there
    model = load_kind(saved_model, kind)
    delta = perturbed(model, {"delta_type": "lora"})
    before = packed_state(model)
    delta.merge()
    model.save_pretrained(tmp_path / "merged-in-place")
    delta.unmerge()

    delta.export_merged(tmp_path / "out")

    assert_same_packed_state(model, before)
    assert delta.is_attached and not delta.is_merged
    written = load_file(tmp_path / "out/model.safetensors")
    reference = load_file(tmp_path / "merged-in-place/model.safetensors")
    assert list(written) == list(reference) and all(torch.equal(written[k], v) for k, v in reference.items())
