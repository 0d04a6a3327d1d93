"""Distributed training under real torchrun (2 processes, gloo, CPU): DDP, FSDP2 and DeepSpeed ZeRO-3.

Each run trains LoRA (and the classifier head) for a few steps and saves on every rank; a single
process then loads the checkpoint and must reproduce the distributed model's logits exactly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.ecosystem_fixtures import tiny_bert
from support.numerics import assert_changed
from safetensors.torch import load_file

from opendelta import LoraModel
from opendelta.checkpoint import backbone_fingerprint, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "distributed" / "train_lora.py"


def _torchrun(script: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    # a new session, so a timeout can end the workers too, not only the launcher
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun {script.name} {' '.join(args)} did not finish in {timeout} s:\n{stdout[-2000:]}{stderr[-2000:]}")
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _deepspeed_missing_reason() -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install deepspeed==0.19.8; see docs/scaling_out.md)"
    return None


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "deepspeed"])
def test_delta_trained_under_torchrun_reloads_in_one_process_with_equal_outputs(engine, tmp_path):
    if engine == "deepspeed" and (reason := _deepspeed_missing_reason()):
        pytest.skip(reason)
    result = _torchrun(EXAMPLE, "--engine", engine, "--out", str(tmp_path))
    assert "step 2: loss" in result.stdout

    expected = load_file(tmp_path / "expected.safetensors")
    model = tiny_bert()
    LoraModel.from_finetuned(tmp_path / "delta", model)
    logits = model(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"]).logits
    assert torch.equal(logits, expected["logits"])
    assert_changed(expected["logits"], tiny_bert()(input_ids=expected["input_ids"]).logits)

    saved = read_checkpoint(tmp_path / "delta").tensors
    assert sorted({k.rsplit(".", 1)[-1] for k in saved}) == ["bias", "lora_A", "lora_B", "weight"]
    assert sum(k.startswith("delta.") for k in saved) == 2 * 2 * 2  # query+value in 2 layers, A and B
    assert sorted(k for k in saved if k.startswith("backbone.")) == ["backbone.classifier.bias", "backbone.classifier.weight"]
    meta = json.loads((tmp_path / "delta" / "delta_config.json").read_text())
    assert meta["backbone"]["class"] == "BertForSequenceClassification"
    assert meta["backbone"]["fingerprint"] == backbone_fingerprint(model)


def test_save_called_on_one_rank_only_raises_naming_the_absent_rank(tmp_path):
    _torchrun(Path(__file__).with_name("distributed_save_one_rank.py"), str(tmp_path))

    message = (tmp_path / "rank0.txt").read_text()
    assert message.startswith("DistributedSaveError: rank 0: save_finetuned")
    assert "must be called on every rank" in message and "1" in message.split("arrived within")[1]
    assert not (tmp_path / "delta").exists()
