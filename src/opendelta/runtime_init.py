"""Runtime initialisation: learn hidden-state shapes that no config states, from one dummy forward.

The pass can run on the ``meta`` device, so even a huge skeleton costs nothing to measure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from opendelta.errors import RuntimeInitError
from opendelta.layer import first_tensor
from opendelta.reachability import ParameterReads, unreached_error

if TYPE_CHECKING:
    from opendelta.targets import Target


@dataclass(frozen=True)
class Observation:
    """What flowed through one module during the dummy pass (its first input and its hidden output)."""

    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    dtype: torch.dtype
    device: torch.device
    input_dtype: torch.dtype | None = None


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _forward_params(model: nn.Module) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}


#: the inputs that carry a modality; synthesize_inputs makes one of each the forward takes
MODALITY_INPUTS = ("input_ids", "pixel_values", "input_features", "input_values")


def synthesize_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """A tiny valid input for a transformers-style model, from its forward signature and config."""
    params = _forward_params(model)
    config = getattr(model, "config", None)
    device = model_device(model)

    def get(*names: str, default: int) -> int:
        for source in (config, getattr(config, "vision_config", None), getattr(config, "audio_config", None)):
            for name in names:
                value = getattr(source, name, None) if source is not None else None
                if isinstance(value, int):
                    return value
                if isinstance(value, (tuple, list)) and value and isinstance(value[0], int):
                    return value[0]
        return default

    inputs: dict[str, torch.Tensor] = {}
    # every modality the forward takes: a dual encoder (CLIP) needs text and pixels at once
    if "input_ids" in params:
        inputs["input_ids"] = _token_ids(get("vocab_size", default=8), device)
    if "pixel_values" in params:
        size, channels = get("image_size", default=224), get("num_channels", default=3)
        inputs["pixel_values"] = torch.zeros(1, channels, size, size, device=device)
    if "input_features" in params:
        mels = get("num_mel_bins", default=80)
        frames = 2 * get("max_source_positions", default=1500)
        inputs["input_features"] = torch.zeros(1, mels, frames, device=device)
    if "input_values" in params:
        inputs["input_values"] = torch.zeros(1, 4000, device=device)
    if not inputs:
        raise RuntimeInitError(
            f"cannot make a dummy input for {type(model).__name__}: its forward takes none of "
            f"{', '.join(MODALITY_INPUTS)}. Pass dummy_inputs={{...}} (a dict of keyword "
            "arguments, or a tuple of positional ones) to the delta model."
        )
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        inputs["decoder_input_ids"] = inputs.get("input_ids", _token_ids(get("vocab_size", default=8), device))
    return inputs


def _token_ids(vocab: int, device: torch.device) -> torch.Tensor:
    return torch.arange(4, device=device).remainder(max(vocab, 1)).unsqueeze(0)


def default_dummy_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's own ``dummy_inputs`` when they fit its forward, else synthesised ones."""
    own = getattr(model, "dummy_inputs", None)
    params = _forward_params(model)
    try:
        made: dict[str, torch.Tensor] | None = synthesize_inputs(model)
    except RuntimeInitError:
        made = None
    fits = isinstance(own, Mapping) and own and all(k in params for k in own)
    if fits and made is not None and any(k not in own for k in made if k in MODALITY_INPUTS):
        fits = False  # e.g. CLIP's own dummy holds text only, but its forward needs pixels too
    if fits:
        device = model_device(model)
        own = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in own.items()}
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False) and "decoder_input_ids" in params:
            own.setdefault("decoder_input_ids", own.get("input_ids"))
        return dict(own)
    return made if made is not None else synthesize_inputs(model)


class _MetaScalars(TorchDispatchMode):
    """On the meta device, answer data-dependent scalar reads (``.item()``, ``if mask.all()``).

    Models use them only to pick fast paths (e.g. "is the mask all ones?"); for an all-ones dummy
    input, ``True`` / ``1`` is the honest answer and shapes do not depend on it.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return True if args[0].dtype == torch.bool else 1
        return func(*args, **(kwargs or {}))


def _call(model: nn.Module, inputs: Any) -> None:
    if isinstance(inputs, Mapping):
        model(**inputs)
    elif isinstance(inputs, (tuple, list)):
        model(*inputs)
    else:
        model(inputs)


class _CopyOnWrite(TorchDispatchMode):
    """Copies each of `tensors` the first time an operation writes into its memory, so that
    :meth:`restore` can undo every in-place write (a call counter, a running statistic, a cache)."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        super().__init__()
        self._by_memory: dict[tuple[torch.device, int], list[torch.Tensor]] = {}
        for tensor in tensors:
            key = _memory(tensor)
            if key is not None:
                self._by_memory.setdefault(key, []).append(tensor)
        self._saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.watching = bool(self._by_memory)  # nothing to watch on the meta device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        schema = getattr(func, "_schema", None)
        for i, arg in enumerate(schema.arguments if schema is not None else ()):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                for written in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(written, torch.Tensor):
                        for tensor in self._by_memory.get(_memory(written), ()):  # type: ignore[arg-type]
                            self._saved.setdefault(id(tensor), (tensor, tensor.clone()))
        return func(*args, **kwargs)

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, value in self._saved.values():
                if tensor.shape == value.shape:
                    tensor.copy_(value)
                else:  # resized in place (a growing cache)
                    tensor.data = value


