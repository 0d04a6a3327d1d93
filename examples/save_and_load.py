"""Save only the delta (kilobytes), then load it into a freshly built backbone and get the same outputs."""

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from opendelta import AutoDeltaModel, BitFitModel


def backbone() -> GPT2LMHeadModel:
    torch.manual_seed(0)  # the same "pretrained" weights every time
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=99, bos_token_id=0, eos_token_id=0)).eval()


model = backbone()
delta = BitFitModel(model)
delta.freeze_module(exclude=["deltas"])
ids = torch.randint(0, 99, (2, 12))
optimizer = torch.optim.AdamW(delta.delta_parameters(), lr=1e-2)
for _ in range(5):
    logits = model(input_ids=ids).logits  # next-token loss written out: transformers has no loss name for GPT2LMHeadModel
    F.cross_entropy(logits[:, :-1].reshape(-1, 99), ids[:, 1:].reshape(-1)).backward()
    optimizer.step()
    optimizer.zero_grad()
with torch.no_grad():
    expected = model(input_ids=ids).logits

with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "bitfit"
    delta.save_finetuned(path)
    size = sum(f.stat().st_size for f in path.iterdir())
    fresh = backbone()
    AutoDeltaModel.from_finetuned(path, backbone_model=fresh)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, expected)
model_size = sum(p.numel() * p.element_size() for p in fresh.parameters())
print(f"checkpoint {size / 1024:.1f} KiB (model {model_size / 1024:.0f} KiB); reloaded outputs identical")
