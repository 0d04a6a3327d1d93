"""Checkpoints under faults and hostile edits: one commit point, a mandatory checksum, exact
tensor/module agreement, plain file names, cheap checks first, typed errors for every bad input."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import opendelta.checkpoint as checkpoint
import opendelta.checkpoint_files as checkpoint_files
from opendelta import (
    AutoDeltaConfig,
    AutoDeltaModel,
    CheckpointPathError,
    CheckpointPermissionError,
    CorruptCheckpointError,
    DeltaConfigError,
    LoraConfig,
    LoraModel,
    OpenDeltaError,
    PeftFormatError,
)
from opendelta.checkpoint import CONFIG_NAME, read_checkpoint, write_checkpoint
from opendelta.peft_format import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME

from conftest import hidden, inputs_for, perturb, tiny_bert


def saved_lora(path: Path, **kwargs) -> tuple[LoraModel, torch.Tensor]:
    """A tuned LoRA on a tiny BERT saved at `path`, and the tuned model's output."""
    model = tiny_bert()
    delta = LoraModel(model, **kwargs)
    perturb(delta)
    delta.save_finetuned(path)
    return delta, hidden(model, inputs_for("bert"))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def weights_of(ckpt: Path) -> Path:
    return ckpt / json.loads((ckpt / CONFIG_NAME).read_text())["weights"]["file"]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def same_checkpoint(a, b) -> bool:
    return a.meta == b.meta and a.tensors.keys() == b.tensors.keys() and all(
        torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors
    )


# ---------------------------------------------------------------- one commit point

FAULTY = ["replace", "open", "fdopen", "fsync", "unlink", "listdir"]


@pytest.fixture
def old_and_new(tmp_path):
    """A folder holding an old checkpoint, a new delta to save over it, and both as references."""
    old, _ = saved_lora(tmp_path / "old", lora_r=2)
    new_model = tiny_bert()
    new = LoraModel(new_model, lora_r=4)
    perturb(new)
    new.save_finetuned(tmp_path / "new")
    return tmp_path, new, read_checkpoint(tmp_path / "old"), read_checkpoint(tmp_path / "new")


def count_calls(monkeypatch, name: str, run) -> int:
    calls = []
    real = getattr(os, name)
    monkeypatch.setattr(os, name, lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    run()
    monkeypatch.setattr(os, name, real)
    return len(calls)


@pytest.mark.parametrize("name", FAULTY)
def test_a_save_failing_at_any_os_call_leaves_the_old_or_the_new_checkpoint_bit_for_bit(old_and_new, monkeypatch, name):
    tmp_path, new, old_ckpt, new_ckpt = old_and_new
    shutil.copytree(tmp_path / "old", tmp_path / "dry")
    calls = count_calls(monkeypatch, name, lambda: new.save_finetuned(tmp_path / "dry"))
    assert calls > 0
    real = getattr(os, name)
    for fail_at in range(calls):
        folder = tmp_path / f"fault{fail_at}"
        shutil.copytree(tmp_path / "old", folder)
        seen = []

        def faulty(*args, **kwargs):
            seen.append(1)
            if len(seen) - 1 == fail_at:
                raise OSError(5, f"injected fault in os.{name}")
            return real(*args, **kwargs)

        monkeypatch.setattr(os, name, faulty)
        try:
            new.save_finetuned(folder)
        except OSError:
            pass
        finally:
            monkeypatch.setattr(os, name, real)
        loaded = read_checkpoint(folder)
        assert same_checkpoint(loaded, old_ckpt) or same_checkpoint(loaded, new_ckpt), (name, fail_at)
        new.save_finetuned(folder)  # the next save leaves exactly one config and one weights file
        assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, weights_of(folder).name])
        assert same_checkpoint(read_checkpoint(folder), new_ckpt)


def test_a_failed_save_removes_the_weights_it_wrote(old_and_new, monkeypatch):
    tmp_path, new, old_ckpt, _ = old_and_new
    before = sorted(p.name for p in (tmp_path / "old").iterdir())
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: real(a, b) if Path(b).name != CONFIG_NAME else 1 / 0)
    with pytest.raises(ZeroDivisionError):
        new.save_finetuned(tmp_path / "old")
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == before
    assert same_checkpoint(read_checkpoint(tmp_path / "old"), old_ckpt)


