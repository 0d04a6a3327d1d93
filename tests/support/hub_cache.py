"""A Hugging Face Hub cache on disk, in huggingface_hub's own layout, for tests that cannot reach the Hub.

``models--owner--name/blobs/<etag>`` holds each file's bytes, ``snapshots/<commit>/<file>`` links
to its blob, ``refs/<branch or tag>`` holds a commit: what ``hf_hub_download`` writes and reads.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path


def commit_hash(label: str) -> str:
    """A 40-hex commit id, made from `label` so that tests read which revision is which."""
    return hashlib.sha1(label.encode()).hexdigest()


def repo_folder(cache_dir: Path, repo_id: str) -> Path:
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


def add_snapshot(
    cache_dir: Path, repo_id: str, folder: Path, *, commit: str, refs: Iterable[str] = (), leave_out: Iterable[str] = ()
) -> Path:
    """Put the files of checkpoint `folder` into the cache as `repo_id` at `commit` (the names in
    `leave_out` stay uncached, as if never downloaded) and point `refs` at it; returns the snapshot."""
    repo = repo_folder(cache_dir, repo_id)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(folder.iterdir()):
        if file.name in set(leave_out):
            continue
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot
