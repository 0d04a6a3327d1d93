"""The original OpenDelta's (0.3.2) checkpoint folders: ``config.json`` + ``pytorch_model.bin``.

The original's ``save_finetuned`` wrote the backbone's trainable state dict with ``torch.save`` and
its config as JSON. Here such a folder is read without unrestricted unpickling
(``torch.load(weights_only=True)``: tensors and plain containers only) and translated into
opendelta's terms: the delta tensors' keys by a table per method (:data:`LAYOUTS`), everything
else as backbone tensors the delta trains (an unfrozen head); where the original computed something
opendelta's method does not (a shared prefix MLP, an elementwise "low-rank" product), the
checkpoint is refused with the reason, never loaded approximately. BitFit, parallel-adapter and
soft-prompt tensors are placed with the backbone (:data:`PLACEMENTS`). ``opendelta convert`` rewrites such a
folder in opendelta's own format (safetensors + JSON, checksummed).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from opendelta.checkpoint import CheckpointContents, StoredCheckpoint, delta_key, write_checkpoint
from opendelta.checkpoint_files import checkpoint_path, read_json
from opendelta.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)
from opendelta.original_config import read_saved_config
from opendelta.registry import lookup
from opendelta.version import __version__

if TYPE_CHECKING:
    from opendelta.config import DeltaConfig

ORIGINAL_CONFIG = "config.json"
ORIGINAL_WEIGHTS = "pytorch_model.bin"

@dataclass(frozen=True)
class OriginalLayout:
    """Where one method of the original put its delta tensors: the state-dict key of each (its
    ``path`` group is the module the original inserted the delta module into), the key it becomes
    in opendelta's layer there, and how a layer's tensors combine (``combine``: original layer
    tensors -> opendelta's, by key). ``refuse`` says why a checkpoint cannot load exactly (None: it can)."""

    pattern: re.Pattern[str]
    layer_key: Callable[[re.Match[str]], str]
    combine: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    refuse: Callable[[DeltaConfig, Mapping[str, torch.Tensor]], str | None] | None = None


def _rename(table: Mapping[str, str]) -> Callable[[re.Match[str]], str]:
    return lambda m: ".".join(table.get(part, part) for part in m["key"].split("."))


def _compacter_refusal(config: DeltaConfig, state: Mapping[str, torch.Tensor]) -> str | None:
    # compacter.py (CompacterModel.__init__) asserts both sharing options False; PHMLinear
    # (layers/hypercomplex_linear.py, lines 106-114) makes the rule requires_grad=learn_phm, so with
    # learn_phm=False a trainable-only state dict holds no rule: its random values are lost
    if config.shared_phm_rule or config.shared_W_phm:  # type: ignore[attr-defined]
        return ("it claims shared_phm_rule or shared_W_phm, which the original refused to build (CompacterModel "
                "asserts both False), so no original checkpoint has them")
    if not config.learn_phm and not any(".phm_rule" in k for k in state):  # type: ignore[attr-defined]
        return ("it was trained with learn_phm=False, and the original saved only trainable tensors: the fixed random "
                "phm rules its up and down projections used are not in the file")
    return None


def _low_rank_refusal(config: DeltaConfig, state: Mapping[str, torch.Tensor]) -> str | None:
    # layers/low_rank_linear.py, line 35: W = W_left * W_right, an elementwise (broadcast) product:
    # the outer product W_left @ W_right for rank 1 only
    rank = config.low_rank_rank  # type: ignore[attr-defined]
    if rank != 1:
        return (f"it has low_rank_rank={rank}: the original's LowRankLinear multiplied its factors elementwise "
                "(W_left * W_right), which is the rank-r product opendelta computes only for rank 1")
    return None


def _prefix_refusal(config: DeltaConfig, state: Mapping[str, torch.Tensor]) -> str | None:
    # prefix.py, ReparameterizeFunction (lines 393-462): one MLP on the first attention generates
    # every layer's keys and values; the per-layer past_key/past_value parameters are deleted
    if config.reparameterize or any(".reparams." in k for k in state):  # type: ignore[attr-defined]
        return ("it was trained with reparameterize=True: the original generated every layer's prefix from ONE shared "
                "MLP (its `reparams` module), while opendelta's prefix layers each have their own, so the two train "
                "differently; its per-layer prefixes are not in the file. Only reparameterize=False checkpoints map "
                "exactly")
    return None


def _prefix_keys_values(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # prefix.py, PrefixLayerBert.pre_forward & co.: past_key / past_value (prefix_token_num, hidden),
    # each split into heads as (tokens, heads, head_dim); opendelta's `prefix` holds keys then values
    if set(tensors) != {"past_key", "past_value"}:
        raise CorruptCheckpointError(f"an original prefix layer holds past_key and past_value, got {sorted(tensors)}")
    return {"prefix": torch.cat([tensors["past_key"], tensors["past_value"]], dim=1)}


_SAMPLERS = {"down_sampler": "down", "up_sampler": "up", "b": "bias"}

#: delta_type -> its layout in the original (the delta_name each method inserted its module as, and
#: the attribute names of that module, are read from the original's delta_models/<method>.py)
LAYOUTS: dict[str, OriginalLayout] = {
    # lora.py: LowRankLinear inserted in parallel as "lora": lora_A (r, in), lora_B (out, r), as ours
    "lora": OriginalLayout(re.compile(r"(?P<path>.+)\.lora(?:_\d+)?\.(?P<key>lora_A|lora_B)"), lambda m: m["key"]),
    # adapter.py: AdapterLayer inserted sequentially as "adapter": modulelist.down_proj / up_proj Linear layers
    "adapter": OriginalLayout(
        re.compile(r"(?P<path>.+)\.adapter(?:_\d+)?\.modulelist\.(?P<key>(?:down|up)_proj\.(?:weight|bias))"),
        _rename({"down_proj": "down", "up_proj": "up"}),
    ),
    # compacter.py, update_module: HyperComplexAdapterLayer inserted sequentially as "compactor" (sic);
    # its down_sampler / up_sampler are PHMLinear (layers/hypercomplex_linear.py): phm_rule or
    # phm_rule_left/right, W or W_left/W_right, bias b; H = sum_i kron(rule_i, W_i), y = x H + b, as ours
    "compacter": OriginalLayout(
        re.compile(r"(?P<path>.+)\.compactor(?:_\d+)?\.(?P<key>(?:down|up)_sampler\."
                   r"(?:phm_rule|phm_rule_left|phm_rule_right|W|W_left|W_right|b))"),
        _rename(_SAMPLERS), refuse=_compacter_refusal,
    ),
    # low_rank_adapter.py, update_module: LowRankAdapter inserted sequentially as "low_rank_adapter";
    # down_sampler / up_sampler are LowRankLinear (layers/low_rank_linear.py): W_left, W_right, b
    "low_rank_adapter": OriginalLayout(
        re.compile(r"(?P<path>.+)\.low_rank_adapter(?:_\d+)?\.(?P<key>(?:down|up)_sampler\.(?:W_left|W_right|b))"),
        _rename(_SAMPLERS), refuse=_low_rank_refusal,
    ),
    # parallel_adapter.py, update_module: one ParallelAdapterLayer inserted "before" a start module and
    # "after" its end module, both as "parallel_adapter" (the second on one module as parallel_adapter_1)
    "parallel_adapter": OriginalLayout(
        re.compile(r"(?P<path>.+)\.parallel_adapter(?:_\d+)?\.modulelist\.(?P<key>(?:down|up)_proj\.(?:weight|bias))"),
        _rename({"down_proj": "down", "up_proj": "up"}),
    ),
    # prefix.py, update_module: a PrefixLayer<Family> inserted sequentially as "prefix" on each attention
    "prefix": OriginalLayout(
        re.compile(r"(?P<path>.+)\.prefix(?:_\d+)?\.(?P<key>past_key|past_value)"), lambda m: m["key"],
        combine=_prefix_keys_values, refuse=_prefix_refusal,
    ),
    # soft_prompt.py, update_module: a SoftPromptLayer inserted on the model (its encoder if it is an
    # encoder-decoder) as "soft_prompt_layer": soft_embeds (soft_token_num, hidden)
    "soft_prompt": OriginalLayout(
        re.compile(r"(?:(?P<path>.+)\.)?soft_prompt_layer(?:_\d+)?\.(?P<key>soft_embeds)"), lambda m: m["key"],
    ),
    # bitfit.py, add_bias_to_others: a BiasLayer inserted sequentially as "bitfit" (bias); the biases it
    # unfroze or added to linear layers keep their backbone names (placed with the backbone: _place_bitfit)
    "bitfit": OriginalLayout(re.compile(r"(?P<path>.+)\.bitfit(?:_\d+)?\.(?P<key>bias)"), lambda m: m["key"]),
}


@dataclass
class Translated:
    """An original state dict in opendelta's terms: each delta layer's tensors by module path (in
    model order) and layer key, and the backbone tensors the delta trains, by backbone name."""

    layers: dict[str, dict[str, torch.Tensor]]
    backbone: dict[str, torch.Tensor]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor by opendelta checkpoint key."""
        out = {delta_key(path, key): t for path, layer in self.layers.items() for key, t in layer.items()}
        return {**out, **{f"backbone.{name}": t for name, t in self.backbone.items()}}


def is_original_folder(directory: Path) -> bool:
    """Whether `directory` looks like a folder the original OpenDelta saved (a delta config.json
    beside pytorch_model.bin; a transformers model folder has those names too, but no delta_type)."""
    config = directory / ORIGINAL_CONFIG
    if not (config.is_file() and (directory / ORIGINAL_WEIGHTS).is_file()):
        return False
    try:
        values = read_json(config, CorruptCheckpointError)
    except CheckpointError:
        return False
    return isinstance(values, dict) and "delta_type" in values


def refuse_saving(delta: Any) -> None:
    raise CheckpointError(
        "opendelta reads the original OpenDelta's pickled format but never writes pickles; save with "
        "format='opendelta' (safetensors + JSON), which opendelta and `opendelta convert` produce."
    )


def load_state_dict_safely(weights: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``: a pickle that holds anything but tensors and plain
    containers is refused (CorruptCheckpointError), never run."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as exc:
        raise CorruptCheckpointError(
            f"{weights} is not a plain tensor state dict that can be read without running code "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); it is damaged, or holds "
            "objects other than tensors, which opendelta does not unpickle."
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CorruptCheckpointError(f"{weights} must hold a dict of tensor names to tensors (a state dict)")
    return state


def _layout(delta_type: str, where: str) -> OriginalLayout:
    if delta_type not in LAYOUTS:
        raise IncompatibleCheckpointError(
            f"{where} holds an original OpenDelta {delta_type!r} delta; opendelta translates the original's "
            f"{', '.join(sorted(LAYOUTS))} checkpoints. Retrain the delta with opendelta's {delta_type!r} method."
        )
    return LAYOUTS[delta_type]


def translate_state_dict(config: DeltaConfig, state: dict[str, torch.Tensor], where: str) -> Translated:
    """An original state dict in opendelta's checkpoint terms, as far as the file alone tells (see
    :data:`PLACEMENTS` for what needs the backbone). A layout the original computed differently
    from opendelta is refused (IncompatibleCheckpointError), never loaded approximately."""
    layout = _layout(config.delta_type, where)
    why = layout.refuse(config, state) if layout.refuse is not None else None
    if why is not None:
        raise IncompatibleCheckpointError(
            f"{where} holds an original OpenDelta {config.delta_type!r} delta that opendelta cannot load exactly: {why}."
        )
    layers: dict[str, dict[str, torch.Tensor]] = {}
    backbone: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = layout.pattern.fullmatch(name)
        if match is None:
            backbone[name] = tensor
            continue
        layer = layers.setdefault(match["path"] or "", {})
        key = layout.layer_key(match)
        # one module inserted twice under two names (parallel_adapter, parallel_adapter_1) saves its tensors twice
        if key in layer and not torch.equal(layer[key], tensor):
            raise CorruptCheckpointError(f"{where}: two different tensors for {key!r} of the delta at {match['path']!r}")
        layer[key] = tensor
    if not layers and config.delta_type not in PLACEMENTS:
        raise CorruptCheckpointError(f"{where} holds no {config.delta_type} tensors (keys such as {layout.pattern.pattern!r})")
    if layout.combine is not None:
        layers = {path: layout.combine(tensors) for path, tensors in layers.items()}
    return Translated(layers, backbone)


def original_pairs(model: nn.Module, patterns: Sequence[str], common_structure: bool) -> list[tuple[str, str]]:
    """The (start, end) modules of the original's parallel adapters (parallel_adapter.py,
    update_module, lines 191-201): the modules `patterns` match, in model order, taken two at a
    time whatever pattern each matched; where a pattern is repeated (``["attn@", "attn@"]``) one
    module is both start and end."""
    from opendelta.targets import resolve

    if len(patterns) % 2:
        raise IncompatibleCheckpointError(
            f"the original's parallel adapter pairs its modified_modules (start, end); {list(patterns)} has an odd length"
        )
    index = {path: i for i, (path, _) in enumerate(model.named_modules())}
    matched: set[str] = set()
    for pattern in dict.fromkeys(patterns):
        matched.update(t.path for t in resolve(model, [pattern], roles=common_structure, strict=False))
    pairs: list[tuple[str, str]] = []
    ith, start = 0, ""
    for path in sorted(matched, key=index.__getitem__):
        if ith % 2 == 0:
            start = path
        if ith % 2 == 1 or patterns[ith] == patterns[ith + 1]:
            pairs.append((start, path))
            ith |= 1
        ith = (ith + 1) % len(patterns)
    return pairs


def _place_parallel_adapter(model: nn.Module, config: DeltaConfig, translated: Translated, where: str) -> Translated:
    from opendelta.addressing import span_path

    if config.modified_modules is None:  # the original's default_modified_modules, on its common structure
        pairs = original_pairs(model, ["attn@", "attn@", "ff@.w1@", "ff@.w2@"], True)
    else:
        pairs = original_pairs(model, list(config.modified_modules), bool(config.common_structure))
    layers = translated.layers
    moves: dict[str, str | None] = {}
    for start, end in pairs:
        if start not in layers:
            raise IncompatibleCheckpointError(
                f"{where}: the original paired {start!r} with {end!r} on this backbone, but the file holds no adapter at "
                f"{start!r}; it was trained on another model"
            )
        moves[start] = span_path(start, end)
        if end != start and end in layers:  # a full state dict saves the layer under its end too
            if layers[end].keys() != layers[start].keys() or any(not torch.equal(t, layers[start][k]) for k, t in layers[end].items()):
                raise CorruptCheckpointError(f"{where}: the adapter from {start!r} to {end!r} is saved with two values")
            moves[end] = None
    stray = [p for p in layers if p not in moves]
    if stray:
        raise IncompatibleCheckpointError(f"{where}: adapters at {stray[:3]} belong to no (start, end) pair of this backbone")
    placed = {moves[p]: layer for p, layer in layers.items() if moves[p] is not None}
    return Translated(placed, translated.backbone)  # type: ignore[arg-type]


def _place_bitfit(model: nn.Module, config: DeltaConfig, translated: Translated, where: str) -> Translated:
    # bitfit.py, add_bias_to_modules_have_bias_or_known_type (lines 168-186): an existing bias was
    # unfrozen (a backbone tensor the delta trains, here too); a linear layer without one got a new
    # `bias` parameter, which F.linear adds to its output: an opendelta bias layer at that module
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    layers = dict(translated.layers)
    backbone = dict(translated.backbone)
    for name in list(backbone):
        owner, _, leaf = name.rpartition(".")
        if leaf == "bias" and name not in params and isinstance(modules.get(owner), nn.Linear):
            layers[owner] = {"bias": backbone.pop(name)}
    index = {path: i for i, path in enumerate(modules)}
    return Translated(dict(sorted(layers.items(), key=lambda item: index.get(item[0], -1))), backbone)


def _place_soft_prompt(model: nn.Module, config: DeltaConfig, translated: Translated, where: str) -> Translated:
    # soft_prompt.py, update_module: on the model, or its encoder for an encoder-decoder; opendelta's
    # prompt sits there too, and on an encoder-decoder's decoder a layer extends the cross-attention
    # mask (which the original did by extending the shared attention_mask tensor in place)
    _, soft_prompt = lookup(config.delta_type)
    targets = [t.path for t in soft_prompt.resolve_targets(model, config)]
    if list(translated.layers) != targets[:1]:
        raise IncompatibleCheckpointError(
            f"{where}: the original's soft prompt sits at {list(translated.layers)}, but on this {type(model).__name__} "
            f"it would sit at {targets[:1]}; it was trained on another kind of model"
        )
    return Translated({path: translated.layers.get(path, {}) for path in targets}, translated.backbone)


#: methods whose module list the file alone does not tell: delta_type -> its placement on a backbone
PLACEMENTS: dict[str, Callable[[nn.Module, DeltaConfig, Translated, str], Translated]] = {
    "parallel_adapter": _place_parallel_adapter,
    "bitfit": _place_bitfit,
    "soft_prompt": _place_soft_prompt,
}


def original_keys_as_backbone_keys(delta_type: str, state: Mapping[str, torch.Tensor], delta_name: str) -> dict[str, torch.Tensor]:
    """An original state dict under the keys the backbone's ``state_dict()`` has with opendelta's
    delta `delta_name` attached (for ``load_state_dict``; one tensor per layer key, as the
    original's own layers held them)."""
    layout = _layout(delta_type, "the state_dict")
    if layout.combine is not None or delta_type in PLACEMENTS:
        raise IncompatibleCheckpointError(
            f"from_finetuned(state_dict=...) maps the original's {delta_type!r} tensors only through a checkpoint "
            "folder; save the state dict as the original did (pytorch_model.bin + config.json) and load the folder."
        )
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = layout.pattern.fullmatch(name)
        out[f"{match['path']}.{delta_name}.{layout.layer_key(match)}" if match else name] = tensor
    return out


def read_original_checkpoint(directory: str | os.PathLike, *, verify: bool = True) -> CheckpointContents:
    """An original OpenDelta folder in opendelta's terms (it records no checksum, so `verify` has
    nothing to check; the tensors are read here, since a pickle has no header). For the methods
    of :data:`PLACEMENTS` the module list comes with the backbone: ``contents.for_backbone(model)``."""
    folder = checkpoint_path(directory, "from_finetuned")
    if not (folder / ORIGINAL_WEIGHTS).is_file():
        raise CheckpointNotFoundError(f"{str(folder)!r} has no {ORIGINAL_WEIGHTS}")
    config = read_saved_config(folder)
    state = load_state_dict_safely(folder / ORIGINAL_WEIGHTS)
    translated = translate_state_dict(config, state, str(folder))
    return _contents(config, translated, str(folder))


def _contents(config: DeltaConfig, translated: Translated, where: str) -> CheckpointContents:
    _, delta_cls = lookup(config.delta_type)
    tensors = translated.tensors()
    stored = StoredCheckpoint(
        meta={"config": config.to_dict()},
        shapes={k: tuple(v.shape) for k, v in tensors.items()},
        load=lambda device: {k: v.to(device) for k, v in tensors.items()},
    )
    placement = PLACEMENTS.get(config.delta_type)
    return CheckpointContents(
        delta_class=delta_cls, config=config, modules=list(translated.layers), stored=stored,
        backbone_tensors={name: list(t.shape) for name, t in translated.backbone.items()},
        trained_on=getattr(config, "backbone_class", None) or "backbone of unknown class",
        for_backbone=None if placement is None else (lambda model: _contents_placed(config, placement(model, config, translated, where), where)),
    )


def _contents_placed(config: DeltaConfig, translated: Translated, where: str) -> CheckpointContents:
    placed = _contents(config, translated, where)
    placed.for_backbone = None
    return placed


def convert(directory: str | os.PathLike, out: str | os.PathLike, backbone_model: nn.Module | None = None) -> Path:
    """Rewrite the original OpenDelta folder `directory` as an opendelta checkpoint in `out`
    (safetensors + JSON, checksummed), loadable with ``AutoDeltaModel.from_finetuned(out, model)``.
    BitFit, parallel-adapter and soft-prompt folders need `backbone_model` (its modules, not its
    weights: a skeleton on the meta device will do), because where their tensors belong depends on it."""
    contents = read_original_checkpoint(directory)
    if contents.for_backbone is not None:
        if backbone_model is None:
            raise IncompatibleCheckpointError(
                f"an original {contents.config.delta_type!r} checkpoint says where its tensors belong only together with "
                "its backbone (which modules had biases, which modules the original paired, where the prompt sits); "
                "pass the backbone: `opendelta convert SRC OUT --model <transformers model folder>`, or "
                "convert(src, out, backbone_model=model)."
            )
        contents = contents.for_backbone(backbone_model)
    tensors = contents.stored.load("cpu")
    meta = {
        "delta_type": contents.config.delta_type,
        "name": contents.config.delta_type,
        "order": {"position": 0, "created": 0},  # unknown creation time: placed by content among others
        "library_version": __version__,
        "config": contents.config.to_dict(),
        "modules": contents.modules,
        "backbone_tensors": contents.backbone_tensors,
        "backbone": {"class": contents.trained_on},
    }
    return write_checkpoint(out, meta, tensors)