KILLED_SAVER = """
import sys, torch
from opendelta.checkpoint import write_checkpoint
values = [{"delta.x.lora_A": torch.full((256, 1024), float(v))} for v in (1, 2)]
meta = {"delta_type": "lora", "config": {}, "modules": ["x"]}
write_checkpoint(sys.argv[1], meta, values[0])
print("ready", flush=True)
i = 0
while True:
    i += 1
    write_checkpoint(sys.argv[1], meta, values[i % 2])
"""


def test_a_save_killed_at_random_moments_always_leaves_a_loadable_checkpoint_and_the_next_save_cleans_up(tmp_path):
    folder, timing = tmp_path / "ckpt", random.Random(13)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(checkpoint.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    for _ in range(3):
        saver = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(folder)], stdout=subprocess.PIPE, env=env)
        assert saver.stdout.readline() == b"ready\n"
        try:
            saver.wait(timeout=timing.uniform(0.05, 0.5))
        except subprocess.TimeoutExpired:
            saver.send_signal(signal.SIGKILL)
        saver.wait()
        loaded = read_checkpoint(folder).tensors["delta.x.lora_A"]
        assert torch.equal(loaded, torch.full((256, 1024), 1.0)) or torch.equal(loaded, torch.full((256, 1024), 2.0))
    write_checkpoint(folder, {"delta_type": "lora", "config": {}, "modules": ["x"]}, {"delta.x.lora_A": torch.zeros(1)})
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, weights_of(folder).name])


def test_stale_temporary_and_orphaned_weights_files_are_removed_by_the_next_save_and_other_files_kept(tmp_path):
    delta, _ = saved_lora(tmp_path)
    stale = [
        ".delta_model.safetensors.abc123.tmp",  # temporary files of killed saves, old and new names
        ".delta_model.0123456789abcdef.safetensors.x.tmp",
        ".delta_config.json.x.tmp",
        ".adapter_model.safetensors.q.tmp",
        "delta_model.0123456789abcdef.safetensors",  # weights renamed into place, never committed
        "delta_model.safetensors",  # an earlier checkpoint's weights
    ]
    for name in stale:
        (tmp_path / name).write_bytes(b"x" * 100)
    (tmp_path / "notes.txt").write_text("mine")
    delta.save_finetuned(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, weights_of(tmp_path).name, "notes.txt"])


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoint_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        saved_lora(tmp_path / "native")
        delta, _ = saved_lora(tmp_path / "unused")
        delta.save_finetuned(tmp_path / "peft", format="peft")
    finally:
        os.umask(old)
    for path in [tmp_path / "native" / CONFIG_NAME, weights_of(tmp_path / "native"), tmp_path / "peft" / PEFT_CONFIG_NAME,
                 tmp_path / "peft" / PEFT_WEIGHTS_NAME]:  # fmt: skip
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_permission_denied_on_save_is_a_typed_error_naming_the_folder(tmp_path, monkeypatch):
    delta, _ = saved_lora(tmp_path / "first")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(CheckpointPermissionError, match=str(tmp_path / "ckpt")) as info:
        delta.save_finetuned(tmp_path / "ckpt")
    assert isinstance(info.value, PermissionError)


def test_permission_denied_on_load_is_a_typed_error_naming_the_file(tmp_path, monkeypatch):
    saved_lora(tmp_path)
    model = tiny_bert()
    before = snapshot(model)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint_files, "open", refuse, raising=False)  # the weights file; the config was readable
    with pytest.raises(CheckpointPermissionError, match=weights_of(tmp_path).name):
        AutoDeltaModel.from_finetuned(tmp_path, model)
    assert_unchanged(model, before)


# ---------------------------------------------------------------- the checksum is mandatory


@pytest.mark.parametrize("edit", ["delete", "null", "empty", "not hex"])
def test_a_checkpoint_without_a_valid_checksum_is_corrupt(tmp_path, edit):
    saved_lora(tmp_path)
    values = {"null": None, "empty": "", "not hex": "z" * 64}

    def change(meta):
        if edit == "delete":
            del meta["weights"]["sha256"]
        else:
            meta["weights"]["sha256"] = values[edit]

    edit_json(tmp_path / CONFIG_NAME, change)
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(CorruptCheckpointError, match="verify=False"):
        AutoDeltaModel.from_finetuned(tmp_path, model)
    assert_unchanged(model, before)


def test_verify_false_loads_a_checkpoint_without_its_checksum(tmp_path):
    delta, tuned = saved_lora(tmp_path)
    edit_json(tmp_path / CONFIG_NAME, lambda m: m["weights"].pop("sha256"))
    model = tiny_bert()
    AutoDeltaModel.from_finetuned(tmp_path, model, verify=False)
    assert torch.equal(hidden(model, inputs_for("bert")), tuned)


