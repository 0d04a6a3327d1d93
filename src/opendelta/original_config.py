"""The original OpenDelta's (0.3.2) config API for opendelta's configs: its extra fields
(``backbone_class``, ``backend``...), its methods (``to_json_string``, ``to_diff_dict``, ``update``,
``save_finetuned``, ``from_finetuned``) and the keys its configs and scripts pass that opendelta's do
not take. Kept apart from original_api.py (the DeltaBase side) because the config layer imports
it: it depends on nothing above the config layer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opendelta.checkpoint_files import checkpoint_path, read_json
from opendelta.errors import CheckpointError, CheckpointNotFoundError, DeltaConfigError
from opendelta.leniency import OriginalBehaviourWarning
from opendelta.registry import lookup

if TYPE_CHECKING:
    from opendelta.config import DeltaConfig

#: fields every config of the original has beyond the method's arguments, with their defaults
ORIGINAL_CONFIG_FIELDS: dict[str, Any] = {
    "backbone_class": None,
    "backbone_checkpoint_name": None,
    "backbone_hash": None,
    "backend": "hf",
}
#: keys the original writes into a saved config.json and reads back without using
_IGNORED_KEYS = ("opendelta_version", "transformers_version", "model_type")
#: arguments of one original method that opendelta always honours in its own way: (what the
#: original defaulted to, which values opendelta's behaviour equals, why)
ORIGINAL_METHOD_ARGS: dict[str, dict[str, tuple[Any, Callable[[Any], bool], str]]] = {
    # compacter.py: CompacterConfig has bottleneck_dim and sequential, which CompacterModel never
    # reads (its saved config.json holds them as null)
    "compacter": {
        "bottleneck_dim": (32, lambda v: True, "the original's CompacterModel did not use it"),
        "sequential": (True, lambda v: True, "the original's CompacterModel did not use it"),
    },
    "soft_prompt": {
        "other_expand_ids": (
            {"attention_mask": 1, "token_type_ids": 0},
            lambda v: isinstance(v, Mapping) and dict(v).items() <= {"attention_mask": 1, "token_type_ids": 0}.items(),
            "opendelta's soft prompt extends attention_mask with 1 and token_type_ids with 0 (and labels with -100) "
            "by itself",
        )
    },
}
BMTRAIN_HELP = (
    "backend='bmt' (BMTrain) is not supported: opendelta scales out on PyTorch's own engines. Build the delta "
    "with backend='hf' (the default) and train with DDP, FSDP2 or DeepSpeed ZeRO-3 (docs/scaling_out.md)."
)


def check_backend(backend: Any) -> str:
    """The original's ``backend`` argument: ``"hf"`` is what opendelta does; anything else is refused."""
    if backend == "hf":
        return backend
    if backend == "bmt":
        raise DeltaConfigError(BMTRAIN_HELP)
    raise DeltaConfigError(f"backend must be 'hf' (the only backend), got {backend!r}.")


