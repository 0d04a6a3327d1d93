"""Tiny models of every family opendelta maps, built from configs (no downloads).

One entry per family: the transformers ``model_type``, the model class to build, and the config
values that make it tiny (hidden 32, 2 layers, 4 heads, vocab 99). Shared by the family sweep,
the structure tests and ``scripts/coverage_table.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from support.methods import METHODS
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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


@dataclass(frozen=True)
class Family:
    name: str  #: display name in the coverage table
    model_type: str
    model_class: str  #: a class of the transformers package
    overrides: dict[str, Any] = field(default_factory=dict)
    sizes: bool = True  #: apply SIZES where the config has the attribute

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
        return getattr(transformers, self.model_class)(self.config()).eval()


FAMILIES: list[Family] = [
    # encoders
    Family("BERT", "bert", "BertModel"),
    Family("RoBERTa", "roberta", "RobertaForMaskedLM"),
    Family("XLM-RoBERTa", "xlm-roberta", "XLMRobertaForSequenceClassification", {"num_labels": 3}),
    Family("DistilBERT", "distilbert", "DistilBertModel"),
    Family("ALBERT", "albert", "AlbertModel"),
    Family("ELECTRA", "electra", "ElectraModel"),
    Family("DeBERTa", "deberta", "DebertaModel"),
    Family("DeBERTa-v2", "deberta-v2", "DebertaV2Model"),
    Family("MPNet", "mpnet", "MPNetModel"),
    Family("ModernBERT", "modernbert", "ModernBertModel", {"global_attn_every_n_layers": 1, "local_attention": 8}),
    # encoder-decoders
    Family("T5", "t5", "T5ForConditionalGeneration"),
    Family("mT5", "mt5", "MT5Model"),
    Family("BART", "bart", "BartForConditionalGeneration"),
    Family("mBART", "mbart", "MBartForConditionalGeneration"),
    Family("Pegasus", "pegasus", "PegasusForConditionalGeneration"),
    # decoders
    Family("GPT-2", "gpt2", "GPT2LMHeadModel"),
    Family("GPT-Neo", "gpt_neo", "GPTNeoForCausalLM", {"attention_types": [[["global", "local"], 1]], "window_size": 4}),
    Family("GPT-J", "gptj", "GPTJForCausalLM", {"rotary_dim": 4}),
    Family("GPT-NeoX", "gpt_neox", "GPTNeoXForCausalLM"),
    Family("OPT", "opt", "OPTForCausalLM"),
    Family("BLOOM", "bloom", "BloomForCausalLM"),
    Family("Falcon", "falcon", "FalconForCausalLM", {"ffn_hidden_size": 64}),
    Family("LLaMA", "llama", "LlamaForCausalLM"),
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
    Family("ViT", "vit", "ViTForImageClassification", {"num_labels": 3}),
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


# ----------------------------------------------------------------------------- the default-positions check

_PRISTINE: dict[str, nn.Module] = {}


def fresh(name: str) -> nn.Module:
    """A new copy of the family's tiny model (built once per process): same weights every time."""
    import copy

    if name not in _PRISTINE:
        _PRISTINE[name] = BY_NAME[name].build()
    return copy.deepcopy(_PRISTINE[name])


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every floating-point tensor the model returns (logits, hidden states, ...), in order."""
    out = model(**inputs)
    items = out.to_tuple() if hasattr(out, "to_tuple") else out if isinstance(out, tuple) else (out,)
    flat: list[torch.Tensor] = []
    stack = list(items)
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            flat.append(item)
        elif isinstance(item, (tuple, list)):
            stack[:0] = list(item)
        elif hasattr(item, "to_tuple"):
            stack[:0] = list(item.to_tuple())
    return flat


#: arguments that fit hidden-32 models (the defaults assume real sizes); positions stay the defaults
TINY_ARGS: dict[str, dict[str, Any]] = {t: m.tiny for t, m in METHODS.items() if m.tiny}


def check_defaults(
    name: str, delta_type: str, checkpoint_dir: str | None = None, model: nn.Module | None = None
) -> list[str]:
    """Put `delta_type` at its default positions on the family's tiny model and check the promises.

    Forward and backward run and give every delta parameter a gradient; with the delta's
    parameters perturbed the outputs change; detach gives the original outputs bit for bit; and,
    with `checkpoint_dir`, from_finetuned into a fresh backbone reproduces the tuned outputs.
    Returns the modified module paths; raises AssertionError or the library's error otherwise.
    `model` (default: a fresh copy) is the backbone to use.
    """
    from opendelta import AutoDeltaConfig, AutoDeltaModel
    from opendelta.runtime_init import synthesize_inputs

    model = fresh(name) if model is None else model
    generator = torch.Generator().manual_seed(2)
    inputs = {  # random pixels / audio: an all-zero image makes every patch, and so every gradient, alike
        k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in synthesize_inputs(model).items()
    }
    with torch.no_grad():
        before = outputs(model, inputs)
    config = AutoDeltaConfig.from_dict({"delta_type": delta_type, **TINY_ARGS.get(delta_type, {})})
    delta = AutoDeltaModel.from_config(config, backbone_model=model)
    delta.freeze_module(exclude=["deltas"], set_state_dict=False)
    with torch.no_grad():
        for param in delta.delta_parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.1)
    tuned = outputs(model, inputs)
    # a random readout: a plain sum of a layer-normed output has zero gradient
    torch.stack([(t.float() * torch.randn(t.shape, generator=generator)).sum() for t in tuned]).sum().backward()
    params = delta.delta_parameters()
    assert params and all(p.grad is not None for p in params), f"{delta_type} on {name}: a delta parameter got no gradient"
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), f"{delta_type} on {name}: all-zero gradients"
    tuned = [t.detach() for t in tuned]
    assert any(not torch.equal(a, b) for a, b in zip(tuned, before)), f"{delta_type} on {name}: outputs did not change"
    if checkpoint_dir is not None:
        delta.save_finetuned(checkpoint_dir)
    delta.detach()
    with torch.no_grad():
        restored = outputs(model, inputs)
    assert all(torch.equal(a, b) for a, b in zip(restored, before)), f"{delta_type} on {name}: detach is not exact"
    if checkpoint_dir is not None:
        other = fresh(name)
        AutoDeltaModel.from_finetuned(checkpoint_dir, backbone_model=other)
        with torch.no_grad():
            reloaded = outputs(other, inputs)
        assert all(torch.equal(a, b) for a, b in zip(reloaded, tuned)), f"{delta_type} on {name}: reload differs"
    return list(delta.layers)