def test_verify_false_skips_only_the_checksum_not_the_structure(tmp_path):
    saved_lora(tmp_path)
    edit_json(tmp_path / CONFIG_NAME, lambda m: m.update(modules=m["modules"][:1]))
    with pytest.raises(CorruptCheckpointError, match="not used by any listed module"):
        AutoDeltaModel.from_finetuned(tmp_path, tiny_bert(), verify=False)


# ---------------------------------------------------------------- tensors and modules agree exactly


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda ms: [], "modules"),
        (lambda ms: ms[:2], "not used by any listed module"),
        (lambda ms: ms + ms[:1], "without duplicates"),
        (lambda ms: ms + ["encoder.layer.0.output.dense"], "missing delta.encoder.layer.0.output.dense.lora_A"),
    ],
    ids=["empty", "subset", "duplicate", "module without tensors"],
)
def test_a_module_list_that_differs_from_the_tensors_is_corrupt(tmp_path, edit, message):
    saved_lora(tmp_path)
    edit_json(tmp_path / CONFIG_NAME, lambda m: m.update(modules=edit(m["modules"])))
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(CorruptCheckpointError, match=message):
        AutoDeltaModel.from_finetuned(tmp_path, model)
    assert_unchanged(model, before)


def test_a_peft_folder_without_lora_tensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    delta, _ = saved_lora(tmp_path / "native")
    delta.save_finetuned(tmp_path / "peft", format="peft")
    save_file({"base_model.model.pooler.dense.bias": torch.zeros(32)}, tmp_path / "peft" / PEFT_WEIGHTS_NAME)
    edit_json(tmp_path / "peft" / PEFT_CONFIG_NAME, lambda c: c["auto_mapping"].pop("weights_sha256"))
    with pytest.raises(PeftFormatError, match="no LoRA tensors"):
        AutoDeltaModel.from_finetuned(tmp_path / "peft", tiny_bert())


def test_a_torn_peft_save_pairing_new_weights_with_the_old_config_is_detected(tmp_path):
    first, _ = saved_lora(tmp_path / "a")
    first.save_finetuned(tmp_path / "peft", format="peft")
    second, _ = saved_lora(tmp_path / "b")
    with torch.no_grad():
        second.delta_parameters()[0].add_(1.0)
    second.save_finetuned(tmp_path / "other", format="peft")
    shutil.copy(tmp_path / "other" / PEFT_WEIGHTS_NAME, tmp_path / "peft" / PEFT_WEIGHTS_NAME)
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        AutoDeltaModel.from_finetuned(tmp_path / "peft", tiny_bert())


# ---------------------------------------------------------------- only a plain file name


@pytest.mark.parametrize("file", ["../other/delta_model.safetensors", "/etc/passwd", "sub/x.safetensors", "..", "", 5, None])
def test_weights_file_must_be_a_plain_name_inside_the_folder(tmp_path, monkeypatch, file):
    saved_lora(tmp_path / "ckpt")
    shutil.copytree(tmp_path / "ckpt", tmp_path / "other")
    edit_json(tmp_path / "ckpt" / CONFIG_NAME, lambda m: m["weights"].update(file=file))
    opened = []
    monkeypatch.setattr(checkpoint, "read_safetensors_header", lambda path: opened.append(path))
    with pytest.raises(CorruptCheckpointError, match="weights.file"):
        AutoDeltaModel.from_finetuned(tmp_path / "ckpt", tiny_bert())
    assert opened == []


# ---------------------------------------------------------------- cheap checks before hashing


def refuse_hashing(monkeypatch):
    def no_hashing(*args):
        raise AssertionError("the tensor data was hashed before the cheap checks")

    monkeypatch.setattr(checkpoint.hashlib, "sha256", no_hashing)


def test_a_padded_sparse_weights_file_is_refused_from_its_size_without_hashing(tmp_path, monkeypatch):
    saved_lora(tmp_path)
    with open(weights_of(tmp_path), "r+b") as handle:
        handle.truncate(8 * 1024**3)  # sparse: 8 GiB apparent size, no disk used
    refuse_hashing(monkeypatch)
    with pytest.raises(CorruptCheckpointError, match="truncated, padded"):
        AutoDeltaModel.from_finetuned(tmp_path, tiny_bert())


