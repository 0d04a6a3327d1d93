"""The PEFT adapter format for LoRA: write folders ``peft.PeftModel.from_pretrained`` loads, read PEFT's.

A PEFT LoRA folder is ``adapter_config.json`` plus ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (and, for
``modules_to_save``, ``base_model.model.<parameter path>``). opendelta's LoRA stores the same
factors (A: r x in, B: out x r, scaling alpha/r or alpha/sqrt(r)), so conversion only renames
keys and translates the config; no pickle is read (``adapter_model.bin`` is refused).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from opendelta.checkpoint import CONFIG_NAME, delta_key
from opendelta.errors import CorruptCheckpointError, PeftFormatError

if TYPE_CHECKING:
    from opendelta.config import DeltaConfig
    from opendelta.delta_base import DeltaBase

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_FACTOR = re.compile(r"(?P<path>.+)\.lora_(?P<factor>[AB])\.weight")
#: PEFT LoRA options that change the computation in ways opendelta's LoRA does not implement
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
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
    directory = Path(directory)
    return (directory / PEFT_CONFIG_NAME).is_file() and not (directory / CONFIG_NAME).is_file()


def check_peft_expressible(delta: DeltaBase) -> None:
    """Raise PeftFormatError unless `delta` is a LoRA whose extra trained tensors are whole modules."""
    if delta.delta_type != "lora":
        raise PeftFormatError(
            f"format='peft' writes LoRA only; this is a {delta.delta_type!r} delta. Save it with the default "
            "format='opendelta'."
        )
    _modules_to_save(delta)


def _modules_to_save(delta: DeltaBase) -> list[str]:
    """The backbone modules whose every parameter the delta trains (PEFT's ``modules_to_save``)."""
    trained = set(delta._originals)
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
    for path in delta.layers:
        tensors_out[f"{PREFIX}{path}.lora_A.weight"] = tensors[delta_key(path, "lora_A")]
        tensors_out[f"{PREFIX}{path}.lora_B.weight"] = tensors[delta_key(path, "lora_B")]
        r, alpha = config.rank_and_alpha(path)
        if r != config.lora_r:
            rank_pattern[re.escape(path)] = r
        if alpha != config.lora_alpha:
            alpha_pattern[re.escape(path)] = alpha
        conv1d = conv1d or type(delta._targets[path]).__name__ == "Conv1D"
    for name in delta._originals:
        tensors_out[PREFIX + name] = tensors[f"backbone.{name}"]
    modules_to_save = _modules_to_save(delta)
    backbone_config = getattr(delta.backbone_model, "config", None)
    peft_config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(backbone_config, "_name_or_path", None) or None,
        "r": config.lora_r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "use_rslora": config.use_rslora,
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
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors_out.items()}
    with tempfile.TemporaryDirectory(dir=directory, prefix=".peft.") as tmp:
        save_file(plain, Path(tmp) / PEFT_WEIGHTS_NAME, metadata={"format": "pt"})
        (Path(tmp) / PEFT_CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n", encoding="utf-8")
        os.replace(Path(tmp) / PEFT_WEIGHTS_NAME, directory / PEFT_WEIGHTS_NAME)
        os.replace(Path(tmp) / PEFT_CONFIG_NAME, directory / PEFT_CONFIG_NAME)
    return directory


def read_peft_checkpoint(
    directory: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[type[DeltaBase], DeltaConfig, list[str], dict[str, torch.Tensor], dict[str, Any], str]:
    """Translate a PEFT LoRA folder into opendelta's terms.

    Returns (delta class, config, module paths, tensors by opendelta checkpoint key, trained
    backbone parameter names, the class PEFT recorded). Other PEFT methods and LoRA variants
    opendelta does not implement raise PeftFormatError naming them.
    """
    from opendelta.methods.lora import LoraConfig, LoraModel

    directory = Path(directory)
    config_path = directory / PEFT_CONFIG_NAME
    try:
        peft = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{config_path} is not valid JSON ({exc}).") from exc
    method = peft.get("peft_type")
    if method != "LORA":
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
    weights = directory / PEFT_WEIGHTS_NAME
    if not weights.is_file():
        raise PeftFormatError(
            f"{str(directory)!r} has no {PEFT_WEIGHTS_NAME} (a pickled adapter_model.bin is not loaded, because "
            "unpickling runs code); re-save the adapter with safe_serialization=True."
        )
    try:
        saved = load_file(weights, device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"{weights} is not a readable safetensors file ({exc}).") from exc

    tensors: dict[str, torch.Tensor] = {}
    paths: list[str] = []
    backbone_names: dict[str, Any] = {}
    for key, value in saved.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        factor = _FACTOR.fullmatch(name)
        if factor is not None:
            path = factor["path"]
            if path not in paths:
                paths.append(path)
            tensors[delta_key(path, f"lora_{factor['factor']}")] = value
        elif "lora_" in name:
            raise PeftFormatError(
                f"{weights} holds {key!r}, a LoRA tensor opendelta does not implement (LoRA on embeddings or "
                "convolutions, DoRA magnitudes); load it with peft.PeftModel.from_pretrained."
            )
        else:
            tensors[f"backbone.{name}"] = value
            backbone_names[name] = list(value.shape)
    config = LoraConfig.from_dict(
        {
            "modified_modules": paths,
            "lora_r": int(peft.get("r", 8)),
            "lora_alpha": peft.get("lora_alpha", 8),
            "lora_dropout": float(peft.get("lora_dropout") or 0.0),
            "use_rslora": bool(peft.get("use_rslora", False)),
            "rank_pattern": {"[r]" + k: v for k, v in (peft.get("rank_pattern") or {}).items()} or None,
            "alpha_pattern": {"[r]" + k: v for k, v in (peft.get("alpha_pattern") or {}).items()} or None,
        }
    )
    trained_on = (peft.get("auto_mapping") or {}).get("base_model_class") or "PEFT base model"
    return LoraModel, config, paths, tensors, backbone_names, trained_on
