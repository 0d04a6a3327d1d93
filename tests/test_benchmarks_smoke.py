"""The benchmark suite's smoke run: one subprocess, tiny models, a JSON report with every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMED = ("train_step", "inference", "inference_one_model", "construction", "switch", "mixed_batch")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--rounds", "2", "--json", str(out)],
        cwd=ROOT, env=env, check=True, capture_output=True, timeout=600,
    )
    return json.loads(out.read_text())


def _positive_spreads(block: dict) -> bool:
    return all(s["median"] > 0 and s["min"] > 0 and s["n"] >= 2 for s in block.values())


def test_smoke_report_names_the_machine_and_the_command(report):
    assert report["command"].startswith("python -m benchmarks --smoke")
    assert {"cpu", "torch", "transformers", "peft", "opendelta", "commit"} <= set(report["machine"])


def test_every_workload_has_every_timed_figure_with_positive_times_and_ratios(report):
    assert set(report["workloads"]) == {"tiny-bert", "tiny-llama"}
    for workload in report["workloads"].values():
        for figure in TIMED:
            block = workload[figure]
            assert _positive_spreads(block["seconds"]), figure
            assert block["ratios"] and all(r["median"] > 0 for r in block["ratios"].values()), figure
            assert set(block["cpu_ratios"]) == set(block["ratios"])
        assert {"full", "frozen", "opendelta:lora", "peft:lora"} <= set(workload["train_step"]["seconds"])
        assert "opendelta:lora / peft:lora" in workload["train_step"]["ratios"]
        assert {"bare", "opendelta:lora", "peft:lora"} <= set(workload["inference"]["seconds"])
        assert {"bare", "opendelta:lora", "opendelta:lora merged"} == set(workload["inference_one_model"]["seconds"])
        assert "opendelta:lora mixed / peft:lora mixed" in workload["mixed_batch"]["ratios"]


def test_memory_is_measured_for_every_configuration(report):
    for workload in report["workloads"].values():
        memory = workload["memory"]
        assert {"full", "frozen", "opendelta:lora", "peft:lora"} <= set(memory)  # more as methods land
        for figures in memory.values():
            assert figures["peak_bytes"] > 0 and figures["step_bytes"] >= 0 and figures["saved_bytes"] > 0
        assert "opendelta:lora / peft:lora" in workload["memory_ratios"]


def test_checkpoint_bytes_are_tensor_bytes_plus_a_small_overhead(report):
    for workload in report["workloads"].values():
        lora = workload["params_checkpoint"]["opendelta:lora"]
        assert lora["trainable_parameters"] > 0
        assert lora["tensor_bytes"] == 4 * lora["trainable_parameters"]  # fp32
        assert lora["checkpoint_bytes"] == lora["tensor_bytes"] + lora["overhead_bytes"]
        assert 0 < lora["overhead_bytes"] < 16 * 1024


def test_the_meta_skeleton_construction_is_compared_with_peft(report):
    block = report["skeletons"]["tiny-llama-meta"]["construction"]
    assert _positive_spreads(block["seconds"]) and block["ratios"]["opendelta:lora / peft:lora"]["median"] > 0
    assert _positive_spreads(report["skeletons"]["tiny-llama-meta"]["visualisation"]["seconds"])


def test_targets_are_checked_for_each_workload(report):
    names = {t["target"] for t in report["targets"]}
    assert "tiny-bert: LoRA train step / PEFT" in names and "tiny-llama-meta: LoRA construction / PEFT" in names
    assert {"tiny-llama: LoRA merged inference / bare", "tiny-llama-meta: visualisation with LoRA"} <= names
    assert all(isinstance(t["met"], bool) and t["value"] > 0 for t in report["targets"])
