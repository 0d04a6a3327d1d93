"""Quantized linear layers seen as the linear maps they compute: bitsandbytes 4-bit and 8-bit,
torchao weights (an ``nn.Linear`` whose weight is a torchao tensor: int8 weight-only, NF4...) and
hqq's ``HQQLinear`` (not an ``nn.Linear``; it has no ``.weight``).

Deltas act on a quantized layer as on an ``nn.Linear``: they take the layer's compute dtype (not
the packed storage dtype), a merge reads the dequantized weight, and writing a merged weight
re-quantizes it (bitsandbytes 4-bit only) while the packed bytes before are kept, so unmerge and
detach put them back bit for bit. Nothing here imports a quantization library unless the model
already holds its layers.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from opendelta.errors import MergeError, UnsupportedModuleError


def _bnb_class(name: str) -> type | None:
    modules = sys.modules.get("bitsandbytes.nn.modules")  # loaded iff the model can hold such layers
    return getattr(modules, name, None) if modules is not None else None


def is_4bit(module: nn.Module) -> bool:
    cls = _bnb_class("Linear4bit")
    return cls is not None and isinstance(module, cls)


def is_8bit(module: nn.Module) -> bool:
    cls = _bnb_class("Linear8bitLt")
    return cls is not None and isinstance(module, cls)


def is_torchao(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose weight torchao quantized (a ``TorchAOBaseTensor``: int8 weight-only, NF4...)."""
    utils = sys.modules.get("torchao.utils")
    base = getattr(utils, "TorchAOBaseTensor", None) if utils is not None else None
    nf4 = getattr(sys.modules.get("torchao.quantization.quantize_.workflows.nf4.nf4_tensor"), "NF4Tensor", None)
    weight = getattr(module, "weight", None)
    return any(cls is not None and isinstance(weight, cls) for cls in (base, nf4))


def is_hqq(module: nn.Module) -> bool:
    modules = sys.modules.get("hqq.core.quantize")
    cls = getattr(modules, "HQQLinear", None) if modules is not None else None
    return cls is not None and isinstance(module, cls)


def is_quantized(module: nn.Module) -> bool:
    return is_4bit(module) or is_8bit(module) or is_torchao(module) or is_hqq(module)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype a quantized layer computes in: the deltas beside it take it."""
    if (is_4bit(module) or is_hqq(module)) and module.compute_dtype is not None:
        return module.compute_dtype
    if is_torchao(module):
        return module.weight.dtype  # a torchao tensor reports the dtype it dequantizes to
    bias = getattr(module, "bias", None)
    return bias.dtype if isinstance(bias, torch.Tensor) and bias.is_floating_point() else torch.float32


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight a quantized layer multiplies by, in its compute dtype."""
    if is_hqq(module):
        return module.dequantize().to(compute_dtype(module))
    if is_torchao(module):
        weight = module.weight
        dense = weight.get_original_weight() if hasattr(weight, "get_original_weight") else weight.dequantize()  # NF4
        return dense.to(compute_dtype(module))
    import bitsandbytes.functional as F

    weight = module.weight
    if is_4bit(module):
        return F.dequantize_4bit(weight.data, weight.quant_state).to(compute_dtype(module))
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return F.int8_vectorwise_dequant(weight.data, scales).to(compute_dtype(module))


def weight_stamp(module: nn.Module) -> tuple:
    """What changes whenever a quantized layer's weight does (its packed tensor, the tensor's version
    and storage, and the quantization state beside it): a value computed from the dequantized weight
    is kept while the stamp is the same."""
    packed = module.W_q if is_hqq(module) else module.weight
    state = getattr(packed, "quant_state", None) or getattr(module, "meta", None)
    try:
        where = packed.data_ptr()
    except RuntimeError:  # a wrapper tensor (torchao) has no storage of its own: its identity and version stand in
        where = None
    return (id(packed), packed._version, where, id(state), packed.device)


def _repacked(module: nn.Module) -> bool:
    return bool(getattr(module.weight.quant_state, "packing_format_for_cpu", False))


def guard_cpu_repack(backbone: nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel, which it does
    the first time a layer runs in eval mode without grad on such a CPU: after that, backward
    through the layer is silently wrong (LoRA gradients off, merges wrong). Setting the layers'
    ``support_avx512bf16_for_cpu`` to False changes nothing they compute (it stays False after
    detach). A weight already repacked is an UnsupportedModuleError: see unpack_cpu_repacked()."""
    layers = {name: m for name, m in backbone.named_modules() if is_4bit(m)}
    repacked = [name for name, m in layers.items() if _repacked(m)]
    if repacked:
        raise UnsupportedModuleError(
            f"bitsandbytes has repacked {len(repacked)} 4-bit weight(s) (e.g. {repacked[0]!r}) for its AVX512-BF16 "
            "CPU inference kernel, which ran when the model did an eval forward without grad; backward through a "
            "repacked weight is wrong. Attach deltas before running the model, or convert the weights back with "
            "opendelta.quantized.unpack_cpu_repacked(model) (bitsandbytes rounded their block scales to bfloat16 "
            "when it repacked them, so the model now computes slightly differently from a fresh load)."
        )
    for module in layers.values():
        module.support_avx512bf16_for_cpu = False


def unpack_cpu_repacked(model: nn.Module) -> list[str]:
    """Convert 4-bit weights bitsandbytes repacked for its AVX512-BF16 CPU kernel back to its
    standard layout (their block scales stay bfloat16-rounded), so deltas can train on them;
    returns the layers converted."""
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

    done = []
    for name, module in model.named_modules():
        if is_4bit(module) and _repacked(module):
            weight = module.weight
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            done.append(name)
    return done


def check_writable(module: nn.Module) -> None:
    """Raise MergeError for a quantized layer whose weight a merge cannot write."""
    if is_8bit(module) or is_torchao(module) or is_hqq(module):
        kind = "an 8-bit bitsandbytes" if is_8bit(module) else "a torchao" if is_torchao(module) else "an hqq"
        raise MergeError(
            f"merging into {kind} weight ({type(module).__name__}) is not supported; keep the delta unmerged (it runs "
            "beside the layer), or load the backbone in bitsandbytes 4-bit or full precision to merge."
        )


def write_weight(module: nn.Module, value: torch.Tensor) -> Any:
    """Quantize `value` (out, in) into the layer's weight; return what :func:`restore_weight` needs
    to put the packed weight before back bit for bit."""
    import bitsandbytes.functional as F

    check_writable(module)
    weight = module.weight
    state = weight.quant_state
    packed, new_state = F.quantize_4bit(
        value.to(state.dtype).contiguous(), blocksize=state.blocksize, quant_type=state.quant_type,
        compress_statistics=state.nested, quant_storage=weight.data.dtype,
    )
    before = (weight.data.clone(), state)
    weight.data.copy_(packed.reshape(weight.data.shape))  # same storage: only the bytes change
    weight.quant_state = new_state
    return before


def restore_weight(module: nn.Module, before: Any) -> None:
    """Put back the packed weight :func:`write_weight` replaced."""
    data, state = before
    module.weight.data.copy_(data)
    module.weight.quant_state = state
