"""Delta checkpoints on the Hugging Face Hub: loading from repo ids, pushing with a model card.

A repo holds an ordinary opendelta checkpoint folder (delta_config.json + the safetensors file it
names) and a README.md model card. Loading goes through ``huggingface_hub``'s cache (so
``cache_dir``, ``revision``, ``local_files_only``, ``force_download`` and ``HF_HUB_OFFLINE`` mean
what they mean everywhere in the Hugging Face stack) and fetches the small config first: the
delta's class and module list are checked against the backbone, then the tensor shapes against the
weights file's header (read from the cache, or fetched alone with a range request), and only a
checkpoint that fits has its weight bytes downloaded. An existing local folder always wins over a
repo id of the same spelling.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from opendelta import serialization
from opendelta.checkpoint import (
    StoredCheckpoint,
    checkpoint_shapes,
    delta_contents,
    open_checkpoint,
    read_meta,
)
from opendelta.distributed import on_rank_zero
from opendelta.errors import CheckpointPathError, HubError
from opendelta.hub_cache import REPO_ID, Fetcher, huggingface_hub_module
from opendelta.registry import lookup

if TYPE_CHECKING:
    from opendelta.delta_base import DeltaBase

CARD_NAME = "README.md"
def load_from_hub(
    repo_id: str,
    backbone_model: nn.Module,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
    force_download: bool,
    token: str | bool | None,
    expected: type[DeltaBase] | None,
    name: str | None,
    dummy_inputs: Any,
    verify: bool,
    position: float | None,
) -> DeltaBase:
    """DeltaBase.from_finetuned for a Hub repo id: the config first, the backbone checked against it
    and against the weights' header, the weight bytes last."""
    fetch = Fetcher(repo_id, revision, cache_dir, local_files_only, force_download, token)
    folder = fetch.config()  # a snapshot folder of the cache: its name is the commit
    meta = read_meta(folder, verify=verify)
    source = f"{repo_id}@{folder.name[:12]}"
    _, delta_cls = lookup(meta["delta_type"])
    trained_on = meta.get("backbone", {}).get("class", "?")
    # before any weight byte: the class and the module list (the config alone), then the shapes (the header alone)
    serialization.check_fits(delta_cls, meta["modules"], trained_on, source, backbone_model, expected)
    weights = meta["weights"]["file"]
    shapes = checkpoint_shapes(meta, fetch.header(weights, folder.name), Path(folder, weights))

    def load(device: torch.device | str) -> dict[str, torch.Tensor]:
        fetch.file(weights, folder.name)  # the only step that downloads weight bytes
        return open_checkpoint(folder, verify=verify).load(device)

    contents = delta_contents(StoredCheckpoint(meta=meta, shapes=shapes, load=load), folder)
    return serialization.load_contents(
        contents, source, f"{source} (trained on a {trained_on})", backbone_model,
        expected=expected, name=name, dummy_inputs=dummy_inputs, position=position,
    )


# ----------------------------------------------------------------- pushing


def push_to_hub(
    delta: DeltaBase,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    base_model: str | None = None,
) -> str:
    """DeltaBase.push_to_hub: save the delta and its model card into a temporary folder and upload
    it; returns the commit's URL. In a distributed run call it on every rank (like save_finetuned):
    rank 0 uploads."""
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id):
        raise CheckpointPathError(f"push_to_hub needs a repo id spelt 'owner/name', got {repo_id!r}")
    with tempfile.TemporaryDirectory(prefix="opendelta-push-") as tmp:
        folder = Path(tmp, "delta")
        delta.save_finetuned(folder)
        url: list[str] = []

        def write_and_upload() -> None:
            write_model_card(delta, folder, repo_id, base_model)
            url.append(upload_folder(folder, repo_id, private, token, commit_message, revision))

        on_rank_zero(f"push_to_hub({repo_id!r})", write_and_upload)
        return url[0] if url else ""


def upload_folder(
    folder: Path, repo_id: str, private: bool | None, token: str | bool | None, commit_message: str | None,
    revision: str | None,
) -> str:
    """The network step of push_to_hub: create the repo (and branch) if needed, upload `folder` as one commit."""
    hub = huggingface_hub_module()
    api = hub.HfApi(token=token, library_name="opendelta")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision,
            commit_message=commit_message or "Upload opendelta delta checkpoint",
        )
    except hub.errors.HFValidationError as exc:
        raise CheckpointPathError(f"push_to_hub: {exc}") from exc
    except (hub.errors.HfHubHTTPError, OSError) as exc:
        raise HubError(f"push_to_hub({repo_id!r}) failed: {exc}") from exc
    return str(getattr(info, "commit_url", info))


def write_model_card(delta: DeltaBase, folder: Path, repo_id: str, base_model: str | None = None) -> Path:
    """Write README.md, the model card of the checkpoint in `folder`: its metadata (library, base
    model, tags) and what a user needs to check it fits (method and arguments, trainable
    parameters, backbone class and fingerprint, weights checksum), all read from the saved config."""
    hub = huggingface_hub_module()
    meta = read_meta(folder)
    stored = open_checkpoint(folder)
    stored_params = sum(_numel(shape) for shape in stored.shapes.values())
    backbone_params = sum(p.numel() for p in delta.backbone_model.parameters()) - sum(
        p.numel() for p in delta.delta_parameters()
    )
    base_model = base_model if base_model is not None else _base_model_id(delta.backbone_model)
    data = hub.ModelCardData(
        library_name="opendelta",
        base_model=base_model,
        tags=["opendelta", "delta-tuning", meta["delta_type"]],
        opendelta={
            "delta_type": meta["delta_type"],
            "backbone_class": meta["backbone"]["class"],
            "backbone_fingerprint": meta["backbone"]["fingerprint"],
            "weights": meta["weights"]["file"],
            "sha256": meta["weights"]["sha256"],
        },
    )
    arguments = json.dumps(meta["config"], indent=2, sort_keys=True)
    body = f"""
# {repo_id}

A **{meta['delta_type']}** delta for `{meta['backbone']['class']}`{f" (`{base_model}`)" if base_model else ""},
trained with [opendelta](https://github.com/thunlp/OpenDelta): only the delta's tensors are stored;
load it onto the backbone it was trained on.

```python
from opendelta import AutoDeltaModel

delta = AutoDeltaModel.from_finetuned("{repo_id}", backbone_model=model)
```

| | |
|---|---|
| method | `{meta['delta_type']}` |
| modified modules | {len(meta['modules'])} |
| trainable parameters | {stored_params:,} ({100 * stored_params / max(backbone_params, 1):.4f}% of the backbone's {backbone_params:,}) |
| backbone | `{meta['backbone']['class']}` (model_type `{meta['backbone'].get('model_type')}`) |
| backbone fingerprint | `{meta['backbone']['fingerprint']}` (names, shapes and dtypes of its tensors) |
| weights | `{meta['weights']['file']}`, SHA-256 `{meta['weights']['sha256']}` |
| opendelta version | {meta.get('library_version', '?')} |

## Arguments

```json
{arguments}
```
"""
    card = hub.ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    path = folder / CARD_NAME
    card.save(path)
    return path


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _base_model_id(model: nn.Module) -> str | None:
    """The Hub id the backbone was loaded from, if its config names one (not a local path)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    if isinstance(name, str) and REPO_ID.fullmatch(name) and not Path(name).exists():
        return name
    return None


