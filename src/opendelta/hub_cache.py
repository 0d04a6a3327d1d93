"""Finding delta checkpoints in the Hugging Face Hub's cache: repo ids versus local folders, and
``hf_hub_download`` with every failure turned into opendelta's typed errors.

Kept apart from opendelta.hub (loading and pushing whole checkpoints) because the config layer
reads a saved config through it, below the checkpoint machinery.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

from opendelta.checkpoint_files import CONFIG_NAME, checkpoint_path, read_safetensors_header
from opendelta.errors import CheckpointError, CheckpointNotCachedError, CheckpointNotFoundError, CheckpointPathError, HubError

# "owner/name" as the Hub spells repo ids; whether it is valid is huggingface_hub's to say
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
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
    return path if isinstance(path, str) and REPO_ID.fullmatch(path) and not path.startswith(".") else None


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
    return Fetcher(repo_id, revision, cache_dir, local_files_only, force_download, token).config()


class Fetcher:
    """hf_hub_download for one repo and revision, every failure turned into opendelta's errors."""

    def __init__(
        self, repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None, local_files_only: bool,
        force_download: bool, token: str | bool | None,
    ) -> None:
        hub = huggingface_hub_module()
        if force_download and (local_files_only or hub.constants.is_offline_mode()):
            reason = "local_files_only=True" if local_files_only else "offline mode is on (HF_HUB_OFFLINE=1)"
            raise HubError(f"force_download=True needs the network, but {reason}; drop one of them.")
        self.repo_id, self.revision, self.token = repo_id, revision, token
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else hub.constants.HF_HUB_CACHE
        self.local_files_only, self.force_download = local_files_only, force_download

    def config(self) -> Path:
        return Path(self.file(CONFIG_NAME, self.revision)).parent

    def file(self, filename: str, revision: str | None) -> str:
        hub = huggingface_hub_module()
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
        hub = huggingface_hub_module()
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
        errors = huggingface_hub_module().errors
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
            elif huggingface_hub_module().constants.is_offline_mode():
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


def huggingface_hub_module() -> Any:
    """huggingface_hub, or HubError saying how to install it (it is an optional dependency)."""
    try:
        import huggingface_hub
        import huggingface_hub.errors
    except ImportError as exc:
        raise HubError("the Hugging Face Hub needs huggingface_hub: pip install 'opendelta[hf]'") from exc
    return huggingface_hub
