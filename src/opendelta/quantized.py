"""Quantized linear layers seen as the linear maps they compute: bitsandbytes 4-bit and 8-bit,
torchao weights (an ``nn.Linear`` whose weight is a torchao tensor: int8 weight-only, NF4...) and
hqq's ``HQQLinear`` (not an ``nn.Linear``; it has no ``.weight``).

Deltas act on a quantized layer as on an ``nn.Linear``: they take the layer's compute dtype (not
the packed storage dtype), a merge reads the dequantized weight, and writing a merged weight
re-quantizes it with the layer's own quantizer. Each kind of layer is one :class:`_Backend` row:
how to dequantize it, how to re-quantize a dense weight into it, and which attributes hold its
packed weight. Re-quantizing only ever replaces those attributes (never writes into their
tensors), so keeping the objects they held is enough for unmerge and detach to put the packed
bytes back bit for bit. Nothing here imports a quantization library unless the model already
holds its layers.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from opendelta.errors import MergeError, UnsupportedModuleError

#: quantized module -> how many times a merge wrote or restored its weight (see weight_stamp); held weakly, so
#: nothing stays on the module or outlives it
_writes: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def _bnb_class(name: str) -> type | None:
    modules = sys.modules.get("bitsandbytes.nn.modules")  # loaded iff the model can hold such layers
    return getattr(modules, name, None) if modules is not None else None


def is_4bit(module: nn.Module) -> bool:
    cls = _bnb_class("Linear4bit")
    return cls is not None and isinstance(module, cls)


def is_8bit(module: nn.Module) -> bool:
    cls = _bnb_class("Linear8bitLt")
    return cls is not None and isinstance(module, cls)


def _nf4_class() -> type | None:
    return getattr(sys.modules.get("torchao.quantization.quantize_.workflows.nf4.nf4_tensor"), "NF4Tensor", None)


def is_torchao(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose weight torchao quantized (a ``TorchAOBaseTensor``: int8 weight-only, NF4...)."""
    utils = sys.modules.get("torchao.utils")
    base = getattr(utils, "TorchAOBaseTensor", None) if utils is not None else None
    weight = getattr(module, "weight", None)
    return any(cls is not None and isinstance(weight, cls) for cls in (base, _nf4_class()))


def is_hqq(module: nn.Module) -> bool:
    modules = sys.modules.get("hqq.core.quantize")
    cls = getattr(modules, "HQQLinear", None) if modules is not None else None
    return cls is not None and isinstance(module, cls)


def is_quantized(module: nn.Module) -> bool:
    return _backend(module) is not None


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype a quantized layer computes in: the deltas beside it take it."""
    if (is_4bit(module) or is_hqq(module)) and module.compute_dtype is not None:
        return module.compute_dtype
    if is_torchao(module):
        return module.weight.dtype  # a torchao tensor reports the dtype it dequantizes to
    bias = getattr(module, "bias", None)
    return bias.dtype if isinstance(bias, torch.Tensor) and bias.is_floating_point() else torch.float32


# --- one row per kind of layer: dequantize, re-quantize with the layer's own quantizer --------------------------


def _bnb4_dequantize(module: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as F

    return F.dequantize_4bit(module.weight.data, module.weight.quant_state)


def _bnb4_requantize(module: nn.Module, value: torch.Tensor) -> None:
    import bitsandbytes.functional as F

    weight = module.weight
    state = weight.quant_state
    packed, weight.quant_state = F.quantize_4bit(
        value.to(state.dtype).contiguous(), blocksize=state.blocksize, quant_type=state.quant_type,
        compress_statistics=state.nested, quant_storage=weight.data.dtype,
    )
    weight.data = packed.reshape(weight.data.shape)


def _bnb8_scales(module: nn.Module) -> torch.Tensor:
    # the row scales sit on the weight until the first forward moves them to the layer's matmul state
    return module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB


def _bnb8_dequantize(module: nn.Module) -> torch.Tensor:
    # the weight bitsandbytes' CPU matmul multiplies by, in its order of operations (its int8_vectorwise_dequant
    # multiplies codes by scales first, which rounds differently: a dense copy would not give the same gradients)
    return module.weight.data.to(torch.float32).mul_(_bnb8_scales(module).unsqueeze(1).mul(1.0 / 127.0))


def _bnb8_requantize(module: nn.Module, value: torch.Tensor) -> None:
    import bitsandbytes.functional as F

    codes, scales, _ = F.int8_vectorwise_quant(value.to(torch.float16))  # as Int8Params quantizes a loaded weight
    module.weight.data = codes
    holder = module.weight if module.weight.SCB is not None else module.state
    holder.CB, holder.SCB = codes, scales


def _torchao_dequantize(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    return weight.get_original_weight() if hasattr(weight, "get_original_weight") else weight.dequantize()  # NF4


def _torchao_quantizer(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The function that quantizes a dense weight as `weight` was quantized, if opendelta knows it."""
    nf4 = _nf4_class()
    if nf4 is not None and isinstance(weight, nf4):
        from torchao.quantization import to_nf4

        return lambda value: to_nf4(value, weight.block_size, weight.scaler_block_size)
    int8 = getattr(sys.modules.get("torchao.quantization"), "Int8Tensor", None)
    if int8 is None or not isinstance(weight, int8):
        return None
    if weight.zero_point is None or not weight.zero_point.any():  # what torchao's int8 configs make: symmetric
        from torchao.quantization.granularity import PerBlock

        return lambda value: int8.from_hp(
            value, PerBlock(tuple(weight.block_size)), act_quant_kwargs=weight.act_quant_kwargs,
            act_quant_scale=weight.act_quant_scale, act_quant_zero_point=weight.act_quant_zero_point,
            act_pre_scale=weight.act_pre_scale, reduce_range=weight.reduce_range,
        )
    return None


