"""A tiny LLaMA saved once and loaded through transformers' BitsAndBytesConfig (4-bit NF4 or 8-bit), on CPU."""

from __future__ import annotations

import torch
from support.numerics import perturbed_delta
from torch import nn

IDS = torch.tensor([[5, 17, 42, 8, 63, 2], [9, 3, 77, 1, 30, 4]])


def save_tiny_llama(path) -> str:
    """Write a hidden-64, 2-layer LLaMA (weights fixed by seed 0) to `path`; returns it as a string."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def load_quantized(
    path: str, bits: int, compute_dtype: torch.dtype = torch.float32, quant_type: str = "nf4"
) -> nn.Module:
    """The model at `path` in 4-bit (`quant_type` NF4 or FP4, computing in `compute_dtype`) or 8-bit, on CPU,
    in eval mode, guarded against bitsandbytes' AVX512-BF16 repack as a user who runs it before attaching must."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from opendelta.quantized import guard_cpu_repack

    config = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=compute_dtype)
        if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu").eval()
    # the tests take the bare model's eval outputs before a delta comes; on a CPU with AVX512-BF16 that forward
    # would repack the 4-bit weights (bf16-rounded block scales, a different kernel), and attaching then refuses
    # (docs/quantization.md). On other CPUs this changes nothing
    guard_cpu_repack(model)
    return model


def replace_linears(model: nn.Module, make) -> nn.Module:
    """The model with every nn.Linear but the LM head replaced by make(linear)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, make(module))
    return model.eval()


def _torchao_int8(path: str) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    config = TorchAoConfig(Int8WeightOnlyConfig())
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu").eval()


def _torchao_nf4(path: str) -> nn.Module:
    from torchao.quantization import to_nf4
    from transformers import LlamaForCausalLM

    def nf4(linear: nn.Linear) -> nn.Linear:
        linear.weight = nn.Parameter(to_nf4(linear.weight.data, 32, 16), requires_grad=False)
        return linear

    return replace_linears(LlamaForCausalLM.from_pretrained(path), nf4)


def _hqq_4bit(path: str) -> nn.Module:
    import hqq.core.quantize as hqq
    from transformers import LlamaForCausalLM

    config = hqq.BaseQuantizeConfig(nbits=4, group_size=16)
    return replace_linears(
        LlamaForCausalLM.from_pretrained(path),
        lambda linear: hqq.HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu"),
    )


#: kind -> (the library it needs, how to load the saved tiny LLaMA quantized that way)
KINDS = {
    "bnb_4bit": ("bitsandbytes", lambda path: load_quantized(path, 4)),
    "bnb_8bit": ("bitsandbytes", lambda path: load_quantized(path, 8)),
    "torchao_int8": ("torchao", _torchao_int8),  # through transformers' TorchAoConfig
    "torchao_nf4": ("torchao", _torchao_nf4),
    "hqq_4bit": ("hqq", _hqq_4bit),  # by direct replacement (HqqConfig does not work on CPU in transformers 5.24)
}


def load_kind(path: str, kind: str) -> nn.Module:
    """The tiny LLaMA at `path` quantized as `kind` (a KINDS key), in eval mode; skips the test
    when the library is not installed."""
    import pytest

    library, load = KINDS[kind]
    pytest.importorskip(library)
    return load(path)


def packed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the model holds, the quantized codes and statistics included (a torchao tensor
    by its parts), cloned."""
    out = {}
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        parts = getattr(value, "tensor_data_names", None) or ()
        if hasattr(value, "quantized_data"):  # torchao NF4
            parts = ("quantized_data", "quantized_scalers", "quantization_factor")
        for part in parts:
            out[f"{name}.{part}"] = getattr(value, part).detach().clone()
        if not parts:
            out[name] = value.detach().clone()
    return out


def assert_same_packed_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = packed_state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def dense_copy(model: nn.Module, base: nn.Module) -> nn.Module:
    """`base` (the same architecture, unquantized) with each layer that is quantized in `model`
    replaced by an nn.Linear holding its dequantized weight (and bias)."""
    from opendelta.quantized import dequantized_weight, is_quantized

    for name, module in list(model.named_modules()):
        if is_quantized(module):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(dequantized_weight(module))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(base.get_submodule(parent), leaf, linear)
    return base.eval()


def perturb(delta, size: float) -> None:
    """Move every delta tensor by `size` times noise of a fixed seed (a fresh delta changes nothing)."""
    perturbed_delta(delta, seed=2, size=size)


def perturbed(model: nn.Module, config: dict, size: float):
    """A delta from `config` on `model`, backbone frozen, perturbed by `size` (:func:`perturb`); the same
    seeds on every model, so a quantized model and its dense copy get the same delta."""
    from opendelta import AutoDeltaModel

    torch.manual_seed(1)
    delta = AutoDeltaModel.from_config(config, backbone_model=model)
    delta.freeze_module(exclude=["deltas"], set_state_dict=False)
    perturb(delta, size)
    return delta
