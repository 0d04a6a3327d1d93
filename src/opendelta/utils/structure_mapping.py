"""The original OpenDelta's ``CommonStructureMap``, on opendelta's common structure (:mod:`opendelta.structure`).

``CommonStructureMap(model)`` finds the backbones of `model` (``matched_pairs``: their paths and
model types) and ``transform(path)`` names a module in the original's vocabulary
(``encoder.layer.0.attention.self.query`` -> ``attn@.q@``), from opendelta's per-family role tables.
"""

from __future__ import annotations

from torch import nn

from opendelta.errors import StructureError
from opendelta.structure import find_backbones, role_map
from opendelta.structure.original_names import VOCABULARY

#: opendelta role -> the original's name for it (the first in its vocabulary)
_ORIGINAL_NAME: dict[str, str] = {}
for _name, _roles in VOCABULARY.items():
    if len(_roles) == 1:
        _ORIGINAL_NAME.setdefault(_roles[0], ".".join(part + "@" for part in _name.split(".")))


class CommonStructureMap:
    """The common structure of `backbone_model`: its mapped backbones and each module's role."""

    def __init__(self, backbone_model: nn.Module, strict: bool = True, warning: bool = False, visualize: bool = True):
        backbones = find_backbones(backbone_model)
        self.matched_pairs = {b.path: b.model_type for b in backbones}
        self.roles = role_map(backbone_model)
        if strict and not self.roles:
            raise StructureError(f"no common structure found in {type(backbone_model).__name__}")

    def transform(self, org_key: str, strict: bool = True, warning: bool = False) -> tuple[str, None, None]:
        """``(name in the original's vocabulary, None, None)`` for the module at `org_key` (the key
        itself when it plays no role)."""
        role = self.roles.get(org_key)
        return (_ORIGINAL_NAME.get(role, org_key) if role else org_key), None, None

    def __repr__(self) -> str:
        return f"CommonStructureMap({self.matched_pairs})"
