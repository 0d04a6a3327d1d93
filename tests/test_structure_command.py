"""``opendelta structure``: prints the role mapping and where it came from."""

from __future__ import annotations

import argparse

from support.families import BY_NAME
from transformers import AutoConfig

from opendelta import structure
from opendelta.commands import structure as command


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command", required=True))
    return command.run(parser.parse_args(["structure", *argv]))


def test_model_type_prints_each_role_once_per_pattern_and_the_source(capsys):
    assert run(["--model-type", "llama"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "LlamaModel at (root): model type 'llama', family table"
    assert "  attn.q      layers.*.self_attn.q_proj  (x32)" in out.splitlines()


def test_a_local_model_directory_is_read_from_its_config(tmp_path, capsys):
    BY_NAME["GPT-2"].config().save_pretrained(tmp_path)
    assert run([str(tmp_path), "--paths"]) == 0
    out = capsys.readouterr().out
    assert "  attn.qkv    h.1.attn.c_attn" in out.splitlines()


def test_an_unmapped_model_says_its_roles_were_inferred(capsys, monkeypatch):
    monkeypatch.setattr(structure, "FAMILIES", {})
    assert run(["--model-type", "qwen2"]) == 0
    out = capsys.readouterr().out
    layers = AutoConfig.for_model("qwen2").num_hidden_layers
    assert "model type 'qwen2', inferred from the module tree" in out
    assert f"    layer stack 'layers': {layers} x Qwen2DecoderLayer" in out.splitlines()


def test_an_unknown_model_type_is_a_clean_error(capsys):
    assert run(["--model-type", "no-such-model"]) == 2
    assert "cannot build a model from 'no-such-model'" in capsys.readouterr().err


def test_a_misspelt_model_type_suggests_the_close_ones_only(capsys):
    assert run(["--model-type", "lama"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'llama'" in err
    assert "bert" not in err  # not the whole list of model types
