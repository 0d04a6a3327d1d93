"""AutoDelta: build or load any registered delta type from a config dict or a checkpoint."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from opendelta.checkpoint import config_from_meta, read_meta
from opendelta.config import DeltaConfig
from opendelta.delta_base import DeltaBase
from opendelta.errors import DeltaConfigError
from opendelta.hub import finetuned_folder
from opendelta.registry import lookup, register


class AutoDeltaConfig:
    """Configs of any registered delta type."""

    @staticmethod
    def from_dict(config_dict: Mapping[str, Any]) -> DeltaConfig:
        """``{"delta_type": "lora", "lora_r": 4}`` -> a LoraConfig; the defaults fill the rest."""
        if not isinstance(config_dict, Mapping):
            raise DeltaConfigError(
                f"a delta config must be a dict, got {config_dict!r} of type {type(config_dict).__name__}; "
                "pass e.g. {'delta_type': 'lora'}"
            )
        if "delta_type" not in config_dict:
            raise DeltaConfigError("the config dict needs a 'delta_type' key, e.g. {'delta_type': 'lora'}")
        config_cls, _ = lookup(config_dict["delta_type"])
        return config_cls.from_dict(config_dict)

    @staticmethod
    def from_finetuned(finetuned_delta_path: str | os.PathLike, **hub_args: Any) -> DeltaConfig:
        """The config stored in a checkpoint directory or Hub repo (`hub_args`: revision, cache_dir,
        local_files_only, force_download, token); the tensors are not read, so not verified."""
        meta = read_meta(finetuned_folder(finetuned_delta_path, **hub_args), verify=False)
        config_cls, _ = lookup(meta["delta_type"])
        return config_from_meta(meta, config_cls)


class AutoDeltaModel:
    """Delta models of any registered type."""

    @staticmethod
    def from_config(config: DeltaConfig | Mapping[str, Any], backbone_model: nn.Module, **kwargs: Any) -> DeltaBase:
        """Build and attach the delta that `config` describes (default positions for this family
        when it names no modules)."""
        if not isinstance(config, DeltaConfig):
            config = AutoDeltaConfig.from_dict(config)
        _, model_cls = lookup(config.delta_type)
        return model_cls.from_config(config, backbone_model, **kwargs)

    @staticmethod
    def from_finetuned(
        finetuned_delta_path: str | os.PathLike, backbone_model: nn.Module, *, verify: bool = True, **kwargs: Any
    ) -> DeltaBase:
        """Load any opendelta checkpoint onto `backbone_model`; the type and arguments come from it.
        ``verify=False`` loads a checkpoint whose SHA-256 is missing or wrong (see DeltaBase.from_finetuned)."""
        return DeltaBase.from_finetuned(finetuned_delta_path, backbone_model, verify=verify, **kwargs)

    @staticmethod
    def register(
        delta_type: str, config_cls: type[DeltaConfig], model_cls: type[DeltaBase], *, replace: bool = False
    ) -> None:
        """Add a user-defined delta type so from_config / from_finetuned know it; a type already
        registered with other classes raises DuplicateDeltaTypeError unless `replace=True`."""
        register(delta_type, config_cls, model_cls, replace=replace)
