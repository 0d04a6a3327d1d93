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

import difflib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from opendelta import serialization
from opendelta.checkpoint import (
    CONFIG_NAME,
    StoredCheckpoint,
    checkpoint_shapes,
    delta_contents,
    open_checkpoint,
    read_meta,
)
from opendelta.checkpoint_files import checkpoint_path, read_safetensors_header
from opendelta.distributed import on_rank_zero
from opendelta.errors import (
    CheckpointError,
    CheckpointNotCachedError,
    CheckpointNotFoundError,
    CheckpointPathError,
    HubError,
)
from opendelta.registry import lookup

if TYPE_CHECKING:
    from opendelta.delta_base import DeltaBase

CARD_NAME = "README.md"
# "owner/name" as the Hub spells repo ids; whether it is valid is huggingface_hub's to say
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DELTACENTER = (
    " No local folder of that name exists either. (In the original OpenDelta, 'owner/name' named a checkpoint on "
    "its DeltaCenter, which no longer exists; opendelta looks such names up on the Hugging Face Hub.)"
)


def hub_repo_id(path: Any, cache_dir: Any = None, force_download: bool = False) -> str | None:
    """The Hub repo id `path` names, or None when it names a local folder.

    Only a str spelt "owner/name" can be a repo id (a pathlib.Path is always local), and a folder
    that exists locally (`path` itself, or ``cache_dir/path`` as the original OpenDelta joined them)
    always wins; force_download=True on such a folder is an error, as nothing would be downloaded."""
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        return None
    local = [Path(path)] + ([Path(cache_dir, path)] if cache_dir is not None else [])
    if any(folder.is_dir() for folder in local):
        if force_download:
            raise CheckpointPathError(
                f"force_download=True downloads from the Hugging Face Hub, but {os.fspath(path)!r} is a local folder "
                "(a local folder wins over a repo id of the same spelling); drop force_download, or rename the folder."
            )
        return None
    return path if isinstance(path, str) and _REPO_ID.fullmatch(path) and not path.startswith(".") else None


def local_folder(path: Any, cache_dir: Any = None) -> Path:
    """The local folder a from_finetuned argument that is no repo id names: ``cache_dir/path`` when
    that folder exists (the original OpenDelta's spelling), else `path`."""
    if cache_dir is not None and isinstance(path, (str, os.PathLike)) and Path(cache_dir, path).is_dir():
        return Path(cache_dir, path)
    return checkpoint_path(path, "from_finetuned")


def finetuned_folder(
    path: Any, *, cache_dir: str | os.PathLike | None = None, revision: str | None = None,
    local_files_only: bool = False, force_download: bool = False, token: str | bool | None = None, **ignored: Any,
) -> Path:
    """The folder holding the config `path` names: a local folder, or the cache snapshot of a Hub
    repo id with its config fetched (only the config: for readers of the config alone)."""
    repo_id = hub_repo_id(path, cache_dir, force_download)
    if repo_id is None:
        return local_folder(path, cache_dir)
    return _Fetcher(repo_id, revision, cache_dir, local_files_only, force_download, token).config()


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
    fetch = _Fetcher(repo_id, revision, cache_dir, local_files_only, force_download, token)
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


