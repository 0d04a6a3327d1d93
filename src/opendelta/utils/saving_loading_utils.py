"""The original OpenDelta's ``SaveLoadMixin``: in opendelta, saving and loading live on DeltaBase,
whose original-API mixin this name stands for (``isinstance(delta, SaveLoadMixin)`` holds)."""

from opendelta.original_api import OriginalAPI as SaveLoadMixin

__all__ = ["SaveLoadMixin"]