def _memory(tensor: torch.Tensor) -> tuple[torch.device, int] | None:
    """Where a tensor's data lives (views share it), or None when it has none to protect."""
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # tensor subclasses without plain storage
        return None
    return None if tensor.is_meta or pointer == 0 else (tensor.device, pointer)


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """The dummy pass must not change the model or the program's randomness: it runs in eval mode
    (no BatchNorm statistics update, no dropout) and on a forked random generator; afterwards,
    whether it succeeded or failed, every module's train/eval flag, its parameters and buffers
    (re-assigned ones, and the values of those written in place) are put back."""
    modes = [(m, m.training) for m in model.modules()]
    tensors = [(m, dict(m._parameters), dict(m._buffers)) for m in model.modules()]
    devices = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    writes = _CopyOnWrite([t for _, ps, bs in tensors for t in (*ps.values(), *bs.values()) if t is not None])
    try:
        with torch.random.fork_rng(devices=devices), (writes if writes.watching else contextlib.nullcontext()):
            model.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training
        for module, params, buffers in tensors:
            for now, before in ((module._parameters, params), (module._buffers, buffers)):
                if now.keys() != before.keys() or any(now[k] is not v for k, v in before.items()):
                    now.clear()
                    now.update(before)
        writes.restore()


def observe(
    model: nn.Module,
    paths: Sequence[str],
    dummy_inputs: Any = None,
    *,
    pre_hooks: Mapping[str, Callable[[nn.Module, tuple, dict], Any]] | None = None,
) -> dict[str, Observation]:
    """Run one dummy forward (no grad) and record what flowed through each module in `paths`.

    `pre_hooks` (path -> forward pre-hook with kwargs) run on their modules during that one pass,
    for methods that must measure what only appears inside a module's call (e.g. key/value shapes).
    A module of `paths` the pass never calls is an UnreachedModuleError saying why.
    """
    if dummy_inputs is None and _default_inputs_or_none(model) is None:
        parts = _inner_models(model, paths)
        if parts:
            return _observe_inner(model, parts, paths, pre_hooks or {})
    modules = dict(model.named_modules())
    seen: dict[str, Observation] = {}
    handles = []

    def recorder(path: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if path in seen:
                return
            h_in = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if h_in is None:
                h_in = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            try:
                h_out = first_tensor(output)
            except TypeError:
                h_out = None
            ref = h_out if isinstance(h_out, torch.Tensor) else h_in
            seen[path] = Observation(
                input_shape=tuple(h_in.shape) if h_in is not None else None,
                output_shape=tuple(h_out.shape) if isinstance(h_out, torch.Tensor) else None,
                dtype=ref.dtype if ref is not None else torch.float32,
                device=ref.device if ref is not None else model_device(model),
                input_dtype=h_in.dtype if h_in is not None else None,
            )

        return hook

    for path in paths:
        handles.append(modules[path].register_forward_hook(recorder(path), with_kwargs=True))
    for path, pre_hook in (pre_hooks or {}).items():
        handles.append(modules[path].register_forward_pre_hook(pre_hook, with_kwargs=True))
    reads = ParameterReads({p: modules[p] for p in paths})
    try:
        inputs = default_dummy_inputs(model) if dummy_inputs is None else dummy_inputs
        on_meta = model_device(model).type == "meta"
        with torch.no_grad(), _untouched(model), reads, (_MetaScalars() if on_meta else contextlib.nullcontext()):
            _call(model, inputs)
    except RuntimeInitError:
        raise
    except Exception as exc:
        raise RuntimeInitError(
            f"the dummy forward pass through {type(model).__name__} failed ({type(exc).__name__}: {exc}). "
            "Pass dummy_inputs= with a small valid input for this model."
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    missing = [p for p in paths if p not in seen]
    if missing:
        raise unreached_error(model, missing, reads.read)
    return seen


def _default_inputs_or_none(model: nn.Module) -> dict[str, torch.Tensor] | None:
    try:
        return default_dummy_inputs(model)
    except RuntimeInitError:
        return None


def _inner_models(model: nn.Module, paths: Sequence[str]) -> dict[str, list[str]] | None:
    """For a wrapper with no usable dummy input (a user's module holding one or two pretrained
    models, a forward taking ``*args``): the outermost sub-modules that have one, each with the
    target `paths` inside it; None unless every target lies in one of them."""
    found: dict[str, list[str]] = {}
    remaining = list(paths)

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            inside = [p for p in remaining if p == path or p.startswith(path + ".")]
            if not inside:
                continue
            if path not in inside and _default_inputs_or_none(child) is not None:
                found[path] = inside
                for p in inside:
                    remaining.remove(p)
            else:
                visit(path + ".", child)

    visit("", model)
    return found if found and not remaining else None


def _observe_inner(
    model: nn.Module,
    parts: Mapping[str, list[str]],
    paths: Sequence[str],
    pre_hooks: Mapping[str, Callable[[nn.Module, tuple, dict], Any]],
) -> dict[str, Observation]:
    """observe() on each inner model of `parts` with its own dummy input, as the original OpenDelta
    did for wrappers; shapes are the ones the wrapper would pass through to it."""
    seen: dict[str, Observation] = {}
    for root, inside in parts.items():
        cut = len(root) + 1
        hooks = {p[cut:]: hook for p, hook in pre_hooks.items() if p.startswith(root + ".")}
        observed = observe(model.get_submodule(root), [p[cut:] for p in inside], None, pre_hooks=hooks)
        seen.update({f"{root}.{p}": o for p, o in observed.items()})
    return {p: seen[p] for p in paths}


def observe_targets(model: nn.Module, targets: Sequence[Target], dummy_inputs: Any = None) -> dict[str, Observation]:
    """:func:`observe` at each target's path; a span's observation is its start's input and its end's output."""
    seen = observe(model, list(dict.fromkeys(side for t in targets for side in t.sides)), dummy_inputs)
    for t in targets:
        if t.is_span:
            seen[t.path] = dataclasses.replace(
                seen[t.end], input_shape=seen[t.start].input_shape, input_dtype=seen[t.start].input_dtype
            )
    return seen
