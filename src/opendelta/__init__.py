"""opendelta: plug-and-play delta tuning for any PyTorch model."""

__version__ = "0.1.0"
