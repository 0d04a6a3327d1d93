"""Mixed-task batches on the real SmolLM2-135M: four LoRA tasks and the bare model in one batch."""

from __future__ import annotations

import pytest
import torch
from support.numerics import assert_within_noise, batching_noise, float32_noise, max_abs_diff, noise_bound

from opendelta import IA3Model, LoraModel, mixed_batch

pytestmark = pytest.mark.real


def test_smollm2_mixed_batch_and_generate_equal_each_row_alone(smollm2_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (5, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[2, :2] = 0  # a left-padded row

    def forward(m: torch.nn.Module, r: slice) -> torch.Tensor:
        return m(input_ids=ids[r], attention_mask=mask[r]).logits

    # The bare backbone's own rounding on this CPU: batched vs row by row, and float32 vs float64. A mixed
    # batch may move a row by no more than that (times MARGIN), since it batches the same math.
    noise = (batching_noise(model, forward, len(ids)), float32_noise(model, forward))
    deltas = [LoraModel(model, name=f"lora{i}") for i in range(3)] + [IA3Model(model, name="ia3")]
    with torch.no_grad():
        for d in deltas:
            for p in d.delta_parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
    rows = [3, 0, -1, 2, 1]
    settings = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with mixed_batch(deltas, rows):
            logits = model(input_ids=ids, attention_mask=mask).logits
            generated = model.generate(ids, attention_mask=mask, **settings)
        for d in deltas:
            d.detach()
        for i, r in enumerate(rows):
            bare = forward(model, slice(i, i + 1))
            if r >= 0:
                deltas[r].attach()
            alone = forward(model, slice(i, i + 1))
            assert_within_noise(logits[i : i + 1], alone, *noise)
            if r >= 0:  # the bound tells tasks apart: each delta moves its row far beyond it
                assert max_abs_diff(alone, bare) > noise_bound(alone, *noise)
            assert torch.equal(generated[i : i + 1], model.generate(ids[i : i + 1], attention_mask=mask[i : i + 1], **settings))
            if r >= 0:
                deltas[r].detach()