def test_shapes_that_do_not_fit_the_backbone_are_refused_without_hashing(tmp_path, monkeypatch):
    from opendelta import IncompatibleCheckpointError

    saved_lora(tmp_path)
    refuse_hashing(monkeypatch)
    with pytest.raises(IncompatibleCheckpointError, match=r"checkpoint \(8, 32\) vs backbone \(8, 48\)"):
        AutoDeltaModel.from_finetuned(tmp_path, tiny_bert(hidden_size=48, intermediate_size=37))


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize("path", [None, 5, "bad\0path", b"bytes/path", ""])
def test_a_load_path_that_is_not_a_path_is_a_typed_error(path):
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(CheckpointPathError):
        AutoDeltaModel.from_finetuned(path, model)
    with pytest.raises(CheckpointPathError):
        AutoDeltaConfig.from_finetuned(path)
    assert_unchanged(model, before)


@pytest.mark.parametrize("format", ["opendelta", "peft"])
def test_saving_onto_an_existing_file_is_a_typed_error_and_keeps_the_file(tmp_path, format):
    model = tiny_bert()
    delta = LoraModel(model)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(CheckpointPathError, match="existing file"):
        delta.save_finetuned(tmp_path / "file", format=format)
    assert (tmp_path / "file").read_text() == "mine"


def test_saving_to_a_path_with_a_nul_byte_is_a_typed_error(tmp_path):
    with pytest.raises(CheckpointPathError, match="NUL"):
        LoraModel(tiny_bert()).save_finetuned(str(tmp_path) + "/a\0b")


# ---------------------------------------------------------------- malformed native config

NATIVE_EDITS = {
    "config missing": (lambda m: m.pop("config"), CorruptCheckpointError, "'config'"),
    "config null": (lambda m: m.update(config=None), CorruptCheckpointError, "'config'"),
    "config a list": (lambda m: m.update(config=[]), CorruptCheckpointError, "'config'"),
    "delta_type a list": (lambda m: m.update(delta_type=["lora"]), CorruptCheckpointError, "'delta_type'"),
    "delta_type a dict": (lambda m: m.update(delta_type={"a": 1}), CorruptCheckpointError, "'delta_type'"),
    "format_version a string": (lambda m: m.update(format_version="2"), CorruptCheckpointError, "'format_version'"),
    "format_version null": (lambda m: m.update(format_version=None), CorruptCheckpointError, "'format_version'"),
    "format_version true": (lambda m: m.update(format_version=True), CorruptCheckpointError, "'format_version'"),
    "weights a string": (lambda m: m.update(weights="x"), CorruptCheckpointError, "'weights'"),
    "weights.file an int": (lambda m: m["weights"].update(file=5), CorruptCheckpointError, "'weights.file'"),
    "stacks a list": (lambda m: m.update(stacks=[]), CorruptCheckpointError, "'stacks'"),
    "stacks of strings": (lambda m: m.update(stacks={k: "x" for k in m["stacks"]}), CorruptCheckpointError, "'stacks'"),
    "shared_tensors a list": (lambda m: m.update(shared_tensors=[]), CorruptCheckpointError, "'shared_tensors'"),
    "backbone a list": (lambda m: m.update(backbone=[]), CorruptCheckpointError, "'backbone'"),
    "backbone_tensors a list": (lambda m: m.update(backbone_tensors=[]), CorruptCheckpointError, "'backbone_tensors'"),
    "modules a string": (lambda m: m.update(modules="query"), CorruptCheckpointError, "'modules'"),
    "top level a list": (lambda m: m.clear(), CorruptCheckpointError, "not an opendelta checkpoint"),
    "config with an unknown key": (lambda m: m["config"].update(lora_rank=4), DeltaConfigError, "lora_rank"),
}


@pytest.mark.parametrize("edit", NATIVE_EDITS, ids=list(NATIVE_EDITS))
def test_a_malformed_native_config_field_is_a_typed_error_naming_it(tmp_path, edit):
    change, error, message = NATIVE_EDITS[edit]
    saved_lora(tmp_path)
    edit_json(tmp_path / CONFIG_NAME, change)
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        AutoDeltaModel.from_finetuned(tmp_path, model)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000 + "]" * 100_000, '{"format": NaN}', '{"format": -Infinity}', '{"format": 1e999}', '{"a": 1, "a": 2}', "\xff"],
    ids=["deeply nested", "NaN", "-Infinity", "overflow to inf", "repeated key", "not UTF-8"],
)
def test_deeply_nested_or_non_standard_json_is_corrupt(tmp_path, text):
    saved_lora(tmp_path)
    (tmp_path / CONFIG_NAME).write_bytes(text.encode("latin-1"))
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        AutoDeltaModel.from_finetuned(tmp_path, tiny_bert())


