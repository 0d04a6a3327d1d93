"""The original OpenDelta's module path ``opendelta.delta_models.low_rank_adapter``: an alias of opendelta's method."""

from opendelta.methods import LowRankAdapterConfig, LowRankAdapterModel

__all__ = ["LowRankAdapterConfig", "LowRankAdapterModel"]
