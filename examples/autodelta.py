"""The paper's Figure 5: AutoDelta builds any method from a config and reloads any checkpoint.

    python examples/autodelta.py          # the real all-MiniLM-L6-v2
    python examples/autodelta.py --tiny   # a tiny BERT built from a config
"""

import argparse
import tempfile

import torch
from transformers import AutoModel, BertConfig, BertModel

from opendelta import AutoDeltaConfig, AutoDeltaModel


def load(tiny: bool):
    torch.manual_seed(0)
    if tiny:
        return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                    vocab_size=99)).eval()
    from opendelta.demo.assets import minilm_dir

    return AutoModel.from_pretrained(minilm_dir()).eval()


parser = argparse.ArgumentParser()
parser.add_argument("--tiny", action="store_true")
tiny = parser.parse_args().tiny
model = load(tiny)
inputs = {"input_ids": torch.tensor([[1, 5, 7, 9, 2]])}

# from_config: the default positions for this model family (attention query and value for LoRA)
config = AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": 4})
delta = AutoDeltaModel.from_config(config, backbone_model=model)
with torch.no_grad():  # stand-in for training: give the zero-initialised LoRA B some values
    for p in delta.delta_parameters():
        p.add_(0.01)
    expected = model(**inputs).last_hidden_state

with tempfile.TemporaryDirectory() as ckpt:
    delta.save_finetuned(ckpt)
    # from_finetuned: type, arguments and positions come from the checkpoint
    fresh = load(tiny)
    AutoDeltaModel.from_finetuned(ckpt, backbone_model=fresh)
    with torch.no_grad():
        assert torch.equal(fresh(**inputs).last_hidden_state, expected)
print(f"{delta.delta_type} rebuilt from its checkpoint: outputs identical")