def test_an_unexpected_exception_from_the_config_layer_comes_out_typed(tmp_path, monkeypatch):
    saved_lora(tmp_path)

    def broken(self):
        raise KeyError("surprise")

    monkeypatch.setattr(LoraConfig, "validate", broken)
    with pytest.raises(DeltaConfigError, match="surprise"):
        AutoDeltaModel.from_finetuned(tmp_path, tiny_bert())
    with pytest.raises(DeltaConfigError, match="surprise"):
        AutoDeltaConfig.from_finetuned(tmp_path)


def json_paths(value, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        yield from json_paths(child, (*prefix, key))


REPLACEMENTS = [None, "", "x", 0, -1, 1.5, True, [], {}, ["x"], {"x": 1}]


def test_every_single_edit_of_the_config_outside_the_method_arguments_is_refused_or_loads_identically(tmp_path):
    """A property over ~400 edits: types swapped, fields deleted, values nulled. (The method's
    arguments under "config" are validated by the config layer and tested there.)"""
    delta, tuned = saved_lora(tmp_path / "ckpt")
    reference = read_checkpoint(tmp_path / "ckpt")
    original = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    edits = []
    for path, value in json_paths(original):
        if path and not (path[0] == "config" and len(path) > 1):
            edits += [(path, "delete")] + [(path, r) for r in REPLACEMENTS if r != value or type(r) is not type(value)]
    assert len(edits) > 300
    model, refused, loaded = tiny_bert(), 0, 0
    before = snapshot(model)
    for path, replacement in edits:
        meta = copy.deepcopy(original)
        parent = meta
        for key in path[:-1]:
            parent = parent[key]
        if replacement == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = replacement
        (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(meta))
        try:
            loaded_delta = AutoDeltaModel.from_finetuned(tmp_path / "ckpt", model)
        except OpenDeltaError:
            refused += 1
            assert_unchanged(model, before)
            continue
        loaded += 1
        assert torch.equal(hidden(model, inputs_for("bert")), tuned), (path, replacement)
        assert all(torch.equal(reference.tensors[k], v) for k, v in read_checkpoint(tmp_path / "ckpt").tensors.items())
        assert isinstance(loaded_delta, LoraModel)
        model = tiny_bert()
        before = snapshot(model)
    assert refused > 0 and loaded > 0  # both outcomes happen: names and versions are free text


# ---------------------------------------------------------------- malformed PEFT config


def peft_folder(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    model = tiny_bert()
    delta = LoraModel(model, modified_modules=["query", "value"], lora_r=4, lora_alpha=8)
    perturb(delta)
    delta.save_finetuned(tmp_path / "peft", format="peft")
    return tmp_path / "peft", hidden(model, inputs_for("bert"))


PEFT_EDITS = {
    "top level an array": [1],
    "top level a string": "LORA",
    "top level null": None,
    "r a string": {"r": "abc"},
    "r null": {"r": None},
    "r a list": {"r": [8]},
    "r a fraction": {"r": 8.7},
    "r a bool": {"r": True},
    "lora_alpha a string": {"lora_alpha": "x"},
    "lora_alpha null": {"lora_alpha": None},
    "lora_dropout a string": {"lora_dropout": "x"},
    "use_rslora a string": {"use_rslora": "false"},
    "use_rslora a number": {"use_rslora": 0},
    "rank_pattern a list": {"rank_pattern": ["query"]},
    "rank_pattern of strings": {"rank_pattern": {"query": "2"}},
    "alpha_pattern a string": {"alpha_pattern": "value"},
    "target_modules a number": {"target_modules": 5},
    "modules_to_save a dict": {"modules_to_save": {"a": 1}},
    "auto_mapping a list": {"auto_mapping": []},
    "fan_in_fan_out a string": {"fan_in_fan_out": "no"},
}


@pytest.mark.parametrize("edit", PEFT_EDITS, ids=list(PEFT_EDITS))
def test_a_malformed_peft_config_field_is_a_peft_format_error_naming_it(tmp_path, edit):
    folder, _ = peft_folder(tmp_path)
    change = PEFT_EDITS[edit]
    if isinstance(change, dict):
        config = json.loads((folder / PEFT_CONFIG_NAME).read_text())
        config.update(change)
        change = config
    (folder / PEFT_CONFIG_NAME).write_text(json.dumps(change))
    model = tiny_bert()
    before = snapshot(model)
    name = next(iter(PEFT_EDITS[edit])) if isinstance(PEFT_EDITS[edit], dict) else "JSON object"
    with pytest.raises(PeftFormatError, match=name):
        AutoDeltaModel.from_finetuned(folder, model)
    assert_unchanged(model, before)


def test_a_peft_rank_that_differs_from_the_tensors_is_refused_before_any_layer_is_built(tmp_path, monkeypatch):
    folder, _ = peft_folder(tmp_path)
    edit_json(folder / PEFT_CONFIG_NAME, lambda c: c.update(r=4096))
    monkeypatch.setattr(LoraModel, "_setup", lambda *a: pytest.fail("a layer was built"))
    with pytest.raises(CorruptCheckpointError, match="rank 4.*r=4096"):
        AutoDeltaModel.from_finetuned(folder, tiny_bert())


@pytest.mark.parametrize("edit", [{"r": 0}, {"lora_dropout": 1.5}], ids=["r zero", "dropout above one"])
def test_a_peft_value_out_of_range_is_a_config_error(tmp_path, edit):
    folder, _ = peft_folder(tmp_path)
    edit_json(folder / PEFT_CONFIG_NAME, lambda c: c.update(edit))
    with pytest.raises(DeltaConfigError, match={"r": "lora_r", "lora_dropout": "lora_dropout"}[next(iter(edit))]):
        AutoDeltaModel.from_finetuned(folder, tiny_bert())


def test_a_peft_config_with_nan_is_refused(tmp_path):
    folder, _ = peft_folder(tmp_path)
    text = (folder / PEFT_CONFIG_NAME).read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN')
    (folder / PEFT_CONFIG_NAME).write_text(text)
    with pytest.raises(PeftFormatError, match="not valid JSON"):
        AutoDeltaModel.from_finetuned(folder, tiny_bert())


def test_a_well_formed_peft_folder_still_loads_identically(tmp_path):
    folder, tuned = peft_folder(tmp_path)
    model = tiny_bert()
    AutoDeltaModel.from_finetuned(folder, model)
    assert torch.equal(hidden(model, inputs_for("bert")), tuned)


def json_kind(value) -> str:
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def test_every_type_swap_or_deletion_in_a_peft_config_is_refused_or_loads_identically(tmp_path):
    """A property over every field of adapter_config.json: deleted (PEFT's default applies), nulled,
    or given a value of another JSON kind. (A same-kind edit such as another lora_alpha is a
    different, valid adapter.)"""
    folder, tuned = peft_folder(tmp_path)
    original = json.loads((folder / PEFT_CONFIG_NAME).read_text())
    edits = [(key, "delete") for key in original] + [
        (key, r) for key, value in original.items() for r in REPLACEMENTS if json_kind(r) != json_kind(value)
    ]
    assert len(edits) > 150
    model, refused, loaded = tiny_bert(), 0, 0
    before = snapshot(model)
    for key, replacement in edits:
        config = dict(original)
        if replacement == "delete":
            del config[key]
        else:
            config[key] = replacement
        (folder / PEFT_CONFIG_NAME).write_text(json.dumps(config))
        try:
            AutoDeltaModel.from_finetuned(folder, model)
        except OpenDeltaError:
            refused += 1
            assert_unchanged(model, before)
            continue
        loaded += 1
        assert torch.equal(hidden(model, inputs_for("bert")), tuned), (key, replacement)
        model = tiny_bert()
        before = snapshot(model)
    assert refused > 0 and loaded > 0  # fields opendelta does not read (task_type, bias...) are free


@pytest.mark.parametrize(
    "entry",
    [{"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]},
     {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, []],
    ids=["dtype a list", "size disagrees with shape", "shape a string", "offsets reversed", "entry a list"],
)  # fmt: skip
def test_a_malformed_safetensors_header_is_corrupt_before_any_data_is_read(tmp_path, monkeypatch, entry):
    saved_lora(tmp_path)
    header = json.dumps({"delta.x": entry}).encode()
    weights_of(tmp_path).write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    refuse_hashing(monkeypatch)
    with pytest.raises(CorruptCheckpointError, match="malformed header entry"):
        AutoDeltaModel.from_finetuned(tmp_path, tiny_bert())
