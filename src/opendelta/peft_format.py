"""The PEFT adapter format: write folders ``peft.PeftModel.from_pretrained`` loads, read PEFT's (LoRA today).

A PEFT LoRA folder is ``adapter_config.json`` plus ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (and, for
``modules_to_save``, ``base_model.model.<parameter path>``). opendelta's LoRA stores the same
factors (A: r x in, B: out x r, scaling alpha/r or alpha/sqrt(r)), so conversion only renames
keys and translates the config; DoRA's magnitudes (``use_dora``) are PEFT's ``lora_magnitude_vector``.
No pickle is read (``adapter_model.bin`` is refused).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

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
from opendelta.errors import CorruptCheckpointError, PeftFormatError
from opendelta.linear_maps import update_factors
from opendelta.registry import lookup

if TYPE_CHECKING:
    from opendelta.config import DeltaConfig
    from opendelta.delta_base import DeltaBase

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
#: PEFT's peft_type -> the opendelta delta_type with the same tensors (found through the registry)
PEFT_TYPES = {"LORA": "lora"}
#: the end of a PEFT LoRA tensor's name -> the name of the same tensor in opendelta's LoRA layer
_LAYER_TENSORS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "magnitude"}
_FACTOR = re.compile(r"(?P<path>.+)\.(?P<tensor>" + "|".join(map(re.escape, _LAYER_TENSORS)) + ")")
#: PEFT LoRA options that change the computation in ways opendelta's LoRA does not implement
_UNSUPPORTED_OPTIONS = {
    "lora_bias": "a trainable bias on lora_B",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on nn.Parameter targets",
    "alora_invocation_tokens": "activated LoRA",
    "use_qalora": "QA-LoRA",
    "trainable_token_indices": "trainable tokens",
    "use_bdlora": "block-diagonal LoRA",
}


def is_peft_folder(directory: str | os.PathLike) -> bool:
    """Whether `directory` is a PEFT adapter folder rather than an opendelta checkpoint."""
    directory = checkpoint_path(directory, "from_finetuned")
    return (directory / PEFT_CONFIG_NAME).is_file() and not is_checkpoint_folder(directory)


def check_peft_expressible(delta: DeltaBase) -> None:
    """Raise PeftFormatError unless PEFT has `delta`'s method and its extra trained tensors are whole modules."""
    if delta.delta_type not in PEFT_TYPES.values():
        raise PeftFormatError(
            f"format='peft' writes {', '.join(map(repr, PEFT_TYPES.values()))} deltas only; this is a "
            f"{delta.delta_type!r} delta. Save it with the default format='opendelta'."
        )
    _modules_to_save(delta)


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


def write_peft_checkpoint(delta: DeltaBase, directory: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `delta` (a LoRA; `tensors` from its checkpoint, gathered) as a PEFT adapter folder."""
    config = delta.config
    tensors_out: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    conv1d = False
    # a LoRA started from the weight (PiSSA, OLoRA) is written as PEFT writes one converted with
    # path_initial_model_for_weight_conversion: a plain LoRA of rank 2r on the original weights
    factor = 2 if config.data_aware_init else 1
    rank, default_alpha = factor * config.lora_r, _alpha_for(config, factor)
    for path, layer in delta.layers.items():
        stored = {name: tensors[delta_key(path, name)] for name in layer.state_dict()}
        lora_A, lora_B = update_factors(stored["lora_A"], stored["lora_B"], stored.get("lora_A0"), stored.get("lora_B0"))
        tensors_out[f"{PREFIX}{path}.lora_A.weight"] = lora_A.contiguous()
        tensors_out[f"{PREFIX}{path}.lora_B.weight"] = lora_B.contiguous()
        if "magnitude" in stored:
            tensors_out[f"{PREFIX}{path}.lora_magnitude_vector"] = stored["magnitude"]
        r, _ = config.rank_and_alpha(path)
        alpha = _alpha_for(config, factor, path)
        if factor * r != rank:
            rank_pattern[re.escape(path)] = factor * r
        if alpha != default_alpha:
            alpha_pattern[re.escape(path)] = alpha
        conv1d = conv1d or type(delta.targets[path].module).__name__ == "Conv1D"
    for name in delta.trained_backbone_tensors():
        tensors_out[PREFIX + name] = tensors[f"backbone.{name}"]
    modules_to_save = _modules_to_save(delta)
    backbone_config = getattr(delta.backbone_model, "config", None)
    peft_config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(backbone_config, "_name_or_path", None) or None,
        "r": rank,
        "lora_alpha": default_alpha,
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "target_modules": sorted(delta.layers),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": conv1d,
        "modules_to_save": modules_to_save or None,
        "bias": "none",
        "init_lora_weights": True,
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


def _alpha_for(config: Any, factor: int, path: str | None = None) -> float:
    """PEFT's lora_alpha that keeps the scaling of the LoRA at `path` (default: of the config's
    defaults) when its rank is multiplied by `factor`."""
    alpha = config.lora_alpha if path is None else config.rank_and_alpha(path)[1]
    if factor == 1:
        return alpha
    return alpha * (math.sqrt(factor) if config.use_rslora else factor)


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


def _pattern_map(peft: dict[str, Any], key: str, kinds: tuple[type, ...], expected: str, path: Path) -> dict[str, Any] | None:
    """PEFT's rank_pattern / alpha_pattern (regex -> value) as opendelta regex patterns."""
    patterns = _field(peft, key, (dict, type(None)), f"an object of regex -> {expected}", None, path) or {}
    for value in patterns.values():
        _field({key: value}, key, kinds, f"an object of regex -> {expected}", None, path)
    return {"[r]" + k: v for k, v in patterns.items()} or None