def _torchao_requantize(module: nn.Module, value: torch.Tensor) -> None:
    weight = module.weight
    quantized = _torchao_quantizer(weight)(value.to(weight.dtype).contiguous())
    module.weight = nn.Parameter(quantized, requires_grad=weight.requires_grad)


def _hqq_requantize(module: nn.Module, value: torch.Tensor) -> None:
    # a new layer of the same class and config quantizes it (HQQLinear.quantize cannot run twice on one layer)
    config = {**module.quant_config, "offload_meta": module.offload_meta}
    fresh = type(module).from_weights(
        value.to(module.compute_dtype).contiguous(), None, config, compute_dtype=module.compute_dtype,
        device=module.device,
    )
    module.W_q, module.meta = fresh.W_q, fresh.meta


@dataclass(frozen=True)
class _Backend:
    """One kind of quantized linear layer: how to read its weight densely, how to write a dense
    weight into it, and the attributes (dotted paths from the module) that hold its packed weight
    and quantization statistics, all of which re-quantizing replaces rather than writes into."""

    matches: Callable[[nn.Module], bool]
    dequantize: Callable[[nn.Module], torch.Tensor]
    requantize: Callable[[nn.Module, torch.Tensor], None]
    parts: tuple[str, ...]


_BACKENDS = (
    _Backend(is_4bit, _bnb4_dequantize, _bnb4_requantize, ("weight.data", "weight.quant_state")),
    _Backend(
        is_8bit, _bnb8_dequantize, _bnb8_requantize, ("weight.data", "weight.CB", "weight.SCB", "state.CB", "state.SCB")
    ),
    _Backend(is_torchao, _torchao_dequantize, _torchao_requantize, ("weight",)),
    _Backend(is_hqq, lambda module: module.dequantize(), _hqq_requantize, ("W_q", "meta")),
)


