"""The original OpenDelta's ``opendelta.basemodel``: ``DeltaBase`` is opendelta's own."""

from torch import nn

from opendelta.delta_base import DeltaBase


def is_leaf_module(module: nn.Module) -> bool:
    """Whether `module` has no child modules."""
    return next(iter(module.children()), None) is None


__all__ = ["DeltaBase", "is_leaf_module"]
