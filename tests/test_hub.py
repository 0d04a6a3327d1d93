"""Deltas on the Hugging Face Hub: repo ids resolved through huggingface_hub's real cache layout
(refs, revisions, offline mode), the backbone refused before any weight byte, push_to_hub's folder
and model card. Nothing here reaches the network: the one network step of each path is replaced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from support.hub_cache import add_snapshot, commit_hash, repo_folder

from opendelta import (
    AutoDeltaConfig,
    AutoDeltaModel,
    CheckpointNotCachedError,
    CheckpointNotFoundError,
    CheckpointPathError,
    HubError,
    IncompatibleCheckpointError,
    LoraModel,
)
from opendelta.checkpoint import read_meta

from conftest import inputs_for, perturb, tiny_gpt2, tiny_llama

REPO = "org/tiny-lora"
MAIN, V2 = commit_hash("main"), commit_hash("v2")
INPUTS = inputs_for("llama")


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**INPUTS).logits


def saved_delta(path: Path, seed: int) -> torch.Tensor:
    """Save a perturbed LoRA on a tiny LLaMA into `path`; the logits it gives."""
    model = tiny_llama()
    delta = LoraModel(model, modified_modules=["q_proj", "v_proj"], lora_r=4)
    perturb(delta, seed=seed)
    delta.save_finetuned(path)
    return logits(model)


def weights_name(folder: Path) -> str:
    return read_meta(folder)["weights"]["file"]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def online_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode, but every request the test did not replace fails at once (a closed local port)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    use_endpoint(monkeypatch, "http://127.0.0.1:9")


def use_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point huggingface_hub at `endpoint` (HF_ENDPOINT is read once, at its import)."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def cache(tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A Hub cache holding REPO at two revisions: main, and the branch v2 (another trained delta)."""
    cache_dir = tmp_path / "hub"
    first, second = saved_delta(tmp_path / "a", seed=1), saved_delta(tmp_path / "b", seed=2)
    add_snapshot(cache_dir, REPO, tmp_path / "a", commit=MAIN, refs=["main"])
    add_snapshot(cache_dir, REPO, tmp_path / "b", commit=V2, refs=["v2"])
    return cache_dir, first, second


def test_a_repo_id_loads_each_revision_from_the_hub_cache(offline, cache) -> None:
    cache_dir, first, second = cache
    for revision, expected in [(None, first), ("main", first), ("v2", second), (V2, second)]:
        model = tiny_llama()
        AutoDeltaModel.from_finetuned(REPO, model, cache_dir=cache_dir, revision=revision)
        assert torch.equal(logits(model), expected), revision
    model = tiny_llama()
    LoraModel.from_finetuned(REPO, model, cache_dir=cache_dir, revision="v2", local_files_only=True)
    assert torch.equal(logits(model), second)
    assert AutoDeltaConfig.from_finetuned(REPO, cache_dir=cache_dir).lora_r == 4


def test_an_existing_local_folder_wins_over_the_repo_id_it_spells(offline, cache, tmp_path, monkeypatch) -> None:
    cache_dir, first, _ = cache
    monkeypatch.chdir(tmp_path)
    local_expected = saved_delta(tmp_path / REPO, seed=3)  # ./org/tiny-lora, a folder
    model = tiny_llama()
    AutoDeltaModel.from_finetuned(REPO, model, cache_dir=cache_dir)
    assert torch.equal(logits(model), local_expected) and not torch.equal(local_expected, first)
    with pytest.raises(CheckpointPathError, match="is a local folder"):
        AutoDeltaModel.from_finetuned(REPO, tiny_llama(), force_download=True)


def test_offline_mode_names_itself_when_the_repo_is_not_cached(offline, tmp_path) -> None:
    model = tiny_llama()
    before = logits(model)
    with pytest.raises(CheckpointNotCachedError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\).*not in the Hub cache"):
        AutoDeltaModel.from_finetuned("org/never-downloaded", model, cache_dir=tmp_path / "hub")
    with pytest.raises(HubError, match="force_download=True needs the network"):
        AutoDeltaModel.from_finetuned("org/never-downloaded", model, cache_dir=tmp_path / "hub", force_download=True)
    assert torch.equal(logits(model), before)


