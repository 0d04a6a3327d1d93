"""Module names transformers 5 renamed, for scripts written against transformers 4 (the original
OpenDelta's example configs address BEiT's ``query`` and ``value``).

Only renames that address the same computation are listed (a query projection is a query
projection); names whose module changed what it computes (ViT's ``output``, which held the
residual) are not, and still match nothing.
"""

from __future__ import annotations

from torch import nn

from opendelta.errors import StructureError
from opendelta.structure import find_backbones

_ATTENTION = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}
#: model_type -> {transformers 4 tail name: transformers 5 tail name}
RENAMED: dict[str, dict[str, str]] = {"vit": _ATTENTION, "beit": _ATTENTION}


def current_name(model: nn.Module, name: str) -> str | None:
    """Today's name of the module `name` addressed in `model`'s family before transformers 5, if it was renamed."""
    try:
        backbones = find_backbones(model)
    except StructureError:  # a model with no recognisable family renamed nothing
        return None
    for backbone in backbones:
        renamed = RENAMED.get(backbone.model_type or "", {}).get(name)
        if renamed is not None:
            return renamed
    return None
