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
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from opendelta.quantized import dequantized_weight, guard_cpu_repack, is_quantized

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


def _torchao_by_hand(path: str, config: str, **kwargs) -> nn.Module:
    """The saved tiny LLaMA quantized by torchao's ``quantize_`` with `config` (no TorchAoConfig: its
    config.json has no quantization_config)."""
    quantization = pytest.importorskip("torchao.quantization")
    model = LlamaForCausalLM.from_pretrained(path)
    quantization.quantize_(model.model, getattr(quantization, config)(**kwargs))
    return model.eval()


#: quantized by a transformers quantizer (config.json's quantization_config): the export keeps them quantized
RELOADED_QUANTIZED = ["bnb_4bit", "bnb_8bit", "torchao_int8"]
#: quantized by hand: no config entry rebuilds the layers, so the export writes them dense
BY_HAND = {
    "torchao_nf4": lambda path: load_kind(path, "torchao_nf4"),
    "hqq_4bit": lambda path: load_kind(path, "hqq_4bit"),
    "torchao_int8_by_hand": lambda path: _torchao_by_hand(path, "Int8WeightOnlyConfig"),
    # a torchao tensor opendelta cannot re-quantize (merge() refuses it) still exports: dense needs no re-quantizing
    "torchao_intx_by_hand": lambda path: _torchao_by_hand(path, "IntxWeightOnlyConfig", weight_dtype=torch.int8),
}


@pytest.mark.parametrize("kind", RELOADED_QUANTIZED)
def test_export_merged_of_a_transformers_quantized_backbone_reloads_as_the_merged_model_and_leaves_the_packed_bytes(
    saved_model, kind, tmp_path
):
    # the folder keeps the quantizer's format, its weights as merge() re-quantizes them: export_merged merges in
    # place there, and from_pretrained re-quantizes nothing (it loads the packed merged weights)
    model = load_kind(saved_model, kind)
    delta = perturbed(model, {"delta_type": "lora"})
    before = packed_state(model)
    tuned = logits(model)
    delta.merge()
    merged = logits(model)
    model.save_pretrained(tmp_path / "merged-in-place")
    delta.unmerge()

    delta.export_merged(tmp_path / "out")

    assert_same_packed_state(model, before)
    assert delta.is_attached and not delta.is_merged
    assert torch.equal(logits(model), tuned)
    written = load_file(tmp_path / "out/model.safetensors")
    reference = load_file(tmp_path / "merged-in-place/model.safetensors")
    assert list(written) == list(reference) and all(torch.equal(written[k], v) for k, v in reference.items())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu").eval()
    # the same kernel as the merged model's forward: on a CPU with AVX512-BF16, bitsandbytes would otherwise run
    # the reloaded 4-bit layers through its repacking inference kernel, which rounds block scales to bf16
    guard_cpu_repack(reloaded)
    assert torch.equal(logits(reloaded), merged)


def test_export_merged_that_would_need_a_requantizer_opendelta_lacks_is_a_typed_error_that_changes_nothing(
    saved_model, tmp_path
):
    pytest.importorskip("torchao")
    from torchao.quantization import IntxWeightOnlyConfig
    from transformers import TorchAoConfig

    from opendelta.errors import MergeError

    config = TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int8))
    model = AutoModelForCausalLM.from_pretrained(saved_model, quantization_config=config, device_map="cpu").eval()
    delta = perturbed(model, {"delta_type": "lora"})
    before = packed_state(model)
    tuned = logits(model)
    with pytest.raises(MergeError, match="IntxUnpackedToInt8Tensor"):
        delta.export_merged(tmp_path / "out")
    assert delta.is_attached and not delta.is_merged
    assert_same_packed_state(model, before)
    assert torch.equal(logits(model), tuned)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("kind", sorted(BY_HAND))
def test_export_merged_of_a_backbone_quantized_by_hand_writes_the_dense_merged_weights(saved_model, kind, tmp_path):
    # torchao's NF4 tensors used to fail here inside save_pretrained ("invalid python storage": a wrapper tensor
    # has no storage), and hqq's packed entries loaded as a randomly initialized model
    model = BY_HAND[kind](saved_model)
    original = LlamaForCausalLM.from_pretrained(saved_model).eval()
    dense = dense_copy(model, LlamaForCausalLM.from_pretrained(saved_model))
    # the quantization noise floor: what the bare backbone's quantization moves the logits by
    floor = (logits(original) - logits(model)).norm()
    deltas = [perturbed(m, {"delta_type": "lora"}) for m in (model, dense)]
    before = packed_state(model)
    tuned, dense_tuned = logits(model), logits(dense)

    deltas[0].export_merged(tmp_path / "out")
    deltas[1].export_merged(tmp_path / "dense")

    assert_same_packed_state(model, before)
    assert deltas[0].is_attached and not deltas[0].is_merged
    assert torch.equal(logits(model), tuned)
    # the folder is the dense copy's merged model (dequantized weight + the delta's change, not re-quantized)
    written, reference = load_file(tmp_path / "out/model.safetensors"), load_file(tmp_path / "dense/model.safetensors")
    assert written.keys() == reference.keys() and all(torch.equal(written[k], v) for k, v in reference.items())
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values())  # nothing missing (randomly initialized) nor left over
    got = logits(reloaded.eval())
    deltas[1].merge()
    assert torch.equal(got, logits(dense))
    # so it differs from the delta model by float rounding only, measured on the same weights: merging's own
    # (the dense copy merged vs unmerged) and the quantized kernel's (the delta model vs its dense copy); that
    # is inside the noise floor, where a re-quantized merge moves the logits by about the floor itself
    rounding = (got - dense_tuned).norm() + (dense_tuned - tuned).norm()
    assert 0 < (got - tuned).norm() <= rounding < floor


def test_export_merged_of_a_plain_module_with_nf4_layers_is_a_dense_state_dict(tmp_path):
    quantization = pytest.importorskip("torchao.quantization")
    from opendelta import LoraModel

    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))

    model, dense = mlp(), mlp()
    for index in (0, 2):
        weight = quantization.to_nf4(model[index].weight.data, 32, 16)
        model[index].weight = nn.Parameter(weight, requires_grad=False)
        with torch.no_grad():
            dense[index].weight.copy_(weight.get_original_weight())
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    deltas = []
    for m in (model, dense):
        torch.manual_seed(1)  # the same LoRA initialization on both
        delta = LoraModel(m, modified_modules=["0", "2"], lora_r=2, dummy_inputs=x)
        quantized_support.perturb(delta, 0.05)
        deltas.append(delta)
    before = packed_state(model)

    path = deltas[0].export_merged(tmp_path)

    assert_same_packed_state(model, before)
    fresh = mlp()
    fresh.load_state_dict(load_file(f"{path}/model.safetensors"))  # strict: every key, dense
    deltas[1].merge()
    with torch.no_grad():
        assert torch.equal(fresh(x), dense(x))