def test_a_revision_missing_from_the_cache_lists_the_cached_ones(offline, cache) -> None:
    cache_dir, _, _ = cache
    with pytest.raises(CheckpointNotCachedError, match="Cached revisions of this repo: 'main', 'v2'.$") as info:
        AutoDeltaModel.from_finetuned(REPO, tiny_llama(), cache_dir=cache_dir, revision="v3")
    assert "revision 'v3'" in str(info.value)
    with pytest.raises(CheckpointNotCachedError, match="local_files_only=True"):
        AutoDeltaModel.from_finetuned(REPO, tiny_llama(), cache_dir=cache_dir, revision="v3", local_files_only=True)


def test_a_wrong_backbone_is_refused_from_the_config_alone(offline, tmp_path) -> None:
    cache_dir = tmp_path / "hub"
    saved_delta(tmp_path / "a", seed=1)
    add_snapshot(cache_dir, REPO, tmp_path / "a", commit=MAIN, refs=["main"], leave_out=[weights_name(tmp_path / "a")])
    gpt2 = tiny_gpt2()
    before = gpt2(**INPUTS).logits
    with pytest.raises(IncompatibleCheckpointError, match="trained on a LlamaForCausalLM.*GPT2LMHeadModel has no module"):
        AutoDeltaModel.from_finetuned(REPO, gpt2, cache_dir=cache_dir)
    assert torch.equal(gpt2(**INPUTS).logits, before)
    # with the weights uncached a fitting backbone needs them, and offline says so
    with pytest.raises(CheckpointNotCachedError, match="delta_model.*safetensors"):
        AutoDeltaModel.from_finetuned(REPO, tiny_llama(), cache_dir=cache_dir)


