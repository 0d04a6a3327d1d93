"""The VeRA / LoHa / LoKr / OFT / AdaLoRA benchmark beside LoRA and PEFT runs, on a tiny model (the figures
come from real runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_weight_change_benchmark_reports_every_configuration_and_ratio(tmp_path):
    out = tmp_path / "weight_changes.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    subprocess.run(
        [sys.executable, "-m", "benchmarks.weight_changes", "--only", "tiny-bert", "--rounds", "1", "--warmup", "0",
         "--threads", "1", "--no-memory", "--json", str(out)],
        cwd=ROOT, env=env, check=True, capture_output=True, timeout=600,
    )
    result = json.loads(out.read_text())
    tools, methods = ("opendelta", "peft"), ("lora", "vera", "loha", "lokr", "oft", "adalora")
    assert set(result["seconds"]) == {f"{t}:{m}" for t in tools for m in methods}
    assert all(spread["median"] > 0 for spread in result["seconds"].values())
    assert {
        "opendelta:vera / opendelta:lora", "peft:loha / peft:lora", "opendelta:lokr / peft:lokr", "peft:oft / peft:lora",
        "opendelta:adalora / peft:adalora",
    } <= set(result["ratios"])
    assert all(spread["median"] > 0 for spread in result["ratios"].values())
