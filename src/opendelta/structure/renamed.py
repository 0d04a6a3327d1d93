"""Module names transformers 5 renamed, for scripts written against transformers 4 (the original
OpenDelta's example configs address BEiT's ``query`` and ``value``, ViT's ``output``).

Only renames that address the same computation are listed. ViT's ``output`` tail named two
modules under transformers 4: ``attention.output`` (ViTSelfOutput: the output projection and its
dropout) and ``layer.N.output`` (ViTOutput: the second projection, dropout and the residual sum,
whose result ViTLayer returned as its own). Under transformers 5 they are ``attention.o_proj``
(the layer applies that dropout after it: the same wherever dropout is off, ViT's default
``hidden_dropout_prob=0.0`` and eval mode) and the layer itself, ``layers.N``.
"""

from __future__ import annotations

from torch import nn

from opendelta.errors import StructureError
from opendelta.structure import find_backbones

_ATTENTION = {"query": ("q_proj",), "key": ("k_proj",), "value": ("v_proj",)}
#: model_type -> {transformers 4 tail name: the transformers 5 names of what it addressed}
RENAMED: dict[str, dict[str, tuple[str, ...]]] = {
    "vit": {**_ATTENTION, "output": ("attention.o_proj", r"[r]layers\.\d+")},
    "beit": _ATTENTION,
}


def current_name(model: nn.Module, name: str) -> tuple[str, ...] | None:
    """Today's names of the modules `name` addressed in `model`'s family before transformers 5, if they were renamed."""
    try:
        backbones = find_backbones(model)
    except StructureError:  # a model with no recognisable family renamed nothing
        return None
    for backbone in backbones:
        renamed = RENAMED.get(backbone.model_type or "", {}).get(name)
        if renamed is not None:
            return renamed
    return None