def test_a_backbone_of_other_shapes_is_refused_from_the_weights_header_alone(
    online_without_network, tmp_path, monkeypatch
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cache_dir = tmp_path / "hub"
    saved_delta(tmp_path / "a", seed=1)
    weights = weights_name(tmp_path / "a")
    add_snapshot(cache_dir, REPO, tmp_path / "a", commit=MAIN, refs=["main"], leave_out=[weights])
    served: list[str] = []

    def header_only(self, repo_id, filename, *, revision=None, **kwargs):  # stands in for the network step
        served.append(f"{repo_id}/{filename}@{revision}")
        return huggingface_hub.utils.SafetensorsFileMetadata(
            metadata={}, tensors={
                name: huggingface_hub.utils.TensorInfo(dtype="F32", shape=list(shape), data_offsets=(0, 0))
                for name, shape in _header(tmp_path / "a" / weights).items()
            },
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "parse_safetensors_file_metadata", header_only)
    wider = LlamaForCausalLM(LlamaConfig(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=99,
    ))  # same module names, other shapes: the config alone cannot tell
    with pytest.raises(IncompatibleCheckpointError, match=r"checkpoint \(4, 32\) vs backbone \(4, 48\)"):
        AutoDeltaModel.from_finetuned(REPO, wider, cache_dir=cache_dir, revision=MAIN)
    assert served == [f"{REPO}/{weights}@{MAIN}"]
    assert not (repo_folder(cache_dir, REPO) / "snapshots" / MAIN / weights).exists()


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    from opendelta.checkpoint_files import read_safetensors_header

    return read_safetensors_header(path)[0]


@pytest.fixture
def refusing_hub(monkeypatch: pytest.MonkeyPatch):
    """A local HTTP endpoint answering every file request as the Hub answers a missing repo, revision
    or file (status 404 and its X-Error-Code header): huggingface_hub's own error handling runs."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Refuse(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            code = (
                "RepoNotFound" if self.path.startswith("/org/missing/")
                else "RevisionNotFound" if "/resolve/v9/" in self.path
                else "EntryNotFound"
            )
            self.send_response(404)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", code)
            self.send_header("X-Repo-Commit", MAIN)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    use_endpoint(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()
    server.server_close()


def test_the_hubs_answers_for_a_missing_repo_revision_or_config_are_typed_errors(refusing_hub, cache) -> None:
    cache_dir, _, _ = cache
    with pytest.raises(CheckpointNotFoundError, match="no Hugging Face Hub repository 'org/missing'.*DeltaCenter"):
        AutoDeltaModel.from_finetuned("org/missing", tiny_llama(), cache_dir=cache_dir)
    with pytest.raises(CheckpointNotFoundError, match="no Hugging Face Hub repository 'org/missing'") as info:
        AutoDeltaModel.from_finetuned("org/missing", tiny_llama(), cache_dir=cache_dir)
    assert "Did you mean" not in str(info.value)  # nothing cached is close to it
    with pytest.raises(CheckpointNotFoundError, match="has no revision 'v9'.*Cached revisions of this repo: 'main', 'v2'.$"):
        AutoDeltaModel.from_finetuned(REPO, tiny_llama(), cache_dir=cache_dir, revision="v9")
    with pytest.raises(CheckpointNotFoundError, match="holds no delta_config.json: it is not an opendelta checkpoint"):
        AutoDeltaModel.from_finetuned("org/peft-only", tiny_llama(), cache_dir=cache_dir)


@pytest.mark.parametrize("spelling", ["org/a/b", "/abs/org", "./org/x", Path("org/x")], ids=repr)
def test_a_path_not_spelt_like_a_repo_id_stays_a_local_path(offline, spelling) -> None:
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint directory"):
        AutoDeltaModel.from_finetuned(spelling, tiny_llama())


# ----------------------------------------------------------------- push_to_hub


def test_push_to_hub_uploads_the_checkpoint_and_its_model_card(tmp_path, monkeypatch) -> None:
    model = tiny_llama()
    delta = LoraModel(model, modified_modules=["q_proj", "v_proj"], lora_r=4)
    perturb(delta, seed=1)
    expected = logits(model)
    calls: list[tuple[str, dict]] = []

    # the network step: HfApi's requests, recorded, the folder copied before its temporary home goes
    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        shutil.copytree(kwargs["folder_path"], tmp_path / "uploaded")
        calls.append(("upload_folder", {k: v for k, v in kwargs.items() if k != "folder_path"}))
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{MAIN}", commit_message="", commit_description="",
            oid=MAIN,
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)

    url = delta.push_to_hub(REPO, private=True, commit_message="first", revision="exp", base_model="org/base")

    assert url.endswith(f"/commit/{MAIN}")
    assert calls == [
        ("create_repo", {"repo_id": REPO, "private": True, "exist_ok": True}),
        ("create_branch", {"repo_id": REPO, "branch": "exp", "exist_ok": True}),
        ("upload_folder", {"repo_id": REPO, "revision": "exp", "commit_message": "first"}),
    ]
    uploaded = tmp_path / "uploaded"
    meta = read_meta(uploaded)
    assert sorted(p.name for p in uploaded.iterdir()) == sorted(["README.md", "delta_config.json", meta["weights"]["file"]])
    card = ModelCard.load(uploaded / "README.md")
    assert card.data.library_name == "opendelta" and card.data.base_model == "org/base"
    assert "lora" in card.data.tags
    assert card.data.opendelta == {
        "delta_type": "lora", "backbone_class": "LlamaForCausalLM", "backbone_fingerprint": meta["backbone"]["fingerprint"],
        "weights": meta["weights"]["file"], "sha256": meta["weights"]["sha256"],
    }
    trainable = sum(p.numel() for p in delta.delta_parameters())
    assert f"| trainable parameters | {trainable:,} (" in card.text
    assert json.loads(card.text.split("```json\n")[1].split("```")[0]) == meta["config"]

    # what was uploaded loads back exactly, from the Hub cache as a download would leave it
    cache_dir = tmp_path / "hub"
    add_snapshot(cache_dir, REPO, uploaded, commit=MAIN, refs=["exp"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    fresh = tiny_llama()
    AutoDeltaModel.from_finetuned(REPO, fresh, cache_dir=cache_dir, revision="exp")
    assert torch.equal(logits(fresh), expected)


def test_push_to_hub_refuses_a_malformed_repo_id_before_saving(monkeypatch) -> None:
    delta = LoraModel(tiny_llama(), modified_modules=["q_proj"])

    def no_network(self, *args, **kwargs):
        raise AssertionError("must not be reached")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    for bad in ["no-owner", "a/b/c", "", 3]:
        with pytest.raises(CheckpointPathError, match="repo id spelt 'owner/name'"):
            delta.push_to_hub(bad)
