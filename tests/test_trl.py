"""TRL's SFTTrainer on a tiny LLaMA: DeltaGradientCheck names a delta its fused LM head bypasses."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from opendelta import LoraModel, UnreachedModuleError

trl = pytest.importorskip("trl")
ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("trl_sft", ROOT / "examples" / "trl_sft.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def _sft(modules: list[str], tmp_path: Path):
    import datasets

    from opendelta.training_checks import DeltaGradientCheck

    example = _example()
    model, tokenizer = example.tiny_model_and_tokenizer()
    delta = LoraModel(model, modified_modules=modules, lora_r=4)
    delta.freeze_module(exclude=["deltas"], set_state_dict=True)
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
        use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True, max_length=48,
    )
    data = datasets.Dataset.from_list(example.zen_chats()[:2])
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             callbacks=[DeltaGradientCheck(delta)])
    return trainer, delta


def test_sft_fused_lm_head_bypassing_a_delta_on_lm_head_is_an_error_not_a_silent_no_op(tmp_path) -> None:
    trainer, delta = _sft(["lm_head"], tmp_path)
    with pytest.raises(UnreachedModuleError, match="no gradient to the delta on .*'lm_head'"):
        trainer.train()
    assert all(torch.count_nonzero(layer.lora_B) == 0 for layer in delta.layers.values())


def test_sft_trains_a_delta_the_forward_reaches_past_the_gradient_check(tmp_path) -> None:
    trainer, delta = _sft(["q_proj", "v_proj"], tmp_path)
    trainer.train()
    assert all(torch.count_nonzero(layer.lora_B) > 0 for layer in delta.layers.values())