def _lora_config(peft: dict[str, Any], paths: list[str], path: Path, config_cls: type[DeltaConfig]) -> DeltaConfig:
    """opendelta's LoRA config (`config_cls`) for PEFT's config: the types of PEFT's fields are
    checked here (the one place that translates them), their values by the config class itself."""
    r = _field(peft, "r", (int,), "a positive integer", 8, path)
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
        "modified_modules": paths,
        "lora_r": r,
        "lora_alpha": _field(peft, "lora_alpha", (int, float), "a number", 8, path),
        "lora_dropout": _field(peft, "lora_dropout", (int, float), "a number in [0, 1)", 0.0, path),
        "use_rslora": _field(peft, "use_rslora", (bool,), "true or false", False, path),
        "use_dora": _field(peft, "use_dora", (bool,), "true or false", False, path),
        "init_lora_weights": init,
        "rank_pattern": _pattern_map(peft, "rank_pattern", (int,), "integer ranks", path),
        "alpha_pattern": _pattern_map(peft, "alpha_pattern", (int, float), "numbers", path),
    }
    for key in ("target_modules", "modules_to_save"):  # not used for loading (the tensors say where), but typed
        value = peft.get(key)
        if not (value is None or isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise PeftFormatError(f"{path}: {key!r} must be a string, a list of strings or null, got {value!r}.")
    _field(peft, "fan_in_fan_out", (bool,), "true or false", False, path)
    return config_from_meta({"delta_type": config_cls.delta_type, "config": values}, config_cls)


def read_peft_checkpoint(directory: str | os.PathLike, *, verify: bool = True) -> CheckpointContents:
    """Translate a PEFT LoRA folder into opendelta's terms, reading only its config and its
    tensors' header; the tensor data is read by the returned checkpoint's ``stored.load``.

    Other PEFT methods and LoRA variants opendelta does not implement raise PeftFormatError naming
    them. The checksum opendelta records when it writes a PEFT folder is verified unless verify=False.
    """
    directory = checkpoint_path(directory, "from_finetuned")
    config_path = directory / PEFT_CONFIG_NAME
    peft = read_json(config_path, PeftFormatError)
    if not isinstance(peft, dict):
        raise PeftFormatError(f"{config_path} must hold a JSON object (PEFT's adapter config), got {type(peft).__name__}.")
    method = peft.get("peft_type")
    if not isinstance(method, str) or method not in PEFT_TYPES:
        raise PeftFormatError(
            f"{str(directory)!r} holds a PEFT {method!r} adapter; opendelta reads PEFT LoRA adapters only. "
            "Load it with peft.PeftModel.from_pretrained, or train the method with opendelta's own class."
        )
    for option, meaning in _UNSUPPORTED_OPTIONS.items():
        if peft.get(option):
            raise PeftFormatError(
                f"{str(directory)!r} is a PEFT LoRA with {option}={peft[option]!r} ({meaning}), which opendelta's LoRA "
                "does not implement; load it with peft.PeftModel.from_pretrained."
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

    keys: dict[str, str] = {}  # stored name -> opendelta checkpoint key
    paths: list[str] = []
    backbone_names: dict[str, Any] = {}
    for stored_name, shape in stored.items():
        name = stored_name[len(PREFIX) :] if stored_name.startswith(PREFIX) else stored_name
        factor = _FACTOR.fullmatch(name)
        if factor is not None:
            if factor["path"] not in paths:
                paths.append(factor["path"])
            key = delta_key(factor["path"], _LAYER_TENSORS[factor["tensor"]])
        elif "lora_" in name:
            raise PeftFormatError(
                f"{weights} holds {stored_name!r}, a LoRA tensor opendelta does not implement (LoRA on embeddings or "
                "convolutions); load it with peft.PeftModel.from_pretrained."
            )
        else:
            key = f"backbone.{name}"
            backbone_names[name] = list(shape)
        if key in keys.values():
            raise CorruptCheckpointError(f"{weights} holds the tensor {name!r} twice (with and without {PREFIX!r}).")
        keys[stored_name] = key
    if not paths:
        raise PeftFormatError(f"{weights} holds no LoRA tensors (no '<module>.lora_A.weight'); it is not a LoRA adapter.")
    config_cls, delta_cls = lookup(PEFT_TYPES[method])
    config = _lora_config(peft, paths, config_path, config_cls)
    shapes = {keys[k]: shape for k, shape in stored.items()}
    for path in paths:  # before any layer is built: a wrong r must not allocate an r-sized layer first
        factor = shapes.get(delta_key(path, "lora_A"))
        if factor is not None and len(factor) == 2 and factor[0] != config.rank_and_alpha(path)[0]:
            raise CorruptCheckpointError(
                f"{weights}: {path}.lora_A has rank {factor[0]}, but {PEFT_CONFIG_NAME} gives it "
                f"r={config.rank_and_alpha(path)[0]} (r and rank_pattern); the folder is damaged or was edited."
            )

    def load(device: torch.device | str) -> dict[str, torch.Tensor]:
        return {keys[k]: v for k, v in read_safetensors(weights, size, sha256, device).items()}

    return CheckpointContents(
        delta_class=delta_cls,
        config=config,
        modules=paths,
        stored=StoredCheckpoint(meta=peft, shapes=shapes, load=load),
        backbone_tensors=backbone_names,
        trained_on=trained_on,
    )
