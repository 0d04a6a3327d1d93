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

DISTILBERT: RoleTable = {
    "embed": ["embeddings.word_embeddings"],
    "layer": [r"[r]transformer\.layer\.\d+"],
    "attn": [r"[r]layer\.\d+\.attention"],
    "attn.q": ["attention.q_lin"],
    "attn.k": ["attention.k_lin"],
    "attn.v": ["attention.v_lin"],
    "attn.o": ["attention.out_lin"],
    "ffn": [r"[r]layer\.\d+\.ffn"],
    "ffn.up": ["ffn.lin1"],
    "ffn.down": ["ffn.lin2"],
    "norm.attn": ["sa_layer_norm"],
    "norm.ffn": ["output_layer_norm"],
    "lm_head": ["vocab_projector"],
}

ALBERT: RoleTable = {  # one shared layer (albert_layers.0) applied num_hidden_layers times
    "embed": ["embeddings.word_embeddings"],
    "layer": [r"[r]albert_layers\.\d+"],
    "attn": [r"[r]albert_layers\.\d+\.attention"],
    "attn.q": ["attention.query"],
    "attn.k": ["attention.key"],
    "attn.v": ["attention.value"],
    "attn.o": ["attention.dense"],
    "ffn.up": [r"[r]albert_layers\.\d+\.ffn"],
    "ffn.down": ["ffn_output"],
    "norm.attn": ["attention.LayerNorm"],
    "norm.ffn": ["full_layer_layer_norm"],
    "lm_head": ["predictions.decoder"],
}

DEBERTA: RoleTable = {  # DeBERTa (v1) fuses q/k/v into attention.self.in_proj
    **{k: v for k, v in BERT.items() if k not in ("attn.q", "attn.k", "attn.v")},
    "attn.qkv": ["attention.self.in_proj"],
    "attn.q": ["attention.self.in_proj"],
    "attn.k": ["attention.self.in_proj"],
    "attn.v": ["attention.self.in_proj"],
}

DEBERTA_V2: RoleTable = {
    **BERT,
    "attn.q": ["attention.self.query_proj"],
    "attn.k": ["attention.self.key_proj"],
    "attn.v": ["attention.self.value_proj"],
}

MPNET: RoleTable = {
    **BERT,
    "attn.q": ["attention.attn.q"],
    "attn.k": ["attention.attn.k"],
    "attn.v": ["attention.attn.v"],
    "attn.o": ["attention.attn.o"],
    "norm.attn": ["attention.LayerNorm"],
}