def _backend(module: nn.Module) -> _Backend | None:
    return next((backend for backend in _BACKENDS if backend.matches(module)), None)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight a quantized layer multiplies by, in its compute dtype."""
    return _backend(module).dequantize(module).to(compute_dtype(module))


def _packed_name(module: nn.Module) -> str:
    return "W_q" if is_hqq(module) else "weight"


def packed_weight(module: nn.Module) -> torch.Tensor:
    """The parameter holding a quantized layer's packed weight (hqq's ``W_q``, else ``weight``)."""
    return getattr(module, _packed_name(module))


def weight_stamp(module: nn.Module) -> tuple:
    """What changes whenever a quantized layer's weight does (its packed tensor, the tensor's version
    and storage, the quantization state beside it, and a count of merges' writes): a value computed
    from the dequantized weight is kept while the stamp is the same."""
    packed = packed_weight(module)
    state = getattr(packed, "quant_state", None) or getattr(module, "meta", None)
    try:
        where = packed.data_ptr()
    except RuntimeError:  # a wrapper tensor (torchao) has no storage of its own: its identity and version stand in
        where = None
    # the write count keeps a freed object's id, reused by the next merge's, from passing for the old weight
    return (_writes.get(module, 0), id(packed), packed._version, where, id(state), packed.device)


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
    """Raise MergeError for a quantized layer whose weight a merge cannot re-quantize."""
    if is_torchao(module) and _torchao_quantizer(module.weight) is None:
        raise MergeError(
            f"merging into a torchao {type(module.weight).__name__} weight is not supported (opendelta re-quantizes "
            "torchao's NF4 and symmetric int8 weights); keep the delta unmerged (it runs beside the layer)."
        )


def _walk(obj: Any, path: str) -> Any:
    for name in filter(None, path.split(".")):
        obj = getattr(obj, name)
    return obj


def write_weight(module: nn.Module, value: torch.Tensor) -> dict[str, Any]:
    """Quantize `value` (out, in) into the layer's weight with its own quantizer; return the objects
    that held the packed weight before, which :func:`restore_weight` puts back."""
    check_writable(module)
    backend = _backend(module)
    before = {path: _walk(module, path) for path in backend.parts}
    backend.requantize(module, value)
    _writes[module] = _writes.get(module, 0) + 1
    return before


def restore_weight(module: nn.Module, before: dict[str, Any]) -> None:
    """Put back the packed weight :func:`write_weight` replaced, bit for bit (the same objects)."""
    for path, value in before.items():
        owner, _, leaf = path.rpartition(".")
        setattr(_walk(module, owner), leaf, value)
    _writes[module] = _writes.get(module, 0) + 1


# --- what a quantized layer holds, for structure views ------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized layer seen as the linear map it computes: its (out, in) shape, the dtype it computes
    in, the quantized format it stores (``nf4``, ``int8``, ``hqq-4bit``...) and the bytes it stores."""

    param: str  # the name of the parameter that holds the packed weight
    shape: tuple[int, int]
    compute_dtype: torch.dtype
    format: str
    packed_bytes: int  # codes and quantization statistics, each tensor once

    @property
    def dense_bytes(self) -> int:
        """What the same weight takes dense in the compute dtype."""
        return self.shape[0] * self.shape[1] * self.compute_dtype.itemsize


def _format(module: nn.Module) -> str:
    if is_4bit(module):
        return module.weight.quant_state.quant_type  # nf4 or fp4
    if is_8bit(module):
        return "int8"
    if is_hqq(module):
        return f"hqq-{module.meta['nbits']}bit"
    # a torchao tensor class names its format: Int8Tensor, NF4Tensor, Int4Tensor...
    return type(module.weight).__name__.removesuffix("Tensor").lower()


def _stored_tensors(obj: Any) -> list[torch.Tensor]:
    """The plain tensors `obj` holds: a torchao tensor by its inner tensors, a quantization state
    (bitsandbytes' QuantState, hqq's meta dict) by its fields."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__"):  # a wrapper tensor stores nothing itself
            return [t for name in obj.__tensor_flatten__()[0] for t in _stored_tensors(getattr(obj, name))]
        return [obj]
    if isinstance(obj, dict):
        values = obj.values()
    elif isinstance(obj, (list, tuple)):
        values = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        values = vars(obj).values()
    else:
        return []
    return [t for value in values for t in _stored_tensors(value)]


def describe(module: nn.Module) -> QuantizedWeight | None:
    """What a quantized layer stores and computes, or None for any other module."""
    backend = _backend(module)
    if backend is None:
        return None
    tensors = [t for path in backend.parts for t in _stored_tensors(_walk(module, path))]
    # one storage reached twice (bitsandbytes' 8-bit codes are both the weight and its state's CB) counts once
    storages = {(t.untyped_storage().data_ptr() or id(t), t.storage_offset(), t.nbytes): t.nbytes for t in tensors}
    shape = (module.out_features, module.in_features)
    return QuantizedWeight(_packed_name(module), shape, compute_dtype(module), _format(module), sum(storages.values()))