class _Fetcher:
    """hf_hub_download for one repo and revision, every failure turned into opendelta's errors."""

    def __init__(
        self, repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None, local_files_only: bool,
        force_download: bool, token: str | bool | None,
    ) -> None:
        hub = _huggingface_hub()
        if force_download and (local_files_only or hub.constants.is_offline_mode()):
            reason = "local_files_only=True" if local_files_only else "offline mode is on (HF_HUB_OFFLINE=1)"
            raise HubError(f"force_download=True needs the network, but {reason}; drop one of them.")
        self.repo_id, self.revision, self.token = repo_id, revision, token
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else hub.constants.HF_HUB_CACHE
        self.local_files_only, self.force_download = local_files_only, force_download

    def config(self) -> Path:
        return Path(self.file(CONFIG_NAME, self.revision)).parent

    def file(self, filename: str, revision: str | None) -> str:
        hub = _huggingface_hub()
        try:
            return hub.hf_hub_download(
                self.repo_id, filename, revision=revision, cache_dir=self.cache_dir, token=self.token,
                local_files_only=self.local_files_only, force_download=self.force_download,
                library_name="opendelta",
            )
        except Exception as exc:
            raise self._typed(exc, filename, revision) from exc

    def header(self, filename: str, commit: str) -> dict[str, tuple[int, ...]]:
        """The tensor shapes of weights file `filename` at `commit`, without its tensor data: from the
        cache when the file is there, else from the file's header alone (a range request)."""
        hub = _huggingface_hub()
        cached = None if self.force_download else hub.try_to_load_from_cache(
            self.repo_id, filename, cache_dir=self.cache_dir, revision=commit
        )
        if isinstance(cached, str):
            return read_safetensors_header(Path(cached))[0]
        if self.local_files_only or hub.constants.is_offline_mode():
            # nothing can be fetched, the weights included: say so now
            raise self._typed(hub.errors.LocalEntryNotFoundError("not cached"), filename, commit)
        try:  # the network step: the header's bytes only
            metadata = hub.HfApi().parse_safetensors_file_metadata(
                self.repo_id, filename, revision=commit, token=self.token
            )
        except Exception as exc:
            raise self._typed(exc, filename, commit) from exc
        return {key: tuple(info.shape) for key, info in metadata.tensors.items()}

    def _typed(self, exc: Exception, filename: str, revision: str | None) -> CheckpointError:
        """`exc` from huggingface_hub as the opendelta error that says what to do."""
        errors = _huggingface_hub().errors
        at = f"{self.repo_id!r}" + (f" at revision {revision!r}" if revision else "")
        if isinstance(exc, errors.GatedRepoError):
            return HubError(f"{at} is a gated repository: accept its conditions on the Hub and pass token=.")
        if isinstance(exc, errors.RepositoryNotFoundError):
            return CheckpointNotFoundError(
                f"no Hugging Face Hub repository {self.repo_id!r} (or it is private: pass token=, or log in with "
                f"`hf auth login`).{_did_you_mean(self.repo_id, cached_repos(self.cache_dir))}{_DELTACENTER}"
            )
        if isinstance(exc, errors.RevisionNotFoundError):
            known = cached_revisions(self.cache_dir, self.repo_id)
            return CheckpointNotFoundError(
                f"the Hub repository {self.repo_id!r} has no revision {revision!r}; pass a branch, tag or commit it has."
                + (f" Cached revisions of this repo: {', '.join(map(repr, known))}." if known else "")
            )
        if isinstance(exc, errors.LocalEntryNotFoundError):
            if self.local_files_only:
                why = "local_files_only=True"
            elif _huggingface_hub().constants.is_offline_mode():
                why = "offline mode is on (HF_HUB_OFFLINE=1)"
            else:
                why = "the Hub could not be reached"
            known = cached_revisions(self.cache_dir, self.repo_id)
            return CheckpointNotCachedError(
                f"{why}, and {filename} of {at} is not in the Hub cache {self.cache_dir!r}. "
                + (
                    f"Cached revisions of this repo: {', '.join(map(repr, known))}."
                    if known else "Download it once while online, or pass the path of a local checkpoint folder."
                )
                + ("" if known else _DELTACENTER)
            )
        if isinstance(exc, errors.EntryNotFoundError):
            return CheckpointNotFoundError(
                f"{at} holds no {filename}: "
                + (
                    "it is not an opendelta checkpoint (push one with delta.push_to_hub(), or upload a folder "
                    "written by save_finetuned())."
                    if filename == CONFIG_NAME else "its config names that file, so the upload is incomplete; push it again."
                )
            )
        if isinstance(exc, errors.HFValidationError):
            return CheckpointPathError(f"{at} is not a valid Hub repo id or revision: {exc}")
        if isinstance(exc, (errors.HfHubHTTPError, OSError, ValueError)):
            return HubError(f"could not fetch {filename} of {at}: {exc}")
        raise exc  # not a Hub failure: let it through unchanged


def cached_repos(cache_dir: str | os.PathLike) -> list[str]:
    """The model repo ids the Hub cache `cache_dir` holds."""
    folder = Path(cache_dir)
    names = sorted(p.name for p in folder.iterdir() if p.name.startswith("models--")) if folder.is_dir() else []
    return [name[len("models--"):].replace("--", "/") for name in names]


def cached_revisions(cache_dir: str | os.PathLike, repo_id: str) -> list[str]:
    """The revisions of `repo_id` the Hub cache holds: its refs (branches, tags), then the commits no ref names."""
    repo = Path(cache_dir, "models--" + repo_id.replace("/", "--"))
    refs = {
        str(p.relative_to(repo / "refs")): p.read_text().strip() for p in sorted((repo / "refs").rglob("*")) if p.is_file()
    } if (repo / "refs").is_dir() else {}
    snapshots = sorted(p.name for p in (repo / "snapshots").iterdir()) if (repo / "snapshots").is_dir() else []
    return sorted(refs) + [commit for commit in snapshots if commit not in refs.values()]


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f" Did you mean: {', '.join(map(repr, close))}?" if close else ""


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
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id):
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
    hub = _huggingface_hub()
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
    hub = _huggingface_hub()
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
    if isinstance(name, str) and _REPO_ID.fullmatch(name) and not Path(name).exists():
        return name
    return None


def _huggingface_hub() -> Any:
    """huggingface_hub, or HubError saying how to install it (it is an optional dependency)."""
    try:
        import huggingface_hub
        import huggingface_hub.errors
    except ImportError as exc:
        raise HubError("the Hugging Face Hub needs huggingface_hub: pip install 'opendelta[hf]'") from exc
    return huggingface_hub

