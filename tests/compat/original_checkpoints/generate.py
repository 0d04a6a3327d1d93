"""How the folders here were made: run in a throwaway venv with the real original, opendelta==0.3.2
(PyPI), transformers 4.40.2 and torch 2.13.0 (its DeltaCenter client stubbed: nothing here uploads),
on the tiny BERT and T5 of tests/compat/compat_models.py (their weights exported from there into
bert.pt / t5.pt):

    python generate.py OUT_DIR

Each folder holds what the original's save_finetuned wrote (config.json, pytorch_model.bin) and
expected.safetensors: the backbone's logits in float64 without the delta ("bare") and with the
original's delta attached ("delta"), first 16 classes. The tests load the folders with opendelta
under transformers 5 and compare. Not run by the test suite."""
import json, shutil, sys
from pathlib import Path
import torch
import transformers as tf
from safetensors.torch import save_file
import opendelta
from opendelta import (BitFitModel, CompacterModel, LowRankAdapterModel, ParallelAdapterModel, PrefixModel,
                       SoftPromptModel)

OUT = Path(sys.argv[1])
IDS = torch.tensor([[5, 17, 42, 8, 63, 2], [9, 3, 77, 1, 30, 4]])


def bert():
    m = tf.BertForMaskedLM(tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=37, attn_implementation="eager"))
    m.load_state_dict(torch.load("bert.pt"), strict=True)
    return m.eval()


def t5():
    m = tf.T5ForConditionalGeneration(tf.T5Config(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2,
                                                  num_heads=4, vocab_size=99, decoder_start_token_id=0))
    missing, unexpected = m.load_state_dict(torch.load("t5.pt"), strict=False)
    assert not unexpected and all("embed_tokens" in k for k in missing), (missing, unexpected)
    return m.eval()


def run(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return [t for t in out.values() if isinstance(t, torch.Tensor)]


CASES = {
    "compacter": (bert, CompacterModel, {"reduction_factor": 4}),
    "low_rank_adapter": (bert, LowRankAdapterModel, {}),
    "parallel_adapter": (bert, ParallelAdapterModel, {}),
    "prefix": (bert, PrefixModel, {"reparameterize": False}),
    "prefix_reparameterized": (bert, PrefixModel, {"embed_dim": 8, "mid_dim": 8}),
    "soft_prompt": (bert, SoftPromptModel, {"soft_token_num": 5, "token_init": False}),
    "bitfit": (bert, BitFitModel, {}),
    "bitfit_t5": (t5, BitFitModel, {"modified_modules": ["layer_norm", "final_layer_norm"]}),
}

for name, (build, cls, kwargs) in CASES.items():
    model = build()
    inputs = {"input_ids": IDS} if build is bert else {"input_ids": IDS, "decoder_input_ids": IDS[:, :4]}
    bare64 = run(model.double(), inputs)
    model = build()
    delta = cls(backbone_model=model, **kwargs)
    run(model, inputs)  # BitFit's BiasLayer makes its bias on the first forward
    delta.freeze_module(exclude=["deltas", "bitfit"], set_state_dict=True)  # "bitfit": its lazily made biases are not marked as deltas
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # trained-looking values (up projections start at zero)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    delta.save_finetuned(str(folder))
    out64 = run(model.double(), inputs)
    # the first output (logits), its first 16 classes: enough to tell methods apart, small to store
    save_file({"bare": bare64[0][..., :16].contiguous(), "delta": out64[0][..., :16].contiguous()},
              folder / "expected.safetensors")
    state = torch.load(folder / "pytorch_model.bin")
    print(name, len(state), "delta effect", (out64[0][:, -bare64[0].shape[1]:] - bare64[0]).abs().max().item())
print(opendelta.__version__, tf.__version__, torch.__version__)
