"""Common structure: role names (``attn.q``, ``ffn.down``...) that mean the same place in every family.

Family knowledge is data: for each transformers ``model_type`` a table from role to module-name
patterns (the addressing syntax of :mod:`opendelta.addressing`, tail names or ``[r]`` regexes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from opendelta.addressing import backbone_modules, find_modules_in
from opendelta.errors import StructureError

ROLES: dict[str, str] = {
    "attn.q": "attention query projection",
    "attn.k": "attention key projection",
    "attn.v": "attention value projection",
    "attn.qkv": "fused query/key/value projection",
    "attn.o": "attention output projection",
    "ffn.up": "feed-forward up (first) projection",
    "ffn.gate": "feed-forward gate projection",
    "ffn.down": "feed-forward down (last) projection",
}

_BERT = {
    "attn.q": ["attention.self.query"],
    "attn.k": ["attention.self.key"],
    "attn.v": ["attention.self.value"],
    "attn.o": ["attention.output.dense"],
    "ffn.up": ["intermediate.dense"],
    "ffn.down": [r"[r]layer\.\d+\.output\.dense"],
}
_LLAMA = {
    "attn.q": ["self_attn.q_proj"],
    "attn.k": ["self_attn.k_proj"],
    "attn.v": ["self_attn.v_proj"],
    "attn.o": ["self_attn.o_proj"],
    "ffn.up": ["mlp.up_proj"],
    "ffn.gate": ["mlp.gate_proj"],
    "ffn.down": ["mlp.down_proj"],
}

FAMILIES: dict[str, Mapping[str, Sequence[str]]] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "gpt2": {
        "attn.qkv": ["attn.c_attn"],
        "attn.q": ["attn.c_attn"],
        "attn.k": ["attn.c_attn"],
        "attn.v": ["attn.c_attn"],
        "attn.o": ["attn.c_proj"],
        "ffn.up": ["mlp.c_fc"],
        "ffn.down": ["mlp.c_proj"],
    },
    "t5": {
        "attn.q": ["SelfAttention.q", "EncDecAttention.q"],
        "attn.k": ["SelfAttention.k", "EncDecAttention.k"],
        "attn.v": ["SelfAttention.v", "EncDecAttention.v"],
        "attn.o": ["SelfAttention.o", "EncDecAttention.o"],
        "ffn.up": ["DenseReluDense.wi", "DenseReluDense.wi_0"],
        "ffn.gate": ["DenseReluDense.wi_1"],
        "ffn.down": ["DenseReluDense.wo"],
    },
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
}


def model_type(model: nn.Module) -> str | None:
    """The transformers ``model_type`` of `model` or of the first sub-module that has a config."""
    for module in model.modules():
        kind = getattr(getattr(module, "config", None), "model_type", None)
        if isinstance(kind, str):
            return kind
    return None


def resolve_roles(model: nn.Module, roles: Sequence[str]) -> list[str]:
    """Paths of the modules that play `roles` in this backbone, in model order."""
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise StructureError(f"unknown common-structure role {unknown[0]!r}; known roles: {', '.join(ROLES)}.")
    kind = model_type(model)
    table = FAMILIES.get(kind or "")
    if table is None:
        raise StructureError(
            f"no common-structure mapping for model type {kind!r} ({type(model).__name__}); "
            "name the modules instead, e.g. modified_modules=['q_proj', 'v_proj']."
        )
    paths = [path for path, _ in backbone_modules(model)]
    found: set[str] = set()
    for role in roles:
        hits = find_modules_in(paths, table.get(role, ()))
        if not hits:
            raise StructureError(
                f"role {role!r} ({ROLES[role]}) is not found in this {kind} model; name the modules instead."
            )
        found.update(hits)
    return [path for path in paths if path in found]
