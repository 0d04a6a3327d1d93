"""The QLoRA benchmark (benchmarks/qlora.py) at smoke size: every setting has both tools' step times,
the round-by-round ratio and the bytes saved for backward, and the quantized backbones are smaller."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package sits beside src/

from benchmarks import qlora  # noqa: E402


def test_qlora_benchmark_reports_every_setting_beside_peft():
    # (without the peak-memory processes: six forked loads cost CI more than they check; --smoke runs them)
    result = qlora.measure("tiny-llama", rounds=2, warmup=0, peak=False)
    assert set(result["settings"]) == {name for name, _, _ in qlora.SETTINGS}
    for figures in result["settings"].values():
        assert set(figures["seconds"]) == set(qlora.TOOLS)
        assert all(s["median"] > 0 and s["n"] == 2 for s in figures["seconds"].values())
        assert figures["ratio"]["median"] > 0 and figures["cpu_ratio"]["median"] > 0
        assert all(b > 0 for b in figures["saved_bytes"].values())
    fp32 = result["backbone_bytes"]["fp32"]
    assert result["backbone_bytes"]["nf4-fp32"] < result["backbone_bytes"]["int8"] < fp32


def test_int8_layers_add_the_same_work_to_our_lora_step_as_to_peft():
    # exact counts (benchmarks/qlora.py --counts), not times: what the int8 backbone adds to a LoRA training step
    # is bitsandbytes' own work, the same for both tools, and our step runs no more aten ops than PEFT's and
    # creates no more bytes of new tensors
    result = qlora.counts("tiny-llama", ["int8", "fp32"])
    for tool in qlora.TOOLS:
        assert result["int8"][tool]["ops"] != result["fp32"][tool]["ops"]  # the quantized layers are counted
    added = {
        tool: qlora.op_differences(result["int8"][tool]["ops"], result["fp32"][tool]["ops"]) for tool in qlora.TOOLS
    }
    assert added["opendelta"] == added["peft"]
    for name in ("int8", "fp32"):
        ours, peft = result[name]["opendelta"], result[name]["peft"]
        assert ours["aten_ops"] <= peft["aten_ops"]
        assert ours["new_bytes"] <= peft["new_bytes"]
        assert ours["saved_bytes"] == peft["saved_bytes"]
