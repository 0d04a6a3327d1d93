"""The one catalogue of tiny test models: every family opendelta maps, built from configs (no downloads).

One entry per family: the transformers ``model_type``, the model class to build, and the config
values that make it tiny (hidden 32, 2 layers, 4 heads, vocab 99), plus a user-written plain
``nn.Module``. The family sweep (tests/support/family_zoo.py) and ``scripts/coverage_table.py``
run every transformers family at the methods' defaults; the method matrix and the per-method
tests run the families that name ``positions``, in their own module names: ``out`` (the
attention output and feed-forward down projections), ``kv`` (key and value projections),
``down`` (the feed-forward down projection), ``blocks`` (modules that take and return a hidden
state), and ``norms``. ``fresh(key)`` copies a model built once; keys are the ``model_type``
(``"bert"``, ``"plain"``) or the display name (``"BERT"``).
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# tiny ops run faster on one thread than on a pool fighting other processes for two cores
torch.set_num_threads(1)
HIDDEN = 32

# the usual size knobs, set only where a config has the attribute
SIZES: dict[str, Any] = dict(
    vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
    d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4,
    n_embd=32, n_layer=2, n_head=4, n_positions=64, ffn_dim=64, word_embed_proj_dim=32,
    encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=64, decoder_ffn_dim=64,
    image_size=32, patch_size=8, embedding_size=32,
    dim=32, hidden_dim=64, n_layers=2, n_heads=4,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=0, sep_token_id=2, cls_token_id=1,
)


def shrink(config) -> None:
    """Set the SIZES a config (and each of its sub-configs) has; leave computed properties alone."""
    from transformers import PretrainedConfig

    for key, value in SIZES.items():
        if hasattr(config, key) and not isinstance(getattr(type(config), key, None), property):
            setattr(config, key, value)
    for value in vars(config).values():
        if isinstance(value, PretrainedConfig):
            shrink(value)


def _ids() -> dict[str, Any]:
    return {"input_ids": torch.tensor([[5, 17, 42, 8, 63, 2], [9, 3, 77, 1, 30, 4]])}


def _seq2seq() -> dict[str, Any]:
    ids = _ids()["input_ids"]
    return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}


def _pixels() -> dict[str, Any]:
    return {"pixel_values": torch.linspace(-1, 1, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)}


@dataclass(frozen=True)
class Family:
    name: str  #: display name in the coverage table
    model_type: str  #: the transformers model type; also the family's key
    model_class: str  #: a class of the transformers package ("" for a plain module: see `builder`)
    overrides: dict[str, Any] = field(default_factory=dict)
    sizes: bool = True  #: apply SIZES where the config has the attribute
    #: the method matrix's places, in this family's module names (None: not in the matrix)
    positions: dict[str, list[str]] | None = None
    #: fixed inputs for the matrix (the sweep synthesises its own)
    inputs: Callable[[], dict[str, Any]] = field(default=_ids, repr=False)
    #: builds a model that is not a transformers one (its runtime init needs dummy_inputs)
    builder: Callable[[], nn.Module] | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return self.model_type

    @property
    def plain(self) -> bool:
        return self.builder is not None

    def config(self):
        from transformers import AutoConfig

        config = AutoConfig.for_model(self.model_type)
        if self.sizes:
            shrink(config)
        for key, value in self.overrides.items():
            target = config
            *parents, leaf = key.split(".")  # "vision_config.patch_size" reaches into a sub-config
            for parent in parents:
                target = getattr(target, parent)
            setattr(target, leaf, value)
        return config

    def build(self, seed: int = 0) -> nn.Module:
        import transformers

        torch.manual_seed(seed)
        if self.builder is not None:
            return self.builder().eval()
        return getattr(transformers, self.model_class)(self.config()).eval()


_BERT_POSITIONS = {
    "out": ["attention.output.dense", r"[r]layer\.\d+\.output\.dense"],
    "kv": ["attention.self.key", "attention.self.value"],
    "down": [r"[r]layer\.\d+\.output\.dense"],
    "blocks": ["attention", "intermediate.dense->output.dense"],  # a span: BERT keeps its FFN as two modules
    "norms": ["LayerNorm"],
}
_DECODER_POSITIONS = {
    "out": ["self_attn.out_proj", "fc2"],
    "kv": ["self_attn.k_proj", "self_attn.v_proj"],
    "down": ["fc2"],
    "blocks": ["self_attn", "fc1->fc2"],  # a span: the FFN is fc1, activation, fc2 in the layer
    "norms": ["self_attn_layer_norm", "final_layer_norm"],
}


class PlainBlock(nn.Module):
    """A pre-norm residual feed-forward block, to stand for any user-written nn.Module."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, 37), nn.GELU(), nn.Linear(37, HIDDEN))
        self.proj = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h + self.mlp(self.norm(h)))


class PlainModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(PlainBlock(), PlainBlock())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.blocks(h)


def _plain_inputs() -> dict[str, Any]:
    return {"h": torch.linspace(-2, 2, 2 * 5 * HIDDEN).reshape(2, 5, HIDDEN)}


FAMILIES: list[Family] = [
    # encoders
    Family("BERT", "bert", "BertModel", positions=_BERT_POSITIONS),
    Family("RoBERTa", "roberta", "RobertaForMaskedLM", positions=_BERT_POSITIONS),
    Family("XLM-RoBERTa", "xlm-roberta", "XLMRobertaForSequenceClassification", {"num_labels": 3}),
    Family("DistilBERT", "distilbert", "DistilBertModel"),
    Family("ALBERT", "albert", "AlbertModel"),
    Family("ELECTRA", "electra", "ElectraModel"),
    Family("DeBERTa", "deberta", "DebertaModel"),
    Family("DeBERTa-v2", "deberta-v2", "DebertaV2Model"),
    Family("MPNet", "mpnet", "MPNetModel"),
    Family("ModernBERT", "modernbert", "ModernBertModel", {"global_attn_every_n_layers": 1, "local_attention": 8}),
    # encoder-decoders
    Family(
        "T5", "t5", "T5ForConditionalGeneration", inputs=_seq2seq,
        positions={"out": ["SelfAttention.o", "DenseReluDense.wo"], "kv": ["SelfAttention.k", "SelfAttention.v"],
                   "down": ["DenseReluDense.wo"], "blocks": ["SelfAttention", "DenseReluDense"], "norms": ["layer_norm"]},
    ),
    Family("mT5", "mt5", "MT5Model"),
    Family("BART", "bart", "BartForConditionalGeneration", positions=_DECODER_POSITIONS, inputs=_seq2seq),
    Family("mBART", "mbart", "MBartForConditionalGeneration"),
    Family("Pegasus", "pegasus", "PegasusForConditionalGeneration"),
    # decoders
    Family(
        "GPT-2", "gpt2", "GPT2LMHeadModel",
        positions={"out": ["attn.c_proj", "mlp.c_proj"], "kv": ["attn.c_attn"], "down": ["mlp.c_proj"],
                   "blocks": ["attn", "mlp"], "norms": ["ln_1", "ln_2"]},
    ),
    Family("GPT-Neo", "gpt_neo", "GPTNeoForCausalLM", {"attention_types": [[["global", "local"], 1]], "window_size": 4}),
    Family("GPT-J", "gptj", "GPTJForCausalLM", {"rotary_dim": 4}),
    Family("GPT-NeoX", "gpt_neox", "GPTNeoXForCausalLM"),
    Family("OPT", "opt", "OPTForCausalLM", positions=_DECODER_POSITIONS),
    Family("BLOOM", "bloom", "BloomForCausalLM"),
    Family("Falcon", "falcon", "FalconForCausalLM", {"ffn_hidden_size": 64}),
    Family(
        "LLaMA", "llama", "LlamaForCausalLM",
        positions={"out": ["o_proj", "down_proj"], "kv": ["k_proj", "v_proj"], "down": ["down_proj"],
                   "blocks": ["self_attn", "mlp"], "norms": ["input_layernorm", "post_attention_layernorm"]},
    ),
    Family("Mistral", "mistral", "MistralForCausalLM"),
    Family("Mixtral", "mixtral", "MixtralForCausalLM", {"num_local_experts": 2}),
    Family("Qwen2", "qwen2", "Qwen2ForCausalLM"),
    Family("Qwen3", "qwen3", "Qwen3ForCausalLM"),
    Family("Gemma", "gemma", "GemmaForCausalLM"),
    Family("Gemma2", "gemma2", "Gemma2ForCausalLM"),
    Family("Gemma3", "gemma3_text", "Gemma3ForCausalLM", {"sliding_window": 4}),
    Family("Phi", "phi", "PhiForCausalLM"),
    Family("Phi-3", "phi3", "Phi3ForCausalLM"),
    Family("StableLM", "stablelm", "StableLmForCausalLM"),
    Family("OLMo", "olmo", "OlmoForCausalLM"),
    # vision, multimodal, audio
    Family(
        "ViT", "vit", "ViTForImageClassification", {"num_labels": 3}, inputs=_pixels,
        positions={"out": ["o_proj", "fc2"], "kv": ["k_proj", "v_proj"], "down": ["fc2"],
                   "blocks": ["attention", "mlp"], "norms": ["layernorm_before", "layernorm_after"]},
    ),
    Family("DeiT", "deit", "DeiTModel"),
    Family(
        "Swin", "swin", "SwinModel",
        {"embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2], "window_size": 4, "patch_size": 4, "image_size": 32},
        sizes=False,
    ),
    Family("CLIP", "clip", "CLIPModel", {"projection_dim": 32}),
    Family("Whisper", "whisper", "WhisperForConditionalGeneration", {"max_source_positions": 16, "max_target_positions": 32}),
    Family(
        "Wav2Vec2", "wav2vec2", "Wav2Vec2Model",
        {"conv_dim": [16, 16], "conv_kernel": [10, 3], "conv_stride": [5, 2], "num_feat_extract_layers": 2,
         "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4},
    ),
]

BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}
#: the user-written model: in the method matrix, not in the family sweep (it has no model type to map)
PLAIN = Family(
    "Plain", "plain", "", sizes=False, inputs=_plain_inputs, builder=PlainModel,
    positions={"out": ["proj", "mlp.2"], "kv": ["mlp.0"], "down": ["mlp.2"], "blocks": [r"[r]blocks\.\d+"],
               "norms": ["norm"]},
)
#: the method matrix's families by key
MATRIX: dict[str, Family] = {f.key: f for f in [*FAMILIES, PLAIN] if f.positions is not None}
_LOOKUP: dict[str, Family] = {**{f.key: f for f in [*FAMILIES, PLAIN]}, **BY_NAME}


@functools.cache
def _pristine(name: str) -> nn.Module:
    return _LOOKUP[name].build()


def fresh(name: str, dtype: torch.dtype | None = None) -> nn.Module:
    """A new copy of the family's tiny model (built once per process): same weights every time.
    `name` is a key (``"bert"``) or a display name (``"BERT"``)."""
    model = copy.deepcopy(_pristine(name))
    return model if dtype is None else model.to(dtype)


def fresh_base(name: str) -> nn.Module:
    """The base model (no task head: ``LlamaModel`` of ``LlamaForCausalLM``) of a fresh copy, for
    tests that name module paths as the base model spells them."""
    model = fresh(name)
    return getattr(model, "base_model", model)


def hidden(model: nn.Module, family: Family, **inputs: Any) -> torch.Tensor:
    """The model's main output tensor (the first it returns) on the family's fixed inputs."""
    out = model(**(family.inputs() | inputs))
    return out if isinstance(out, torch.Tensor) else out[0]


