"""The original OpenDelta's module path ``opendelta.delta_models.parallel_adapter``: an alias of opendelta's method."""

from opendelta.methods import ParallelAdapterConfig, ParallelAdapterModel

__all__ = ["ParallelAdapterConfig", "ParallelAdapterModel"]
