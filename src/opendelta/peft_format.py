"""The PEFT adapter format: write folders ``peft.PeftModel.from_pretrained`` loads, and read PEFT's.

A PEFT folder is ``adapter_config.json`` plus ``adapter_model.safetensors``; backbone modules the
adapter trains whole (``modules_to_save``) are stored as ``base_model.model.<parameter path>``.
Each method PEFT shares with opendelta is one :class:`PeftMethod` row of :data:`PEFT_METHODS`,
which turns a delta's tensors into PEFT's and back:

- LoRA: ``<path>.lora_A.weight`` / ``.lora_B.weight``, the same factors (A: r x in, B: out x r; a
  convolution's with kernels); an embedding's ``<path>.lora_embedding_A`` / ``_B``; a MultiheadAttention's
  in_proj factors at ``<path>.lora_A.weight``, its out_proj's at ``<path>.base_layer.out_proj.lora_A.weight``;
  LoRA on parameters (``target_parameters``, fused MoE experts) at ``<module>.lora_A.weight``, one
  ``base_layer.`` deeper for each parameter of the module after it (PEFT nests one wrapper per parameter);
  DoRA's magnitudes (``use_dora``) are PEFT's ``<path>.lora_magnitude_vector``; a PiSSA/OLoRA-started
  LoRA is written as PEFT's own converted rank-2r LoRA on the original weights; a LoRA on some of a
  MultiheadAttention's q, k, v (``attention_projections``) as one on the whole weights, B padded with
  zero rows; the rows of ``trainable_token_indices`` at ``<embedding>.token_adapter.trainable_tokens_delta``;
- IA3: ``<path>.ia3_l``, the scaling vector as (out, 1), or (1, in) for ``feedforward_modules``;
- LoHa, LoKr: the factors under the same names (``<path>.hada_w1_a`` ..., ``<path>.lokr_w1`` ...), on
  ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (PEFT's LoHa and LoKr do not take GPT-2's ``Conv1D`` or
  ``nn.Conv3d``; a LoKr on a Conv1d with a whole W2 is refused, see :func:`_check_lycoris`);
- VeRA: ``<path>.vera_lambda_b`` / ``.vera_lambda_d``, and the shared pair once as ``base_model.vera_A`` /
  ``base_model.vera_B`` unless ``save_projection=False`` (then both sides redraw it from the seed);
- soft prompt (PEFT's prompt tuning, encoder-only and decoder-only models): ``prompt_embeddings``,
  the prompt (tokens x hidden); a sequence classifier's head goes with it, as PEFT's always does;
- prefix (PEFT's prefix tuning, decoder-only LMs, every layer): ``prompt_embeddings``, (tokens x
  layers * 2 * kv_heads * head_dim), each layer's keys then values; PEFT numbers the real tokens
  after the prefix, so only a prefix with ``position_offset=True`` converts (and one read is so).

No pickle is read (``adapter_model.bin`` is refused).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from opendelta.checkpoint import CheckpointContents, StoredCheckpoint, config_from_meta, delta_key, is_checkpoint_folder
from opendelta.checkpoint_files import (
    checkpoint_path,
    read_json,
    read_safetensors,
    read_safetensors_header,
    safetensors_bytes,
    save_folder,
    write_files,
)
from opendelta.errors import CorruptCheckpointError, IncompatibleCheckpointError, OpenDeltaError, PeftFormatError
from opendelta.layer_kinds import layer_kind
from opendelta.linear_maps import pad_rows, update_factors
from opendelta.registry import lookup
from opendelta.targets import targets_at, tied_targets

if TYPE_CHECKING:
    from opendelta.config import DeltaConfig
    from opendelta.delta_base import DeltaBase

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
#: the same for prompt methods, whose PEFT model holds the backbone directly
PROMPT_PREFIX = "base_model."
#: the key of a prompt-learning adapter's one tensor
PROMPT_KEY = "prompt_embeddings"
#: the end of a PEFT LoRA tensor's name -> the name of the same tensor in opendelta's LoRA layer
_LAYER_TENSORS = {
    "lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "magnitude",
    "lora_embedding_A": "lora_embedding_A", "lora_embedding_B": "lora_embedding_B",
}
#: PEFT's wrapper of a MultiheadAttention holds its out_proj's LoRA here
_MHA_OUT = ".base_layer.out_proj"
#: where PEFT's LoRA keeps the rows of ``trainable_token_indices``: under the input embedding's path
_TOKENS = ".token_adapter.trainable_tokens_delta"
_NESTED = re.compile(r"(?P<module>.+?)(?P<nest>(?:\.base_layer)*)")
_FACTOR = re.compile(r"(?P<path>.+)\.(?P<tensor>" + "|".join(map(re.escape, _LAYER_TENSORS)) + ")")
_IA3 = re.compile(r"(?P<path>.+)\.ia3_l")
#: PEFT LoRA options that change the computation in ways opendelta's LoRA does not implement
_UNSUPPORTED_OPTIONS = {
    "lora_bias": "a trainable bias on lora_B",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
}
#: the head modules PEFT's sequence classification model trains and saves with any adapter
_SEQ_CLS_HEADS = ("classifier", "score")
#: transformers head-class name endings -> PEFT task_type (prompt methods need one to insert their prompt)
_TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),  # GPT-2's, GPT-J's ... causal LM heads
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("Model", "FEATURE_EXTRACTION"),
)


@dataclass
class PeftTensors:
    """A PEFT folder's method tensors in opendelta's terms: the delta config values, the module paths,
    the opendelta checkpoint keys with their shapes, and how the stored tensors (by stored name,
    PREFIX stripped) become them. Stored names it does not claim are backbone tensors."""

    config: dict[str, Any]
    modules: list[str]
    shapes: dict[str, tuple[int, ...]]
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    claimed: set[str] = field(default_factory=set)
    #: where the folder names no module paths (prefix tuning: by layer index), these tensors on a given backbone
    bind: Callable[[nn.Module], PeftTensors] | None = None


@dataclass(frozen=True)
class PeftMethod:
    """One method PEFT shares with opendelta: its peft_type, and the two directions of conversion."""

    peft_type: str
    delta_type: str
    #: (delta, its checkpoint tensors) -> (PEFT tensors by stored name without `prefix`, PEFT config fields)
    write: Callable[[DeltaBase, dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], dict[str, Any]]]
    #: (PEFT config, stored shapes by name without `prefix`, config path) -> PeftTensors
    read: Callable[[dict[str, Any], dict[str, tuple[int, ...]], Path], PeftTensors]
    #: what PEFT puts in front of a backbone path: a tuner model wraps it twice, a prompt model once
    prefix: str = PREFIX
    #: (the config read, the tensors, the weights file) -> raise where they disagree, before any layer is built
    check_read: Callable[[Any, PeftTensors, Path], None] = lambda config, tensors, where: None
    #: stored names the write gives whole, without `prefix` (tensors of the PEFT model, not of a backbone module)
    unprefixed: frozenset[str] = frozenset({PROMPT_KEY})


def is_peft_folder(directory: str | os.PathLike) -> bool:
    """Whether `directory` is a PEFT adapter folder rather than an opendelta checkpoint."""
    directory = checkpoint_path(directory, "from_finetuned")
    return (directory / PEFT_CONFIG_NAME).is_file() and not is_checkpoint_folder(directory)


def check_peft_expressible(delta: DeltaBase) -> None:
    """Raise PeftFormatError unless PEFT has `delta`'s method in a form it can load and its extra
    trained tensors are whole modules."""
    method = _by_delta_type(delta.delta_type)
    if method is None:
        why = UNREADABLE.get(_UNCONVERTED.get(delta.delta_type, ""), "")
        raise PeftFormatError(
            f"format='peft' writes {', '.join(repr(m.delta_type) for m in PEFT_METHODS.values())} deltas only; this is a "
            f"{delta.delta_type!r} delta. {why}Save it with the default format='opendelta'."
        )
    _CHECKS.get(method.peft_type, lambda d: None)(delta)
    _modules_to_save(delta)


def _by_delta_type(delta_type: str) -> PeftMethod | None:
    return next((m for m in PEFT_METHODS.values() if m.delta_type == delta_type), None)


def _modules_to_save(delta: DeltaBase) -> list[str]:
    """The backbone modules whose every parameter the delta trains (PEFT's ``modules_to_save``)."""
    trained = set(delta.trained_backbone_tensors())
    owners: list[str] = []
    for name in trained:
        owner = name.rpartition(".")[0]
        if owner not in owners:
            owners.append(owner)
    for owner in owners:
        module = delta.backbone_model.get_submodule(owner)
        whole = {f"{owner}.{n}" for n, _ in module.named_parameters()}
        if not whole <= trained:
            raise PeftFormatError(
                f"the delta trains only part of module {owner!r} ({sorted(trained & whole)}); PEFT can only save "
                "whole modules (modules_to_save). Unfreeze the whole module or save with format='opendelta'."
            )
    return sorted(owners)


def _is_conv1d(delta: DeltaBase) -> bool:
    return any(type(delta.targets[path].module).__name__ == "Conv1D" for path in delta.layers)


# ----------------------------------------------------------------- LoRA


def _write_lora(delta: DeltaBase, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    config = delta.config
    out: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    # a LoRA started from the weight (PiSSA, OLoRA) is written as PEFT writes one converted with
    # path_initial_model_for_weight_conversion: a plain LoRA of rank 2r on the original weights
    factor = 2 if config.data_aware_init else 1
    rank, default_alpha = factor * config.lora_r, _alpha_for(config, factor)
    modules: list[str] = []
    parameters: list[str] = []
    for path, layer in delta.layers.items():
        stored = {name: tensors[delta_key(path, name)] for name in layer.state_dict()}
        if path in getattr(delta, "token_paths", ()):  # trainable_token_indices: PEFT keeps the embedding's rows, not a tied head's
            if "trainable_tokens_delta" in stored:
                out[path + _TOKENS] = stored["trainable_tokens_delta"]
            continue
        names = _peft_weight_names(delta, path, layer)
        if names is not None:  # LoRA on weights the forward reads
            factors = _attention_factors(delta, path, layer, stored) if names[0] == path else [
                (stored[f"lora_A.{i}"], stored[f"lora_B.{i}"]) for i in range(len(names))
            ]
            for peft_name, (lora_A, lora_B) in zip(names, factors):
                out[f"{peft_name}.lora_A.weight"] = lora_A
                out[f"{peft_name}.lora_B.weight"] = lora_B
            if names[0] == path:  # a MultiheadAttention, which PEFT targets as a module
                modules.append(path)
            else:
                parameters += [f"{path}.{p}" for p in layer.parameter_names]
        elif "lora_embedding_A" in stored:
            modules.append(path)
            out[f"{path}.lora_embedding_A"] = stored["lora_embedding_A"]
            out[f"{path}.lora_embedding_B"] = stored["lora_embedding_B"]
        else:
            modules.append(path)
            lora_A, lora_B = update_factors(stored["lora_A"], stored["lora_B"], stored.get("lora_A0"), stored.get("lora_B0"))
            out[f"{path}.lora_A.weight"] = lora_A.contiguous()
            out[f"{path}.lora_B.weight"] = lora_B.contiguous()
        if "magnitude" in stored:
            out[f"{path}.lora_magnitude_vector"] = stored["magnitude"]
        r, _ = config.rank_and_alpha(path)
        alpha = _alpha_for(config, factor, path)
        if factor * r != rank:
            rank_pattern[re.escape(path)] = factor * r
        if alpha != default_alpha:
            alpha_pattern[re.escape(path)] = alpha
    fields = {
        "r": rank,
        "lora_alpha": default_alpha,
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "target_modules": sorted(modules),
        "target_parameters": parameters or None,
        "trainable_token_indices": config.trainable_token_indices,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": _is_conv1d(delta),
        "bias": "none",
        "init_lora_weights": True,
    }
    return out, fields


def _peft_weight_names(delta: DeltaBase, path: str, layer: nn.Module) -> list[str] | None:
    """Where PEFT keeps the factors of each weight of a LoRA on weights (route "weights"), in the
    layer's order (without ``.lora_A.weight``); None for other layers."""
    if layer.route != "weights":
        return None
    names = layer.parameter_names
    module = delta.targets[path].module
    if layer_kind(module) == "attention":
        if module.in_proj_weight is None:
            raise PeftFormatError(
                f"{path!r} is a MultiheadAttention with separate query, key and value weights (kdim or vdim differ from "
                "embed_dim), which PEFT's LoRA does not support; save with format='opendelta'."
            )
        return [path, path + _MHA_OUT]
    return [path + ".base_layer" * (len(names) - 1 - i) for i in range(len(names))]


def _attention_factors(delta: DeltaBase, path: str, layer: nn.Module, stored: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A MultiheadAttention LoRA's factors as PEFT stores them, in_proj's then out_proj's: PEFT's LoRA takes both
    weights whole, so a LoRA on some of q, k, v has its B padded with zero rows (``attention_projections``),
    and a weight left out gets zero factors; each adds exactly what opendelta's adds."""
    module = delta.targets[path].module
    r = stored["lora_A.0"].shape[0]
    factors = []
    for name in ("in_proj_weight", "out_proj.weight"):
        rows, columns = module.get_parameter(name).shape
        if name not in layer.parameter_names:
            like = stored["lora_A.0"]
            factors.append((like.new_zeros(r, columns), like.new_zeros(rows, r)))
            continue
        i = layer.parameter_names.index(name)
        lora_B = stored[f"lora_B.{i}"]
        factors.append((stored[f"lora_A.{i}"], pad_rows(lora_B, layer.rows[name], rows) if name in layer.rows else lora_B))
    return factors


def _check_lora(delta: DeltaBase) -> None:
    """Refuse LoRA layers PEFT would compute otherwise: a convolution's with dilation (PEFT's A is not
    dilated), a MultiheadAttention's with separate query, key and value weights."""
    for path, layer in delta.layers.items():
        if any(d != 1 for d in getattr(layer, "dilation", (1,))):
            raise PeftFormatError(
                f"{path!r} is a dilated convolution (dilation={layer.dilation}); PEFT's LoRA convolution is not dilated, "
                "so it would compute other outputs. Save with format='opendelta'."
            )
        _peft_weight_names(delta, path, layer)


def _alpha_for(config: Any, factor: int, path: str | None = None) -> float:
    """PEFT's lora_alpha that keeps the scaling of the LoRA at `path` (default: of the config's
    defaults) when its rank is multiplied by `factor`."""
    alpha = config.lora_alpha if path is None else config.rank_and_alpha(path)[1]
    if factor == 1:
        return alpha
    return alpha * (math.sqrt(factor) if config.use_rslora else factor)


def _pattern_map(peft: dict[str, Any], key: str, kinds: tuple[type, ...], expected: str, path: Path) -> dict[str, Any] | None:
    """PEFT's rank_pattern / alpha_pattern (regex -> value) as opendelta regex patterns."""
    patterns = _field(peft, key, (dict, type(None)), f"an object of regex -> {expected}", None, path) or {}
    for value in patterns.values():
        _field({key: value}, key, kinds, f"an object of regex -> {expected}", None, path)
    return {"[r]" + k: v for k, v in patterns.items()} or None


def _check_names(peft: dict[str, Any], path: Path, *keys: str) -> None:
    """Fields not used for loading (the tensors say where) but typed: a string, a list of strings or null."""
    for key in keys:
        value = peft.get(key)
        if not (value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise PeftFormatError(f"{path}: {key!r} must be a string, a list of strings or null, got {value!r}.")


def _read_lora(peft: dict[str, Any], stored: dict[str, tuple[int, ...]], path: Path) -> PeftTensors:
    """opendelta's LoRA for a PEFT LoRA: the types of PEFT's fields are checked here (the one place
    that translates them), their values by the config class itself."""
    for option, meaning in _UNSUPPORTED_OPTIONS.items():
        if peft.get(option):
            raise PeftFormatError(
                f"{str(path.parent)!r} is a PEFT LoRA with {option}={peft[option]!r} ({meaning}), which opendelta's LoRA "
                "does not implement; load it with peft.PeftModel.from_pretrained."
            )
    targeted = _field(peft, "target_parameters", (list, type(None)), "a list of parameter names or null", None, path) or []
    _check_names({"target_parameters": targeted}, path, "target_parameters")
    # PEFT's stored name -> (module path, tensor, how deep in PEFT's wrappers: MultiheadAttention's out_proj is "mha")
    found: dict[str, tuple[str, str, int | str]] = {}
    tokens = [name for name in stored if name.endswith(_TOKENS)]
    for name in stored:
        factor = _FACTOR.fullmatch(name)
        if name in tokens:
            continue
        if factor is not None:
            where = factor["path"]
            if where.endswith(_MHA_OUT):
                found[name] = (where[: -len(_MHA_OUT)], factor["tensor"], "mha")
            else:
                nested = _NESTED.fullmatch(where)
                found[name] = (nested["module"], factor["tensor"], nested["nest"].count(".base_layer"))
        elif "lora_" in name:
            raise PeftFormatError(
                f"{path.parent / PEFT_WEIGHTS_NAME} holds {name!r}, a LoRA tensor opendelta does not implement; load it "
                "with peft.PeftModel.from_pretrained."
            )
    attention = {module for module, _, depth in found.values() if depth == "mha"}
    depths: dict[str, int] = {}
    for module, _, depth in found.values():
        if module not in attention:
            depths[module] = max(depths.get(module, 0), depth)  # type: ignore[arg-type]
    on_parameters = {m for m in depths if targeted and _holds_targeted(m, targeted)}
    keys: dict[str, str] = {}
    paths: list[str] = []
    for name, (module, tensor, depth) in found.items():
        if module not in paths:
            paths.append(module)
        ours = _LAYER_TENSORS[tensor]
        if module in attention:  # in_proj first, out_proj second, as WeightLoraLayer orders them
            ours = f"{ours}.{1 if depth == 'mha' else 0}"
        elif module in on_parameters:  # the innermost wrapper holds the module's first parameter
            ours = f"{ours}.{depths[module] - depth}"
        elif depth:
            raise PeftFormatError(f"{path.parent / PEFT_WEIGHTS_NAME} holds {name!r}, nested in PEFT wrappers opendelta does not read.")
        keys[name] = delta_key(module, ours)
    modules = [p for p in paths if p not in on_parameters]
    if not paths:
        raise PeftFormatError(
            f"{path.parent / PEFT_WEIGHTS_NAME} holds no LoRA tensors (no '<module>.lora_A.weight'); it is not a LoRA adapter."
        )
    _check_names(peft, path, "target_modules", "modules_to_save")
    _field(peft, "fan_in_fan_out", (bool,), "true or false", False, path)
    init = _field(peft, "init_lora_weights", (bool, str), "true, false or an initialisation's name", True, path)
    if isinstance(init, str) and init != "gaussian":
        # PEFT rebuilds such a base weight at load (PiSSA, OLoRA, LoftQ...: the folder holds the factors trained
        # on a rewritten weight); loaded as a plain LoRA on the original weight its outputs would be wrong
        raise PeftFormatError(
            f"{path}: this PEFT LoRA was initialised with init_lora_weights={init!r}, so its factors belong to a "
            "rewritten base weight that PEFT recomputes when it loads it. Convert it in PEFT to a plain LoRA on the "
            "original weights, `model.save_pretrained(dir, path_initial_model_for_weight_conversion=initial_dir)`, "
            "and load that folder."
        )
    values = {
        "modified_modules": modules or None,
        "target_parameters": targeted if on_parameters else None,
        "lora_r": _field(peft, "r", (int,), "a positive integer", 8, path),
        "lora_alpha": _field(peft, "lora_alpha", (int, float), "a number", 8, path),
        "lora_dropout": _field(peft, "lora_dropout", (int, float), "a number in [0, 1)", 0.0, path),
        "use_rslora": _field(peft, "use_rslora", (bool,), "true or false", False, path),
        "rank_pattern": _pattern_map(peft, "rank_pattern", (int,), "integer ranks", path),
        "alpha_pattern": _pattern_map(peft, "alpha_pattern", (int, float), "numbers", path),
        "use_dora": _field(peft, "use_dora", (bool,), "true or false", False, path),
        "init_lora_weights": init,
    }
    indices = _field(peft, "trainable_token_indices", (list, dict, type(None)), "a list of token ids", None, path)
    if isinstance(indices, dict) or bool(indices) != bool(tokens) or len(tokens) > 1:
        raise PeftFormatError(
            f"{path}: trainable_token_indices is {indices!r} and {PEFT_WEIGHTS_NAME} holds {len(tokens)} "
            f"'<module>{_TOKENS}' tensor(s); opendelta reads PEFT's list form, the rows of the input embeddings "
            "(one tensor). Load other forms with peft.PeftModel.from_pretrained."
        )
    if not tokens:
        return PeftTensors(values, paths, {keys[n]: stored[n] for n in keys}, lambda t: {keys[n]: t[n] for n in keys}, set(keys))
    embedding = tokens[0][: -len(_TOKENS)]
    values["trainable_token_indices"] = indices
    keys[tokens[0]] = delta_key(embedding, "trainable_tokens_delta")

    def bind(backbone: nn.Module) -> PeftTensors:
        # the modules tied to the embedding (an LM head) follow its rows: PEFT saves none of theirs
        found, _ = targets_at(backbone, [embedding])
        with_tied = [*paths, embedding, *(t.path for t in tied_targets(backbone, found))]
        return PeftTensors(values, with_tied, {keys[n]: stored[n] for n in keys}, lambda t: {keys[n]: t[n] for n in keys}, set(keys))

    return PeftTensors(values, [*paths, embedding], {}, lambda t: {}, set(keys), bind=bind)


def _holds_targeted(module: str, targeted: list[str]) -> bool:
    """Whether PEFT's ``target_parameters`` names a parameter of `module` (its matching: a full name or a tail)."""
    for name in targeted:
        owner = name.rpartition(".")[0]
        if not owner or module == owner or module.endswith("." + owner):
            return True
    return False


def _check_lora_ranks(config: DeltaConfig, tensors: PeftTensors, where: Path) -> None:
    """Before any layer is built: a wrong r must not allocate an r-sized layer first."""
    for path in tensors.modules:
        factor = tensors.shapes.get(delta_key(path, "lora_A"))
        if factor is not None and len(factor) == 2 and factor[0] != config.rank_and_alpha(path)[0]:
            raise CorruptCheckpointError(
                f"{where}: {path}.lora_A has rank {factor[0]}, but {PEFT_CONFIG_NAME} gives it "
                f"r={config.rank_and_alpha(path)[0]} (r and rank_pattern); the folder is damaged or was edited."
            )


# ----------------------------------------------------------------- IA3


def _write_ia3(delta: DeltaBase, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    out: dict[str, torch.Tensor] = {}
    feedforward: list[str] = []
    for path, layer in delta.layers.items():
        scale = tensors[delta_key(path, "scale")]
        if layer.route == "before":
            feedforward.append(path)
        if layer.hidden_dim == 1:  # a convolution's channels: PEFT's (1, n, 1, ...) for input and output alike
            kernel = delta.targets[path].module.weight.dim() - 2
            out[f"{path}.ia3_l"] = scale.reshape(1, -1, *([1] * kernel))
        elif layer.route == "before":  # an input scale: PEFT's feedforward layer, its vector a row
            out[f"{path}.ia3_l"] = scale.reshape(1, -1)
        else:
            out[f"{path}.ia3_l"] = scale.reshape(-1, 1)
    fields = {
        "target_modules": sorted(delta.layers),
        "feedforward_modules": sorted(feedforward),
        "fan_in_fan_out": _is_conv1d(delta),
        "init_ia3_weights": True,
    }
    return out, fields


def _check_ia3(delta: DeltaBase) -> None:
    for path in delta.layers:
        module = delta.targets[path].module
        if isinstance(module, (nn.Embedding, nn.Conv1d, nn.Conv3d)):  # PEFT 0.21.2's IA3 refuses them
            raise PeftFormatError(
                f"{path!r} is an {type(module).__name__}, where PEFT has no IA3 (it takes linear layers and nn.Conv2d); "
                "save with format='opendelta'."
            )


def _read_ia3(peft: dict[str, Any], stored: dict[str, tuple[int, ...]], path: Path) -> PeftTensors:
    _check_names(peft, path, "target_modules", "feedforward_modules", "modules_to_save")
    _field(peft, "fan_in_fan_out", (bool,), "true or false", False, path)
    listed = peft.get("feedforward_modules") or []
    keys: dict[str, str] = {}
    paths: list[str] = []
    feedforward: list[str] = []
    for name, shape in stored.items():
        found = _IA3.fullmatch(name)
        if found is None:
            continue
        module = found["path"]
        conv = len(shape) > 2 and shape[0] == 1 and all(n == 1 for n in shape[2:])  # (1, n, 1, ...): a convolution's
        if not conv and (len(shape) != 2 or 1 not in shape):
            raise CorruptCheckpointError(
                f"{path.parent / PEFT_WEIGHTS_NAME}: {name} has shape {list(shape)}; IA3 stores (n, 1) or (1, n), and "
                "(1, n, 1, ...) for convolutions."
            )
        if conv:
            if _named_in(module, listed):
                feedforward.append(module)
        # PEFT's (1, in) vector scales the input: shape tells, unless it is (1, 1)
        elif shape[0] == 1 and (shape[1] != 1 or _named_in(module, listed)):
            feedforward.append(module)
        paths.append(module)
        keys[name] = delta_key(module, "scale")
    if not paths:
        raise PeftFormatError(f"{path.parent / PEFT_WEIGHTS_NAME} holds no IA3 tensors (no '<module>.ia3_l'); it is not an IA3 adapter.")
    values = {"modified_modules": paths, "feedforward_modules": feedforward or None}
    shapes = {keys[n]: (math.prod(stored[n]),) for n in keys}
    return PeftTensors(values, paths, shapes, lambda t: {keys[n]: t[n].reshape(-1) for n in keys}, set(keys))


def _named_in(path: str, names: str | list[str]) -> bool:
    """PEFT's target matching: a string is a regex over the whole path, a list names path tails."""
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path == n or path.endswith("." + n) for n in names)


# ----------------------------------------------------------------- prompt tuning and prefix tuning


def _task_type(backbone: nn.Module) -> str:
    name = type(backbone).__name__
    found = next((task for ending, task in _TASK_TYPES if name.endswith(ending)), None)
    if found is None:
        raise PeftFormatError(
            f"PEFT inserts prompts only through its task classes (causal LM, sequence or token classification, question "
            f"answering, feature extraction), and a {name} is none of them; save with format='opendelta'."
        )
    return found


def _is_encoder_decoder(backbone: nn.Module) -> bool:
    return bool(getattr(getattr(backbone, "config", None), "is_encoder_decoder", False))


def _text_config(backbone: nn.Module) -> dict[str, Any]:
    config = getattr(backbone, "config", None)
    if config is None:
        raise PeftFormatError(
            f"PEFT's prompt methods need a transformers model (its config gives layers and heads); a "
            f"{type(backbone).__name__} has none. Save with format='opendelta'."
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    values = text.to_dict()
    for name in ("num_hidden_layers", "num_attention_heads"):  # GPT-2 stores them as n_layer, n_head (attribute_map)
        if values.get(name) is None:
            values[name] = getattr(text, name, None)
    return values


def _check_soft_prompt(delta: DeltaBase) -> None:
    if _is_encoder_decoder(delta.backbone_model):
        raise PeftFormatError(
            "PEFT's prompt tuning on an encoder-decoder also prompts the decoder, which opendelta's soft prompt does not; "
            "save this delta with format='opendelta'."
        )
    _task_type(delta.backbone_model)
    _text_config(delta.backbone_model)


def _prompt_fields(backbone: nn.Module, tokens: int, token_dim: int, heads: int) -> dict[str, Any]:
    config = _text_config(backbone)
    return {
        "task_type": _task_type(backbone),
        "num_virtual_tokens": tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": config.get("num_hidden_layers"),
    }


def _write_soft_prompt(delta: DeltaBase, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    (path,) = delta.layers
    prompt = tensors[delta_key(path, "soft_embeds")]
    heads = _text_config(delta.backbone_model).get("num_attention_heads")
    fields = {
        **_prompt_fields(delta.backbone_model, prompt.shape[0], prompt.shape[1], heads),
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
    }
    return {PROMPT_KEY: prompt}, fields


def _prompt_shape(peft: dict[str, Any], stored: dict[str, tuple[int, ...]], path: Path) -> tuple[int, int]:
    if PROMPT_KEY not in stored or len(stored[PROMPT_KEY]) != 2:
        raise PeftFormatError(f"{path.parent / PEFT_WEIGHTS_NAME} holds no 2-D {PROMPT_KEY!r} tensor; it is not a prompt adapter.")
    tokens = _field(peft, "num_virtual_tokens", (int,), "a positive integer", None, path)
    submodules = _field(peft, "num_transformer_submodules", (int, type(None)), "1", 1, path)
    if submodules not in (None, 1):
        raise PeftFormatError(
            f"{path}: num_transformer_submodules={submodules} (an encoder-decoder prompt); opendelta reads the prompts of "
            "encoder-only and decoder-only models. Load it with peft.PeftModel.from_pretrained."
        )
    if stored[PROMPT_KEY][0] != tokens:
        raise CorruptCheckpointError(
            f"{path.parent / PEFT_WEIGHTS_NAME}: {PROMPT_KEY} has {stored[PROMPT_KEY][0]} rows, but num_virtual_tokens is "
            f"{tokens}; the folder is damaged or was edited."
        )
    return tokens, stored[PROMPT_KEY][1]


def _read_soft_prompt(peft: dict[str, Any], stored: dict[str, tuple[int, ...]], path: Path) -> PeftTensors:
    tokens, width = _prompt_shape(peft, stored, path)
    key = delta_key("", "soft_embeds")
    values = {"soft_token_num": tokens}
    return PeftTensors(values, [""], {key: (tokens, width)}, lambda t: {key: t[PROMPT_KEY]}, {PROMPT_KEY})


def _prefix_layers(delta: DeltaBase) -> list[tuple[str, Any]]:
    """The prefix layers of `delta` (path, layer), in the order of their attention layers' index."""
    layers = [(path, layer) for path, layer in delta.layers.items() if hasattr(layer, "binding")]
    return sorted(layers, key=lambda item: item[1].binding.layer_idx)


def _check_prefix(delta: DeltaBase) -> None:
    """PEFT's prefix: a decoder LM's every layer, real tokens numbered after the prefix (position_offset)."""
    if not delta.config.position_offset:
        raise PeftFormatError(
            "PEFT's prefix tuning hands the prefix to the model as a KV cache, so the real tokens take positions "
            "prefix_token_num, ... (RoPE and position embeddings see them shifted); this prefix keeps them at 0, ..., so "
            "PEFT would compute other outputs. Train the prefix with position_offset=True to share it with PEFT, or save "
            "with format='opendelta'."
        )
    if _is_encoder_decoder(delta.backbone_model) or _task_type(delta.backbone_model) != "CAUSAL_LM":
        raise PeftFormatError(
            f"format='peft' writes prefixes of decoder-only language models (PEFT's CAUSAL_LM), and a "
            f"{type(delta.backbone_model).__name__} is not one; save with format='opendelta'."
        )
    layers = _prefix_layers(delta)
    count = _text_config(delta.backbone_model).get("num_hidden_layers")
    indexes = [layer.binding.layer_idx for _, layer in layers]
    shapes = {(layer.kv_heads, layer.head_dim) for _, layer in layers}
    if indexes != list(range(count or 0)) or len(shapes) != 1:
        raise PeftFormatError(
            f"PEFT's prefix tuning prefixes all {count} attention layers with keys of one shape; this delta prefixes "
            f"layers {indexes} with (kv heads, head dim) {sorted(shapes)}. Address every layer's attention, or save with "
            "format='opendelta'."
        )


def _write_prefix(delta: DeltaBase, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """PEFT's ``prompt_embeddings``: (tokens, layers x 2 x kv_heads x head_dim), each layer's keys then values,
    as PEFT stores a prefix with or without its projection (the projection's output)."""
    columns = []
    for path, layer in _prefix_layers(delta):
        own = {name: tensors[delta_key(path, name)] for name in layer.state_dict()}
        with torch.no_grad():  # the layer's function of the (gathered) tensors: its prefix, or its MLP's output
            columns.append(torch.func.functional_call(layer, own, ()))
    prefix = torch.cat(columns, dim=1).contiguous()
    first = _prefix_layers(delta)[0][1]
    width = first.kv_heads * first.head_dim
    fields = {
        **_prompt_fields(delta.backbone_model, prefix.shape[0], width, first.kv_heads),
        "encoder_hidden_size": width,
        "prefix_projection": False,
    }
    return {PROMPT_KEY: prefix}, fields


def _read_prefix(peft: dict[str, Any], stored: dict[str, tuple[int, ...]], path: Path) -> PeftTensors:
    """PEFT's prefix as opendelta's (direct prefixes, ``position_offset=True``); the layers' paths come from the backbone."""
    tokens, width = _prompt_shape(peft, stored, path)
    task = peft.get("task_type")
    if task != "CAUSAL_LM":
        raise PeftFormatError(
            f"{path}: a PEFT prefix with task_type={task!r}; opendelta reads the prefixes of decoder-only language models "
            "(CAUSAL_LM). Load it with peft.PeftModel.from_pretrained."
        )
    layers = _field(peft, "num_layers", (int,), "a positive integer", None, path)
    token_dim = _field(peft, "token_dim", (int,), "a positive integer", None, path)
    if layers < 1 or token_dim < 1 or width != layers * 2 * token_dim:
        raise CorruptCheckpointError(
            f"{path.parent / PEFT_WEIGHTS_NAME}: {PROMPT_KEY} has {width} columns, but num_layers={layers} and "
            f"token_dim={token_dim} make {layers * 2 * token_dim} (layers x keys and values x token_dim); the folder "
            "is damaged or was edited."
        )
    values = {"prefix_token_num": tokens, "reparameterize": False, "position_offset": True}

    def bind(backbone: nn.Module) -> PeftTensors:
        try:
            by_index = lookup("prefix")[1].attention_by_layer(backbone)  # type: ignore[attr-defined]
        except OpenDeltaError as exc:
            raise IncompatibleCheckpointError(f"{path.parent} holds a PEFT prefix, but {exc}") from exc
        if sorted(by_index) != list(range(layers)):
            raise IncompatibleCheckpointError(
                f"{path.parent} holds a PEFT prefix for {layers} attention layers; this {type(backbone).__name__} has "
                f"{len(by_index)} (layer indexes {sorted(by_index)})."
            )
        paths = [by_index[i] for i in range(layers)]
        keys = {p: delta_key(p, "prefix") for p in paths}
        step = 2 * token_dim

        def convert(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {keys[p]: t[PROMPT_KEY][:, i * step : (i + 1) * step].contiguous() for i, p in enumerate(paths)}

        shapes = {keys[p]: (tokens, step) for p in paths}
        return PeftTensors({**values, "modified_modules": paths}, [*paths, ""], shapes, convert, {PROMPT_KEY})

    return PeftTensors(values, [], {}, lambda t: {}, {PROMPT_KEY}, bind=bind)


# ----------------------------------------------------------------- LoHa, LoKr (PEFT's LyCORIS methods), VeRA

#: peft_type -> the tensor names of its layers (opendelta's layers use the same names)
_LAYER_NAMES = {
    "LOHA": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "LOKR": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    "VERA": ("vera_lambda_b", "vera_lambda_d"),
}
#: LyCORIS tensors of CP-decomposed kernels (PEFT's use_effective_conv2d), which opendelta's LoHa and LoKr do not implement
_CONV_NAMES = ("hada_t1", "hada_t2", "lokr_t2")
#: peft_type -> its config fields beyond the LyCORIS ones, same name in both configs: (types, expected, default)
_LYCORIS_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], str, Any]]] = {
    "LOHA": {},
    "LOKR": {
        "decompose_both": ((bool,), "true or false", False),
        "decompose_factor": ((int,), "-1, 0 or a positive integer", -1),
        "rank_dropout_scale": ((bool,), "true or false", False),
    },
}
#: VeRA's shared pair: PEFT's stored name -> the key under each opendelta layer
_VERA_PAIR = {"base_model.vera_A": "projection.vera_A", "base_model.vera_B": "projection.vera_B"}


def check_peft_convolutions(delta: DeltaBase, dims: tuple[int, ...], grouped: bool = True, dilated: bool = True) -> None:
    """PeftFormatError unless each convolution `delta` acts on is one PEFT's same method computes the same on:
    `dims` spatial dimensions, and groups > 1 or dilation > 1 only where PEFT handles them."""
    for path in delta.layers:
        module = delta.targets[path].module
        if layer_kind(module) != "conv":
            continue
        size = module.weight.dim() - 2
        problem = (
            f"a {type(module).__name__}" if size not in dims
            else f"a convolution with groups={module.groups}" if not grouped and module.groups != 1
            else f"a convolution with dilation={module.dilation}" if not dilated and any(d != 1 for d in module.dilation)
            else None
        )
        if problem:
            kinds = ", ".join(f"Conv{d}d" for d in dims)
            raise PeftFormatError(
                f"{path!r} is {problem}, and PEFT's {delta.delta_type} takes only {kinds} convolutions"
                f"{'' if grouped else ' without groups'}{'' if dilated else ' without dilation'}, so "
                "peft.PeftModel.from_pretrained could not load this delta; save it with format='opendelta'."
            )


def _check_lycoris(delta: DeltaBase) -> None:
    if _is_conv1d(delta):
        raise PeftFormatError(
            f"PEFT's {delta.delta_type} takes nn.Linear, Conv1d and Conv2d layers but not GPT-2's Conv1D, so "
            "peft.PeftModel.from_pretrained could not load this delta; save it with format='opendelta'."
        )
    check_peft_convolutions(delta, (1, 2))
    for path, layer in delta.layers.items():
        if getattr(layer, "full_w2", False) and layer.lokr_w2.dim() == 3:
            raise PeftFormatError(_LOKR_CONV1D.format(where=repr(path)))


#: PEFT 0.21.2 forms a Conv1d LoKr's change with a whole (b, d, kernel) W2 as torch.kron(W1, W2), which lines W1
#: up with W2's last two axes instead of its first two (make_kron unsqueezes W1 only for a 4-D W2)
_LOKR_CONV1D = (
    "{where} is a LoKr on an nn.Conv1d whose W2 is whole (r >= half its size), and PEFT 0.21.2 computes that change "
    "with W1 and W2 misaligned (its make_kron pairs a 2-D W1 with the last two axes of a 3-D W2), so the outputs would "
    "differ; use a smaller r (W2 then is W2_a @ W2_b, which PEFT computes as opendelta does) or format='opendelta'."
)


def _layer_tensors(delta: DeltaBase, tensors: dict[str, torch.Tensor], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Each layer's tensors among `names`, by PEFT's stored name ``<path>.<name>``."""
    return {f"{path}.{n}": tensors[delta_key(path, n)] for path, layer in delta.layers.items() for n in layer.state_dict() if n in names}


def _write_lycoris(delta: DeltaBase, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    config = delta.config
    peft_type = _by_delta_type(delta.delta_type).peft_type  # type: ignore[union-attr]
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for path in delta.layers:
        r, alpha = config.rank_and_alpha(path)
        if r != config.r:
            rank_pattern[re.escape(path)] = r
        if alpha != config.alpha:
            alpha_pattern[re.escape(path)] = alpha
    fields = {
        "r": config.r, "alpha": config.alpha, "rank_dropout": config.rank_dropout, "module_dropout": config.module_dropout,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "target_modules": sorted(delta.layers),
        "init_weights": config.init_weights, "use_effective_conv2d": False,
    }
    fields.update({name: getattr(config, name) for name in _LYCORIS_FIELDS[peft_type]})
    return _layer_tensors(delta, tensors, _LAYER_NAMES[peft_type]), fields


def _read_lycoris(peft_type: str) -> Callable[[dict[str, Any], dict[str, tuple[int, ...]], Path], PeftTensors]:
    """The reader of PEFT's LoHa or LoKr folders: the factors keep their names; the shapes the config
    implies are checked against the file when the layers are built."""

    def read(peft: dict[str, Any], stored: dict[str, tuple[int, ...]], path: Path) -> PeftTensors:
        conv = [n for n in stored if n.rpartition(".")[2] in _CONV_NAMES]
        if conv:
            raise PeftFormatError(
                f"{path.parent / PEFT_WEIGHTS_NAME} holds {conv[0]!r}, a {peft_type} tensor of a convolution's kernel in "
                "CP form (PEFT's use_effective_conv2d=True), which opendelta does not implement (it takes the flattened "
                "kernel, use_effective_conv2d=False); load it with peft.PeftModel.from_pretrained."
            )
        keys, paths = _named_layer_tensors(stored, _LAYER_NAMES[peft_type], peft_type, path)
        whole_3d = [n for n in stored if n.endswith(".lokr_w2") and len(stored[n]) == 3]
        if whole_3d:
            raise PeftFormatError(_LOKR_CONV1D.format(where=f"{path.parent / PEFT_WEIGHTS_NAME}: {whole_3d[0]!r}"))
        _check_names(peft, path, "target_modules", "exclude_modules", "modules_to_save")
        values = {
            "modified_modules": paths,
            "r": _field(peft, "r", (int,), "a positive integer", 8, path),
            "alpha": _field(peft, "alpha", (int, float), "a number", 8, path),
            "rank_dropout": _field(peft, "rank_dropout", (int, float), "a number in [0, 1)", 0.0, path),
            "module_dropout": _field(peft, "module_dropout", (int, float), "a number in [0, 1)", 0.0, path),
            "rank_pattern": _pattern_map(peft, "rank_pattern", (int,), "integer ranks", path),
            "alpha_pattern": _pattern_map(peft, "alpha_pattern", (int, float), "numbers", path),
        }
        values.update({name: _field(peft, name, *rule, path) for name, rule in _LYCORIS_FIELDS[peft_type].items()})
        return PeftTensors(values, paths, {keys[n]: stored[n] for n in keys}, lambda t: {keys[n]: t[n] for n in keys}, set(keys))

    return read


def _named_layer_tensors(
    stored: dict[str, tuple[int, ...]], names: tuple[str, ...], peft_type: str, path: Path
) -> tuple[dict[str, str], list[str]]:
    """Stored name -> opendelta checkpoint key for the tensors ``<module path>.<name>`` with `names`, and the
    module paths in the order the file lists them; PeftFormatError when there are none."""
    keys: dict[str, str] = {}
    paths: list[str] = []
    for name in stored:
        module, _, leaf = name.rpartition(".")
        if module and leaf in names:
            keys[name] = delta_key(module, leaf)
            if module not in paths:
                paths.append(module)
    if not paths:
        raise PeftFormatError(
            f"{path.parent / PEFT_WEIGHTS_NAME} holds no {peft_type} tensors (no '<module>.{names[0]}'); it is not a "
            f"{peft_type} adapter."
        )
    return keys, paths


def _write_vera(delta: DeltaBase, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    config = delta.config
    out = _layer_tensors(delta, tensors, _LAYER_NAMES["VERA"])
    if config.save_projection:  # the pair is stored once, under the first layer's key (checkpoint.shared_keys)
        first = next(iter(delta.layers))
        out.update({name: tensors[delta_key(first, key)] for name, key in _VERA_PAIR.items()})
    fields = {
        "r": config.r, "projection_prng_key": config.projection_prng_key, "save_projection": config.save_projection,
        "vera_dropout": config.vera_dropout, "d_initial": config.d_initial, "target_modules": sorted(delta.layers),
        "fan_in_fan_out": _is_conv1d(delta), "bias": "none", "init_weights": True,
    }
    return out, fields


def _read_vera(peft: dict[str, Any], stored: dict[str, tuple[int, ...]], path: Path) -> PeftTensors:
    keys, paths = _named_layer_tensors(stored, _LAYER_NAMES["VERA"], "VERA", path)
    _check_names(peft, path, "target_modules", "modules_to_save")
    _field(peft, "fan_in_fan_out", (bool,), "true or false", False, path)
    save_projection = _field(peft, "save_projection", (bool,), "true or false", True, path)
    pair = [name for name in _VERA_PAIR if name in stored]
    if save_projection and len(pair) != len(_VERA_PAIR):
        raise CorruptCheckpointError(
            f"{path}: save_projection is true, but {path.parent / PEFT_WEIGHTS_NAME} lacks "
            f"{sorted(set(_VERA_PAIR) - set(pair))}; the folder is damaged or was edited."
        )
    shared = {name: [delta_key(module, _VERA_PAIR[name]) for module in paths] for name in pair} if save_projection else {}
    values = {
        "modified_modules": paths,
        "r": _field(peft, "r", (int,), "a positive integer", 256, path),
        "projection_prng_key": _field(peft, "projection_prng_key", (int,), "an integer >= 0", 0, path),
        "save_projection": save_projection,
        "vera_dropout": _field(peft, "vera_dropout", (int, float), "a number in [0, 1)", 0.0, path),
        "d_initial": _field(peft, "d_initial", (int, float), "a number", 0.1, path),
    }
    shapes = {keys[n]: stored[n] for n in keys} | {key: stored[name] for name, ks in shared.items() for key in ks}

    def convert(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # every layer holds the one shared pair, so each layer's key gets the same tensor
        return {keys[n]: t[n] for n in keys} | {key: t[name] for name, ks in shared.items() for key in ks}

    # a pair stored although save_projection is false is left unclaimed: PEFT ignores it, and so does opendelta
    return PeftTensors(values, paths, shapes, convert, set(keys) | set(pair))


#: PEFT's peft_type -> how opendelta's method with the same tensors converts
PEFT_METHODS: dict[str, PeftMethod] = {
    "LORA": PeftMethod("LORA", "lora", _write_lora, _read_lora, check_read=_check_lora_ranks),
    "IA3": PeftMethod("IA3", "ia3", _write_ia3, _read_ia3),
    "LOHA": PeftMethod("LOHA", "loha", _write_lycoris, _read_lycoris("LOHA")),
    "LOKR": PeftMethod("LOKR", "lokr", _write_lycoris, _read_lycoris("LOKR")),
    "VERA": PeftMethod("VERA", "vera", _write_vera, _read_vera, unprefixed=frozenset(_VERA_PAIR)),
    "PROMPT_TUNING": PeftMethod("PROMPT_TUNING", "soft_prompt", _write_soft_prompt, _read_soft_prompt, PROMPT_PREFIX),
    "PREFIX_TUNING": PeftMethod("PREFIX_TUNING", "prefix", _write_prefix, _read_prefix, PROMPT_PREFIX),
}
#: PEFT methods opendelta has but cannot convert exactly, and why
UNREADABLE: dict[str, str] = {}
#: opendelta delta_type -> the PEFT method of that name it cannot be converted to
_UNCONVERTED: dict[str, str] = {}
#: peft_type -> the check a delta must pass before any rank gathers tensors
_CHECKS: dict[str, Callable[[DeltaBase], Any]] = {
    "PROMPT_TUNING": _check_soft_prompt, "LORA": _check_lora, "IA3": _check_ia3, "PREFIX_TUNING": _check_prefix,
    "LOHA": _check_lycoris, "LOKR": _check_lycoris,
}
#: PEFT's peft_type -> the opendelta delta_type with the same tensors (found through the registry)
PEFT_TYPES = {m.peft_type: m.delta_type for m in PEFT_METHODS.values()}


def register_peft_method(method: PeftMethod, check: Callable[[DeltaBase], Any] | None = None) -> None:
    """Add a row to :data:`PEFT_METHODS` from the method's own file (a method is one file), with the
    check a delta must pass before it is written (`check`, raising PeftFormatError)."""
    PEFT_METHODS[method.peft_type] = method
    PEFT_TYPES[method.peft_type] = method.delta_type
    if check is not None:
        _CHECKS[method.peft_type] = check


def peft_field(peft: dict[str, Any], key: str, kinds: tuple[type, ...], expected: str, default: Any, path: Path) -> Any:
    """For the methods' own readers: `peft[key]`, typed (see :func:`_field`)."""
    return _field(peft, key, kinds, expected, default, path)


# ----------------------------------------------------------------- the folder


def write_peft_checkpoint(delta: DeltaBase, directory: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `delta` (`tensors` from its checkpoint, gathered) as a PEFT adapter folder."""
    method = _by_delta_type(delta.delta_type)
    assert method is not None  # check_peft_expressible ran first
    own, fields = method.write(delta, tensors)
    tensors_out = {name if name in method.unprefixed else method.prefix + name: t for name, t in own.items()}
    for name in delta.trained_backbone_tensors():
        tensors_out[method.prefix + name] = tensors[f"backbone.{name}"]
    modules_to_save = _modules_to_save(delta)
    if fields.get("task_type") == "SEQ_CLS":  # PEFT's classifier model always trains (so saves and loads) the head
        heads = [p for p, m in delta.backbone_model.named_modules() if p.rpartition(".")[2] in _SEQ_CLS_HEADS]
        for path in heads:
            for name, param in delta.backbone_model.get_submodule(path).named_parameters():
                tensors_out.setdefault(f"{method.prefix}{path}.{name}", param.detach())
        modules_to_save = sorted({*modules_to_save, *heads})
    backbone_config = getattr(delta.backbone_model, "config", None)
    peft_config: dict[str, Any] = {
        "peft_type": method.peft_type,
        "task_type": None,
        "base_model_name_or_path": getattr(backbone_config, "_name_or_path", None) or None,
        **fields,
        "modules_to_save": modules_to_save or None,
        "inference_mode": True,
        "auto_mapping": {"base_model_class": type(delta.backbone_model).__name__, "producer": "opendelta"},
    }
    data, sha256 = safetensors_bytes(tensors_out)
    # PEFT's two file names are fixed, so a save killed between them could pair new weights with the
    # old config; the checksum (in a field PEFT ignores) lets opendelta detect that pairing
    peft_config["auto_mapping"]["weights_sha256"] = sha256
    config = (json.dumps(peft_config, indent=2, allow_nan=False) + "\n").encode("utf-8")
    directory = save_folder(directory)
    write_files(directory, [(PEFT_WEIGHTS_NAME, data), (PEFT_CONFIG_NAME, config)])
    return directory


def _field(peft: dict[str, Any], key: str, kinds: tuple[type, ...], expected: str, default: Any, path: Path) -> Any:
    """`peft[key]` if it is one of `kinds` (never a bool standing in for a number, nor a string for
    a bool, nor a non-finite float), `default` if absent; else PeftFormatError naming the field."""
    value = peft.get(key, default)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (
        not isinstance(value, kinds)
        or (isinstance(value, bool) and bool not in kinds)
        or (number and not math.isfinite(value))
    ):
        raise PeftFormatError(
            f"{path}: {key!r} must be {expected}, got {value!r}; fix the adapter config (PEFT writes it this way)."
        )
    return value


def read_peft_checkpoint(directory: str | os.PathLike, *, verify: bool = True) -> CheckpointContents:
    """Translate a PEFT adapter folder into opendelta's terms, reading only its config and its
    tensors' header; the tensor data is read by the returned checkpoint's ``stored.load``.

    Other PEFT methods and variants opendelta does not implement raise PeftFormatError naming
    them. The checksum
    opendelta records when it writes a PEFT folder is verified unless verify=False.
    """
    directory = checkpoint_path(directory, "from_finetuned")
    config_path = directory / PEFT_CONFIG_NAME
    peft = read_json(config_path, PeftFormatError)
    if not isinstance(peft, dict):
        raise PeftFormatError(f"{config_path} must hold a JSON object (PEFT's adapter config), got {type(peft).__name__}.")
    name = peft.get("peft_type")
    method = PEFT_METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        why = UNREADABLE.get(name, "") if isinstance(name, str) else ""  # an edited file may hold any JSON there
        raise PeftFormatError(
            f"{str(directory)!r} holds a PEFT {name!r} adapter; {why} opendelta reads PEFT {', '.join(PEFT_METHODS)} adapters. "
            "Load it with peft.PeftModel.from_pretrained, or train the method with opendelta's own class."
        )
    mapping = _field(peft, "auto_mapping", (dict, type(None)), "an object or null", None, config_path) or {}
    trained_on = mapping.get("base_model_class") or "PEFT base model"
    # PEFT records no checksum; a folder opendelta wrote carries one (see write_peft_checkpoint)
    sha256 = mapping.get("weights_sha256") if verify and mapping.get("producer") == "opendelta" else None
    if not isinstance(trained_on, str) or not isinstance(sha256, (str, type(None))):
        raise PeftFormatError(f"{config_path}: 'auto_mapping' holds {mapping!r}; its values must be strings.")
    weights = directory / PEFT_WEIGHTS_NAME
    if not weights.is_file():
        raise PeftFormatError(
            f"{str(directory)!r} has no {PEFT_WEIGHTS_NAME} (a pickled adapter_model.bin is not loaded, because "
            "unpickling runs code); re-save the adapter with safe_serialization=True."
        )
    stored, size = read_safetensors_header(weights)
    names: dict[str, str] = {}  # stored name -> the name without the method's prefix
    for stored_name in stored:
        short = stored_name[len(method.prefix) :] if stored_name.startswith(method.prefix) else stored_name
        if short in names.values():
            raise CorruptCheckpointError(f"{weights} holds the tensor {short!r} twice (with and without {method.prefix!r}).")
        names[stored_name] = short
    shapes_by_name = {names[k]: tuple(v) for k, v in stored.items()}

    def contents(own: PeftTensors) -> CheckpointContents:
        # PEFT saves a LoRA embedding's whole base weight (for a resized vocabulary) inside its wrapper
        unwrapped = {n: n.replace(".base_layer.", ".") for n in shapes_by_name if n not in own.claimed}
        backbone_names = {unwrapped[n]: list(shapes_by_name[n]) for n in unwrapped}
        config_cls, delta_cls = lookup(method.delta_type)
        config = config_from_meta({"delta_type": method.delta_type, "config": own.config}, config_cls)
        method.check_read(config, own, weights)
        shapes = {**own.shapes, **{f"backbone.{n}": tuple(shape) for n, shape in backbone_names.items()}}

        def load(device: torch.device | str) -> dict[str, torch.Tensor]:
            by_name = {names[k]: v for k, v in read_safetensors(weights, size, sha256, device).items()}
            return {**own.convert(by_name), **{f"backbone.{ours}": by_name[n] for n, ours in unwrapped.items()}}

        return CheckpointContents(
            delta_class=delta_cls,
            config=config,
            modules=own.modules,
            stored=StoredCheckpoint(meta=peft, shapes=shapes, load=load),
            backbone_tensors=backbone_names,
            trained_on=trained_on,
            for_backbone=None if own.bind is None else lambda backbone: contents(own.bind(backbone)),  # type: ignore[misc]
        )

    return contents(method.read(peft, shapes_by_name, config_path))
