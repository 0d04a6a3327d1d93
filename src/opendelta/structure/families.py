"""Per-family role tables: transformers ``model_type`` -> {role: module-name patterns}.

Pure data. Patterns use the addressing syntax (tail names, ``[r]`` regexes) and are matched
inside the family's own backbone module, so a wrapped model (a classification head, a user's
module holding the backbone) resolves with the same table. Every name below was read off a
model built from its config under transformers 5.24 (``named_modules()``), not recalled.

A role a family lacks is simply absent (e.g. BERT has no single feed-forward module, so no
``ffn``; post-norm models have no ``norm.final``). Fused projections are listed under
``attn.qkv`` and also under ``attn.q``/``attn.k``/``attn.v``, so the defaults of a method
(``attn.q``, ``attn.v``) reach the fused module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

RoleTable = Mapping[str, Sequence[str]]

# --------------------------------------------------------------------------- encoders

BERT: RoleTable = {  # bert, roberta, xlm-roberta, electra, ...: BertLayer naming, post-norm
    "embed": ["embeddings.word_embeddings"],
    "layer": [r"[r]encoder\.layer\.\d+"],
    "attn": [r"[r]layer\.\d+\.attention"],
    "attn.q": ["attention.self.query"],
    "attn.k": ["attention.self.key"],
    "attn.v": ["attention.self.value"],
    "attn.o": ["attention.output.dense"],
    "ffn.up": ["intermediate.dense"],
    "ffn.down": [r"[r]layer\.\d+\.output\.dense"],
    "norm.attn": ["attention.output.LayerNorm"],
    "norm.ffn": [r"[r]layer\.\d+\.output\.LayerNorm"],
    "lm_head": ["cls.predictions.decoder", "lm_head.decoder", "generator_lm_head"],
}

VIT: RoleTable = {  # vit, deit: transformers 5 renamed to q_proj/k_proj/v_proj/o_proj and mlp.fc1/fc2
    "embed": ["embeddings.patch_embeddings"],
    "layer": [r"[r]layers\.\d+"],
    "attn": [r"[r]layers\.\d+\.attention"],
    "attn.q": ["attention.q_proj"],
    "attn.k": ["attention.k_proj"],
    "attn.v": ["attention.v_proj"],
    "attn.o": ["attention.o_proj"],
    "ffn": [r"[r]layers\.\d+\.mlp"],
    "ffn.up": ["mlp.fc1"],
    "ffn.down": ["mlp.fc2"],
    "norm.attn": ["layernorm_before"],
    "norm.ffn": ["layernorm_after"],
    "norm.final": ["layernorm"],
}

# --------------------------------------------------------------------------- decoders

GPT2: RoleTable = {  # one fused c_attn (Conv1D) per layer
    "embed": ["wte"],
    "layer": [r"[r]h\.\d+"],
    "attn": [r"[r]h\.\d+\.attn"],
    "attn.qkv": ["attn.c_attn"],
    "attn.q": ["attn.c_attn"],
    "attn.k": ["attn.c_attn"],
    "attn.v": ["attn.c_attn"],
    "attn.o": ["attn.c_proj"],
    "ffn": [r"[r]h\.\d+\.mlp"],
    "ffn.up": ["mlp.c_fc"],
    "ffn.down": ["mlp.c_proj"],
    "norm.attn": ["ln_1"],
    "norm.ffn": ["ln_2"],
    "norm.final": ["ln_f"],
    "lm_head": ["lm_head"],
}

OPT: RoleTable = {
    "embed": ["decoder.embed_tokens"],
    "layer": [r"[r]layers\.\d+"],
    "attn": ["self_attn"],
    "attn.q": ["self_attn.q_proj"],
    "attn.k": ["self_attn.k_proj"],
    "attn.v": ["self_attn.v_proj"],
    "attn.o": ["self_attn.out_proj"],
    "ffn.up": [r"[r]layers\.\d+\.fc1"],
    "ffn.down": [r"[r]layers\.\d+\.fc2"],
    "norm.attn": ["self_attn_layer_norm"],
    "norm.ffn": [r"[r]layers\.\d+\.final_layer_norm"],
    "norm.final": [r"[r]decoder\.final_layer_norm"],
    "lm_head": ["lm_head"],
}

LLAMA: RoleTable = {  # llama, mistral, qwen2, ...: the LLaMA module naming
    "embed": ["embed_tokens"],
    "layer": [r"[r]layers\.\d+"],
    "attn": ["self_attn"],
    "attn.q": ["self_attn.q_proj"],
    "attn.k": ["self_attn.k_proj"],
    "attn.v": ["self_attn.v_proj"],
    "attn.o": ["self_attn.o_proj"],
    "ffn": [r"[r]layers\.\d+\.mlp"],
    "ffn.up": ["mlp.up_proj"],
    "ffn.gate": ["mlp.gate_proj"],
    "ffn.down": ["mlp.down_proj"],
    "norm.attn": ["input_layernorm"],
    "norm.ffn": ["post_attention_layernorm"],
    "norm.final": ["norm"],
    "lm_head": ["lm_head"],
}

# --------------------------------------------------------------------------- encoder-decoders

T5: RoleTable = {  # encoder block: layer.0 self-attn, layer.1 FF; decoder: layer.0 self, layer.1 cross, layer.2 FF
    "encoder": ["encoder"],
    "decoder": ["decoder"],
    "embed": ["encoder.embed_tokens", "decoder.embed_tokens"],
    "layer": [r"[r]block\.\d+"],
    "attn": ["SelfAttention"],
    "attn.q": ["SelfAttention.q"],
    "attn.k": ["SelfAttention.k"],
    "attn.v": ["SelfAttention.v"],
    "attn.o": ["SelfAttention.o"],
    "xattn": ["EncDecAttention"],
    "xattn.q": ["EncDecAttention.q"],
    "xattn.k": ["EncDecAttention.k"],
    "xattn.v": ["EncDecAttention.v"],
    "xattn.o": ["EncDecAttention.o"],
    "ffn": ["DenseReluDense"],
    "ffn.up": ["DenseReluDense.wi", "DenseReluDense.wi_0"],
    "ffn.gate": ["DenseReluDense.wi_1"],
    "ffn.down": ["DenseReluDense.wo"],
    "norm.attn": [r"[r]block\.\d+\.layer\.0\.layer_norm"],
    "norm.xattn": [r"[r]decoder\.block\.\d+\.layer\.1\.layer_norm"],
    "norm.ffn": [r"[r]encoder\.block\.\d+\.layer\.1\.layer_norm", r"[r]decoder\.block\.\d+\.layer\.2\.layer_norm"],
    "norm.final": ["final_layer_norm"],
    "lm_head": ["lm_head"],
}

BART: RoleTable = {  # bart, mbart, pegasus, ...: fairseq naming; fc1/fc2 directly in the layer
    "encoder": ["encoder"],
    "decoder": ["decoder"],
    "embed": ["encoder.embed_tokens", "decoder.embed_tokens"],
    "layer": [r"[r]layers\.\d+"],
    "attn": ["self_attn"],
    "attn.q": ["self_attn.q_proj"],
    "attn.k": ["self_attn.k_proj"],
    "attn.v": ["self_attn.v_proj"],
    "attn.o": ["self_attn.out_proj"],
    "xattn": ["encoder_attn"],
    "xattn.q": ["encoder_attn.q_proj"],
    "xattn.k": ["encoder_attn.k_proj"],
    "xattn.v": ["encoder_attn.v_proj"],
    "xattn.o": ["encoder_attn.out_proj"],
    "ffn.up": [r"[r]layers\.\d+\.fc1"],
    "ffn.down": [r"[r]layers\.\d+\.fc2"],
    "norm.attn": ["self_attn_layer_norm"],
    "norm.xattn": ["encoder_attn_layer_norm"],
    "norm.ffn": [r"[r]layers\.\d+\.final_layer_norm"],
    "norm.final": [r"[r]encoder\.layer_norm", r"[r]decoder\.layer_norm"],
    "lm_head": ["lm_head"],
}

FAMILIES: dict[str, RoleTable] = {
    "bert": BERT,
    "roberta": BERT,
    "xlm-roberta": BERT,
    "electra": BERT,
    "vit": VIT,
    "gpt2": GPT2,
    "opt": OPT,
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "t5": T5,
    "bart": BART,
}
