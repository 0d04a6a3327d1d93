"""Multi-task training in one transformers.Trainer run: a task column routes each row to its task's delta."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from datasets import Dataset
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from opendelta import LoraModel, MixedBatchError
from opendelta.multitask_trainer import ROWS_KEY, TaskRouting
from opendelta.routing import mixing_anywhere

TASKS = ("sentiment", "topic", "summary")


def rows(n: int = 24, tasks: tuple[str, ...] = TASKS) -> Dataset:
    """`n` rows of 6 token ids, the tasks in turn, labels = the ids (causal LM)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 99, (n, 6), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids, "task": [tasks[i % len(tasks)] for i in range(n)]})


def model_with_tasks() -> tuple[torch.nn.Module, dict[str, LoraModel]]:
    model = tiny_llama().train()
    torch.manual_seed(1)
    deltas = {t: LoraModel(model, modified_modules=["q_proj", "v_proj"], lora_r=4, name=t) for t in TASKS}
    deltas[TASKS[0]].freeze_module(exclude=["deltas"], set_state_dict=True)
    return model, deltas


def args(out: Path, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=6, learning_rate=1e-2,
        lr_scheduler_type="constant", save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, logging_strategy="no", remove_unused_columns=False,
    )
    return TrainingArguments(**{**values, **overrides})


def trainer(out: Path, data: Dataset | None = None, **overrides) -> tuple[Trainer, torch.nn.Module, TaskRouting]:
    model, deltas = model_with_tasks()
    routing = TaskRouting(model, deltas)
    t = Trainer(model=model, args=args(out, **overrides), train_dataset=data if data is not None else rows(tasks=TASKS[:2]),
                data_collator=routing.collate, callbacks=[routing])
    return t, model, routing


def trained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, TaskRouting]:
    """One uninterrupted run of 4 steps, checkpoints at 2 and 4; no row of the data is of the last task."""
    out = tmp_path_factory.mktemp("straight")
    t, model, routing = trainer(out)
    t.train()
    return out, model, routing


def test_checkpoints_hold_only_delta_tensors_and_each_task_in_its_own_folder(straight) -> None:
    tmp_path, model, routing = straight
    now = trained(model)
    assert now and all(".lora." in n or n.split(".")[-2] in TASKS for n in now)
    saved = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    assert set(saved) == set(now) and all(torch.equal(saved[k], v) for k, v in now.items())
    for task, delta in routing.tasks.deltas.items():
        fresh = tiny_llama()
        loaded = LoraModel.from_finetuned(tmp_path / "checkpoint-4" / "deltas" / task, fresh)
        assert all(torch.equal(a, b) for a, b in zip(loaded.delta_parameters(), delta.delta_parameters()))
    assert (tmp_path / "checkpoint-2" / "deltas" / "topic").is_dir()


def test_resume_from_checkpoint_continues_exactly_as_the_uninterrupted_run(straight, tmp_path: Path) -> None:
    expected = trained(straight[1])

    first, _, _ = trainer(tmp_path / "part", max_steps=2)
    first.train()
    resumed, model, _ = trainer(tmp_path / "part")
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))

    assert resumed.state.global_step == 4
    now = trained(model)
    assert now.keys() == expected.keys() and all(torch.equal(now[k], expected[k]) for k in now)


def test_a_rows_gradient_reaches_only_its_tasks_delta(tmp_path: Path) -> None:
    model, deltas = model_with_tasks()
    with TaskRouting(model, deltas) as routing:
        batch = routing.collate([rows(6)[i] for i in range(6)])  # tasks 0,1,2,0,1,2
        assert batch[ROWS_KEY].tolist() == [0, 1, 2, 0, 1, 2]
        logits = model(input_ids=batch["input_ids"], **{ROWS_KEY: batch[ROWS_KEY]}).logits
    logits[4].sum().backward()  # a row of "topic"
    for task, delta in deltas.items():
        grads = [p.grad for p in delta.delta_parameters()]
        if task == "topic":
            assert all(g is not None for g in grads) and any(g.any() for g in grads)
        else:
            assert all(g is None or not g.any() for g in grads), task


def test_only_the_tasks_in_the_data_train(straight) -> None:
    _, _, routing = straight
    _, untrained = model_with_tasks()
    for task, delta in routing.tasks.deltas.items():
        same = all(torch.equal(a, b) for a, b in zip(untrained[task].delta_parameters(), delta.delta_parameters()))
        assert same == (task == "summary"), task


def test_a_row_whose_task_has_no_delta_is_a_typed_error(tmp_path: Path) -> None:
    t, model, _ = trainer(tmp_path, data=rows(tasks=("sentiment", "translation")), max_steps=1)
    before = trained(model)
    with pytest.raises(MixedBatchError, match="'translation', which has no delta"):
        t.train()
    assert all(torch.equal(p, before[n]) for n, p in trained(model).items())


def test_the_trainer_dropping_the_task_column_is_refused_with_the_fix(tmp_path: Path) -> None:
    model, deltas = model_with_tasks()
    routing = TaskRouting(model, deltas)
    with pytest.raises(MixedBatchError, match="remove_unused_columns=False"):
        Trainer(model=model, args=args(tmp_path, remove_unused_columns=True), train_dataset=rows(),
                data_collator=routing.collate, callbacks=[routing])
    with pytest.raises(MixedBatchError, match="no 'task' column"):
        routing.collate([{"input_ids": [1, 2]}])


def test_gradient_checkpointing_is_refused() -> None:
    model, deltas = model_with_tasks()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with TaskRouting(model, deltas) as routing:
        batch = routing.collate([rows(3)[i] for i in range(3)])
        with pytest.raises(MixedBatchError, match="gradient checkpointing"):
            model(input_ids=batch["input_ids"], **{ROWS_KEY: batch[ROWS_KEY]})
    assert not mixing_anywhere(model)  # the refused forward left no mixed batch open


@pytest.mark.parametrize("bad", [{}, {"a/b": None}, {"": None}])
def test_bad_task_names_or_deltas_are_refused(bad: dict) -> None:
    model, deltas = model_with_tasks()
    with pytest.raises(MixedBatchError):
        TaskRouting(model, {k: deltas["topic"] for k in bad})


def test_remove_takes_the_hooks_off() -> None:
    model, deltas = model_with_tasks()
    hooks = (dict(model._forward_pre_hooks), dict(model._forward_hooks))
    routing = TaskRouting(model, deltas)
    routing.remove()
    routing.remove()
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks


def test_the_throughput_benchmark_runs_mixed_and_sequential_on_the_same_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from benchmarks.multitask_training import main

    result = main(["--smoke"])
    assert result["rows_per_pass"] == 8 and set(result["rows_per_second"]) == {"mixed", "sequential"}
    assert all(v > 0 for v in result["rows_per_second"].values()) and result["ratio mixed / sequential"]["median"] > 0
