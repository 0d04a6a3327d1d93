"""AdaLoRA: the SVD-form layer, the budget schedule step by step against PEFT's, exact rank masks through
save/reload and PEFT's format, and the HF Trainer callback."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from support.ecosystem_fixtures import randomize_deltas
from support.numerics import assert_changed, assert_within_noise
from support.three_families import FAMILIES, IDS, LINEARS, fresh, noise, out

from opendelta import AdaLoraModel, AutoDeltaModel, DeltaConfigError, LifecycleError

SCHEDULE = {"init_r": 4, "target_r": 2, "total_step": 8, "tinit": 1, "tfinal": 2, "deltaT": 1}
PLACES = ["q_proj", "v_proj"]


def adalora(model, family: str = "llama", **kwargs) -> AdaLoraModel:
    return AdaLoraModel(model, modified_modules=LINEARS[family], **{**SCHEDULE, **kwargs})


def lm_loss(model) -> torch.Tensor:
    return model(input_ids=IDS, labels=IDS).loss


def train_with_peft_beside(steps: int) -> tuple[AdaLoraModel, peft.PeftModel]:
    """Our AdaLoRA and PEFT's on two copies of tiny LLaMA, from the same starting factors, trained side by
    side with plain SGD (our loss adds orthogonal_regularization(), PEFT's model adds it itself)."""
    theirs = peft.get_peft_model(fresh("llama"), peft.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=PLACES, **SCHEDULE))
    model = fresh("llama")
    ours = AdaLoraModel(model, modified_modules=PLACES, **SCHEDULE)
    ours.freeze_module()
    with torch.no_grad():
        for path, layer in ours.layers.items():
            twin = theirs.base_model.model.get_submodule(path)
            for name in ("lora_A", "lora_B", "lora_E"):
                getattr(layer, name).copy_(getattr(twin, name)["default"])
    their_opt = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    our_opt = torch.optim.SGD(ours.delta_parameters(), lr=0.5)
    theirs.train(), model.train()
    for step in range(steps):
        theirs(input_ids=IDS, labels=IDS).loss.backward()
        their_opt.step()
        theirs.base_model.update_and_allocate(step)
        their_opt.zero_grad()
        (lm_loss(model) + ours.orthogonal_regularization()).backward()
        our_opt.step()
        ours.update_and_allocate(step)
        our_opt.zero_grad()
    return ours, theirs.eval()


def test_the_schedule_prunes_the_same_ranks_as_peft_step_by_step():
    ours, theirs = train_with_peft_beside(SCHEDULE["total_step"])
    pattern = theirs.peft_config["default"].rank_pattern
    assert ours.rank_pattern() == {k.removesuffix(".lora_E.default"): v for k, v in pattern.items()}
    assert sum(map(sum, ours.rank_pattern().values())) == SCHEDULE["target_r"] * len(ours.layers)
    for path, layer in ours.layers.items():
        twin = theirs.base_model.model.get_submodule(path)
        for name in ("lora_A", "lora_B", "lora_E"):
            assert torch.allclose(getattr(layer, name), getattr(twin, name)["default"], rtol=1e-4, atol=1e-6), (path, name)
        assert not layer.lora_E[~layer.rank_mask].any()  # pruned triplets have no singular value


def test_rank_masks_save_and_reload_exactly_and_round_trip_through_peft(tmp_path):
    ours, _ = train_with_peft_beside(SCHEDULE["total_step"])
    model = ours.backbone_model.eval()
    tuned = out(model)
    ours.save_finetuned(tmp_path / "ours")
    again = AutoDeltaModel.from_finetuned(tmp_path / "ours", backbone_model=fresh("llama"))
    assert again.rank_pattern() == ours.rank_pattern()
    assert torch.equal(out(again.backbone_model), tuned)

    ours.save_finetuned(tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"] == {f"{k}.lora_E": v for k, v in ours.rank_pattern().items()}
    theirs = peft.PeftModel.from_pretrained(fresh("llama"), tmp_path / "peft")
    assert_within_noise(out(theirs), tuned, noise(model))

    theirs.save_pretrained(tmp_path / "from_peft")  # PEFT's own pruned folder with its rank_pattern
    back = AutoDeltaModel.from_finetuned(tmp_path / "from_peft", backbone_model=fresh("llama"))
    assert back.rank_pattern() == ours.rank_pattern()
    assert_within_noise(out(back.backbone_model), tuned, noise(model))
    assert_changed(tuned, out(fresh("llama")))


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adalora_folder_with_all_ranks_loads_with_equal_outputs(family, tmp_path):
    made = peft.get_peft_model(fresh(family), peft.AdaLoraConfig(target_modules=LINEARS[family], **SCHEDULE))
    randomize_deltas_peft(made)
    expected = out(made.eval())
    made.save_pretrained(tmp_path)
    delta = AutoDeltaModel.from_finetuned(tmp_path, backbone_model=fresh(family))
    assert isinstance(delta, AdaLoraModel)
    assert_within_noise(out(delta.backbone_model), expected, noise(fresh(family)))
    delta.save_finetuned(tmp_path / "back", format="peft")
    assert_within_noise(out(peft.PeftModel.from_pretrained(fresh(family), tmp_path / "back")), expected, noise(fresh(family)))


def randomize_deltas_peft(model) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adalora_changes_nothing_merge_unmerge_and_detach_are_exact(family):
    model = fresh(family)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    original = out(model)
    delta = adalora(model, family)
    assert torch.equal(out(model), original)
    randomize_deltas(delta)
    tuned = out(model)
    delta.merge()
    assert_within_noise(out(model), tuned, noise(model))
    delta.unmerge()
    assert torch.equal(out(model), tuned)
    delta.detach()
    assert torch.equal(out(model), original)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())



def test_trainer_callback_allocates_the_budget_under_hf_trainer(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = fresh("llama")
    delta = AdaLoraModel(model, modified_modules=PLACES, **SCHEDULE)
    delta.freeze_module()
    rows = [{"input_ids": ids, "labels": ids} for ids in IDS.tolist()]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=SCHEDULE["total_step"], per_device_train_batch_size=2, learning_rate=0.05,
        report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )
    before = {p: layer.lora_A.detach().clone() for p, layer in delta.layers.items()}
    Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), callbacks=[delta.trainer_callback()]).train()
    assert sum(map(sum, delta.rank_pattern().values())) == SCHEDULE["target_r"] * len(delta.layers)
    assert all(not layer.lora_E[~layer.rank_mask].any() for layer in delta.layers.values())
    assert any(not torch.equal(before[p], layer.lora_A) for p, layer in delta.layers.items())


def test_update_and_allocate_needs_total_step_and_gradients():
    model = fresh("llama")
    delta = AdaLoraModel(model, modified_modules=PLACES, init_r=4, target_r=2)
    with pytest.raises(DeltaConfigError, match="total_step"):
        delta.update_and_allocate(0)
    scheduled = AdaLoraModel(fresh("llama"), modified_modules=PLACES, **SCHEDULE)
    with pytest.raises(LifecycleError, match="backward"):
        scheduled.update_and_allocate(0)


@pytest.mark.parametrize(
    "args, match",
    [({"init_r": 2, "target_r": 4}, "target_r"), ({"total_step": 4, "tinit": 3, "tfinal": 1}, "budgeting phase"),
     ({"beta1": 1.0}, "beta1"), ({"orth_reg_weight": -1}, "orth_reg_weight")],
)
def test_bad_schedules_are_config_errors(args, match):
    with pytest.raises(DeltaConfigError, match=match):
        AdaLoraModel(fresh("llama"), modified_modules=PLACES, **args)
