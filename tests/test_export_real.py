"""export_merged on the real SmolLM2-135M in bfloat16: the reloaded model generates the merged model's tokens."""

from __future__ import annotations

import pytest
import torch

from opendelta import LoraModel
from opendelta.demo.assets import MissingAssetError, smollm2_gguf

pytestmark = pytest.mark.real


def test_smollm2_bf16_export_merged_reloads_and_generates_the_same_greedy_tokens(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    try:
        gguf = smollm2_gguf()
    except MissingAssetError as exc:
        pytest.skip(str(exc))
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # a model loaded from GGUF keeps its GGUF quantizer, which save_pretrained refuses: rebuild it as a plain model
    config = dequantized.config.to_dict()
    config.pop("quantization_config")
    model = type(dequantized)(type(dequantized.config).from_dict(config))
    model.load_state_dict(dequantized.state_dict())
    # loaded the way the export will be, so both compute alike (a .to(bfloat16) would also round RoPE's buffers)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16).eval()
    delta = LoraModel(model, modified_modules=["q_proj", "v_proj", "down_proj"], lora_r=8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    ids = torch.randint(100, 40000, (2, 8), generator=generator)
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)

    delta.export_merged(tmp_path / "merged")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16).eval()
    delta.merge()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reloaded.state_dict().items())
    with torch.no_grad():
        merged_logits = model(ids).logits
        merged_tokens = model.generate(ids, **settings)
        assert torch.equal(reloaded(ids).logits, merged_logits)
        assert torch.equal(reloaded.generate(ids, **settings), merged_tokens)