MODERNBERT: RoleTable = {  # pre-norm; Wqkv fused; Wi holds up and gate together (a GLU)
    "embed": ["embeddings.tok_embeddings"],
    "layer": [r"[r]layers\.\d+"],
    "attn": [r"[r]layers\.\d+\.attn"],
    "attn.qkv": ["attn.Wqkv"],
    "attn.q": ["attn.Wqkv"],
    "attn.k": ["attn.Wqkv"],
    "attn.v": ["attn.Wqkv"],
    "attn.o": ["attn.Wo"],
    "ffn": [r"[r]layers\.\d+\.mlp"],
    "ffn.up": ["mlp.Wi"],
    "ffn.down": ["mlp.Wo"],
    "norm.attn": ["attn_norm"],
    "norm.ffn": ["mlp_norm"],
    "norm.final": ["final_norm"],
    "lm_head": ["decoder"],
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

SWIN: RoleTable = {**VIT, "layer": [r"[r]blocks\.\d+"], "attn": [r"[r]blocks\.\d+\.attention"], "ffn": [r"[r]blocks\.\d+\.mlp"]}

CLIP: RoleTable = {  # clip_text_model and clip_vision_model, each its own backbone
    "embed": ["embeddings.token_embedding", "embeddings.patch_embedding"],
    "layer": [r"[r]layers\.\d+"],
    "attn": ["self_attn"],
    "attn.q": ["self_attn.q_proj"],
    "attn.k": ["self_attn.k_proj"],
    "attn.v": ["self_attn.v_proj"],
    "attn.o": ["self_attn.out_proj"],
    "ffn": [r"[r]layers\.\d+\.mlp"],
    "ffn.up": ["mlp.fc1"],
    "ffn.down": ["mlp.fc2"],
    "norm.attn": ["layer_norm1"],
    "norm.ffn": ["layer_norm2"],
    "norm.final": ["final_layer_norm", "post_layernorm"],
}

WAV2VEC2: RoleTable = {
    "layer": [r"[r]encoder\.layers\.\d+"],
    "attn": [r"[r]layers\.\d+\.attention"],
    "attn.q": ["attention.q_proj"],
    "attn.k": ["attention.k_proj"],
    "attn.v": ["attention.v_proj"],
    "attn.o": ["attention.out_proj"],
    "ffn": ["feed_forward"],
    "ffn.up": ["feed_forward.intermediate_dense"],
    "ffn.down": ["feed_forward.output_dense"],
    "norm.attn": [r"[r]layers\.\d+\.layer_norm"],
    "norm.ffn": [r"[r]layers\.\d+\.final_layer_norm"],
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

GPT_NEO: RoleTable = {
    **{k: v for k, v in GPT2.items() if k != "attn.qkv"},
    "attn.q": ["attn.attention.q_proj"],
    "attn.k": ["attn.attention.k_proj"],
    "attn.v": ["attn.attention.v_proj"],
    "attn.o": ["attn.attention.out_proj"],
}

GPTJ: RoleTable = {  # attention and MLP in parallel after one ln_1
    "embed": ["wte"],
    "layer": [r"[r]h\.\d+"],
    "attn": [r"[r]h\.\d+\.attn"],
    "attn.q": ["attn.q_proj"],
    "attn.k": ["attn.k_proj"],
    "attn.v": ["attn.v_proj"],
    "attn.o": ["attn.out_proj"],
    "ffn": [r"[r]h\.\d+\.mlp"],
    "ffn.up": ["mlp.fc_in"],
    "ffn.down": ["mlp.fc_out"],
    "norm.attn": ["ln_1"],
    "norm.final": ["ln_f"],
    "lm_head": ["lm_head"],
}

BLOOM: RoleTable = {  # bloom, falcon: fused query_key_value, Megatron-style MLP names
    "embed": ["word_embeddings"],
    "layer": [r"[r]h\.\d+"],
    "attn": ["self_attention"],
    "attn.qkv": ["self_attention.query_key_value"],
    "attn.q": ["self_attention.query_key_value"],
    "attn.k": ["self_attention.query_key_value"],
    "attn.v": ["self_attention.query_key_value"],
    "attn.o": ["self_attention.dense"],
    "ffn": [r"[r]h\.\d+\.mlp"],
    "ffn.up": ["mlp.dense_h_to_4h"],
    "ffn.down": ["mlp.dense_4h_to_h"],
    "norm.attn": ["input_layernorm", "ln_attn"],
    "norm.ffn": ["post_attention_layernorm", "ln_mlp"],
    "norm.final": ["ln_f"],
    "lm_head": ["lm_head"],
}

GPT_NEOX: RoleTable = {
    **{k: v for k, v in BLOOM.items() if not k.startswith("attn")},
    "embed": ["embed_in"],
    "layer": [r"[r]layers\.\d+"],
    "attn": [r"[r]layers\.\d+\.attention"],
    "attn.qkv": ["attention.query_key_value"],
    "attn.q": ["attention.query_key_value"],
    "attn.k": ["attention.query_key_value"],
    "attn.v": ["attention.query_key_value"],
    "attn.o": ["attention.dense"],
    "ffn": [r"[r]layers\.\d+\.mlp"],
    "norm.final": ["final_layer_norm"],
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

GEMMA2: RoleTable = {  # a norm before and after each sub-layer
    **LLAMA,
    "norm.attn": ["input_layernorm", "post_attention_layernorm"],
    "norm.ffn": ["pre_feedforward_layernorm", "post_feedforward_layernorm"],
}

MIXTRAL: RoleTable = {  # mixtral, qwen2_moe, qwen3_moe, olmoe: the experts hold their projections as
    # fused 3-d parameters (experts, out, in), not modules
    **{k: v for k, v in LLAMA.items() if k not in ("ffn.up", "ffn.gate", "ffn.down")},
    "experts": ["mlp.experts"],
}

PHI: RoleTable = {  # attention and MLP in parallel after one input_layernorm
    **{k: v for k, v in LLAMA.items() if k not in ("ffn.gate", "norm.ffn")},
    "attn.o": ["self_attn.dense"],
    "ffn.up": ["mlp.fc1"],
    "ffn.down": ["mlp.fc2"],
    "norm.final": ["final_layernorm"],
}

PHI3: RoleTable = {  # fused qkv_proj and gate_up_proj
    **LLAMA,
    "attn.qkv": ["self_attn.qkv_proj"],
    "attn.q": ["self_attn.qkv_proj"],
    "attn.k": ["self_attn.qkv_proj"],
    "attn.v": ["self_attn.qkv_proj"],
    "ffn.up": ["mlp.gate_up_proj"],
    "ffn.gate": ["mlp.gate_up_proj"],
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
    "ffn.up": ["DenseReluDense.wi", "DenseReluDense.wi_1"],  # gated (mT5): act(wi_0 h) * wi_1 h
    "ffn.gate": ["DenseReluDense.wi_0"],
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

WHISPER: RoleTable = {**BART, "lm_head": ["proj_out"]}  # the encoder's input is two convolutions, no embedding

FAMILIES: dict[str, RoleTable] = {
    # encoders
    "bert": BERT,
    "roberta": BERT,
    "xlm-roberta": BERT,
    "electra": BERT,
    "distilbert": DISTILBERT,
    "albert": ALBERT,
    "deberta": DEBERTA,
    "deberta-v2": DEBERTA_V2,
    "mpnet": MPNET,
    "modernbert": MODERNBERT,
    # encoder-decoders
    "t5": T5,
    "mt5": T5,
    "bart": BART,
    "mbart": BART,
    "pegasus": BART,
    "whisper": WHISPER,
    # decoders
    "gpt2": GPT2,
    "gpt_neo": GPT_NEO,
    "gptj": GPTJ,
    "gpt_neox": GPT_NEOX,
    "opt": OPT,
    "bloom": BLOOM,
    "falcon": BLOOM,
    "llama": LLAMA,
    "mistral": LLAMA,
    "mixtral": MIXTRAL,
    "qwen2_moe": MIXTRAL,
    "qwen3_moe": MIXTRAL,
    "olmoe": MIXTRAL,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma": LLAMA,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA2,
    "phi": PHI,
    "phi3": PHI3,
    "stablelm": LLAMA,
    "olmo": LLAMA,
    # vision, multimodal, audio
    "vit": VIT,
    "deit": VIT,
    "swin": SWIN,
    "clip_text_model": CLIP,
    "clip_vision_model": CLIP,
    "wav2vec2": WAV2VEC2,
}

#: families whose whole backbone is one stack of a larger model (CLIP's two towers), so that
#: ``text.attn.q`` / ``vision.attn.q`` address one tower
WHOLE_STACK: dict[str, str] = {
    "clip_text_model": "text",
    "clip_vision_model": "vision",
}