def take_original_fields(config_cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Remove from `values` the keys the original's configs have and opendelta's do not; return
    the ones a config keeps as attributes (``backbone_class``...). Called by DeltaConfig.from_dict."""
    kept: dict[str, Any] = {}
    for key in [k for k in values if k in ORIGINAL_CONFIG_FIELDS]:
        kept[key] = values.pop(key)
    if "backend" in kept:
        check_backend(kept["backend"])
    for key in _IGNORED_KEYS:
        values.pop(key, None)
    own_fields = {f.name for f in dataclasses.fields(config_cls)}
    for key, (_, honoured, why) in ORIGINAL_METHOD_ARGS.get(getattr(config_cls, "delta_type", ""), {}).items():
        if key in values and key not in own_fields:
            value = values.pop(key)
            if not honoured(value):
                raise DeltaConfigError(f"{key}={value!r} is not supported: {why}; leave {key} out.")
    return kept


class OriginalConfigAPI:
    """The original ``BaseDeltaConfig``'s fields and methods, for ``DeltaConfig``."""

    backbone_class: str | None = None
    backbone_checkpoint_name: str | None = None
    backbone_hash: str | None = None
    backend: str = "hf"

    def to_diff_dict(self) -> dict[str, Any]:
        """The config without the values that equal the class defaults (``delta_type`` always kept)."""
        values = self.to_dict()  # type: ignore[attr-defined]
        defaults = type(self)().to_dict()  # type: ignore[attr-defined]
        diff = {k: v for k, v in values.items() if k == "delta_type" or defaults.get(k) != v}
        diff.update({k: getattr(self, k) for k, d in ORIGINAL_CONFIG_FIELDS.items() if getattr(self, k) != d})
        return diff

    def to_json_string(self, use_diff: bool = True) -> str:
        """The config as indented, key-sorted JSON (only what differs from the defaults if `use_diff`)."""
        values = self.to_diff_dict() if use_diff else {
            **self.to_dict(),  # type: ignore[attr-defined]
            **{k: getattr(self, k) for k in ORIGINAL_CONFIG_FIELDS},
        }
        return json.dumps(values, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        Path(json_file_path).write_text(self.to_json_string(use_diff=use_diff), encoding="utf-8")

    def update(self, config_dict: Mapping[str, Any]) -> None:
        """Set several fields at once; each value is validated as in the constructor."""
        for key, value in config_dict.items():
            if key == "backend":
                check_backend(value)
            if key not in ORIGINAL_CONFIG_FIELDS and key not in {f.name for f in dataclasses.fields(self)}:  # type: ignore[arg-type]
                raise DeltaConfigError(f"{type(self).__name__} has no field {key!r}")
            setattr(self, key, value)

    def save_finetuned(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write the config alone as ``config.json`` in `save_directory` (as the original's config did)."""
        if os.path.isfile(save_directory):
            raise CheckpointError(f"{save_directory!r} is a file; save_finetuned needs a folder")
        os.makedirs(save_directory, exist_ok=True)
        self.to_json_file(Path(save_directory) / "config.json")

    @classmethod
    def from_finetuned(cls, finetuned_delta_path: str | os.PathLike, **kwargs: Any) -> DeltaConfig:
        """The config of a saved delta: an opendelta checkpoint, an original OpenDelta folder, or a
        folder holding only a ``config.json`` written by :meth:`save_finetuned`."""
        from opendelta.hub import finetuned_folder

        path = finetuned_folder(finetuned_delta_path, **kwargs)
        config = read_saved_config(path)
        own = getattr(cls, "delta_type", "")
        if own and config.delta_type != own:
            raise DeltaConfigError(f"{path} holds a {config.delta_type!r} config, not {own!r}; use AutoDeltaConfig")
        return config


#: delta_type -> {config field the original's model never read: (the value it used, the value the
#: original wrote into config.json, why)}
IGNORED_BY_ORIGINAL: dict[str, dict[str, tuple[Any, Any, str]]] = {
    # parallel_adapter.py: ParallelAdapterModel.__init__ takes no `scaled` (create_config_from_model
    # then saves None), and new_module_like builds ParallelAdapterLayer without it (default 1)
    "parallel_adapter": {"scaled": (1.0, None, "the original's ParallelAdapterModel never passed `scaled` to its layers (they used 1)")},
    # soft_prompt.py: SoftPromptModel.__init__ passes modified_modules=["root"] whatever it is given,
    # and puts the prompt on the model (or its encoder): opendelta's default place
    "soft_prompt": {"modified_modules": (None, ["root"], "the original's SoftPromptModel ignored modified_modules")},
}


def as_the_original_used(values: dict[str, Any], delta_type: str, where: str) -> dict[str, Any]:
    """An original config.json with the fields its model never read set to the value it used
    (:data:`IGNORED_BY_ORIGINAL`; an OriginalBehaviourWarning where the file says otherwise)."""
    values = dict(values)
    for key, (used, written, why) in IGNORED_BY_ORIGINAL.get(delta_type, {}).items():
        if key in values and values[key] not in (written, used):
            warnings.warn(f"{where}: {key}={values[key]!r} is loaded as {key}={used!r}: {why}",
                          OriginalBehaviourWarning, stacklevel=4)
        values[key] = used
    return values


def read_saved_config(folder: str | os.PathLike) -> DeltaConfig:
    """The config in a saved folder without reading its tensors: opendelta's ``delta_config.json``
    (strictly, as a checkpoint), or the original's ``config.json`` (leniently, as the original)."""
    path = checkpoint_path(folder, "from_finetuned")
    ours, original = path / "delta_config.json", path / "config.json"
    if ours.is_file():
        meta = read_json(ours, CheckpointError)
        values, strict = (meta.get("config"), True) if isinstance(meta, dict) else (None, True)
        delta_type = meta.get("delta_type") if isinstance(meta, dict) else None
    elif original.is_file():
        values, strict = read_json(original, CheckpointError), None
        delta_type = values.get("delta_type") if isinstance(values, dict) else None
        if isinstance(values, dict) and isinstance(delta_type, str):
            values = as_the_original_used(values, delta_type, str(original))
    else:
        raise CheckpointNotFoundError(f"{str(path)!r} holds no delta config (delta_config.json or config.json)")
    if not isinstance(values, dict) or not isinstance(delta_type, str):
        raise DeltaConfigError(f"{path}: the saved config must be a JSON object with a 'delta_type'")
    config_cls, _ = lookup(delta_type)
    return config_cls.from_dict({k: v for k, v in values.items() if k != "delta_type"}, strict=strict)
