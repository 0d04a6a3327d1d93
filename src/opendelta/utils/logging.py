"""The original OpenDelta's ``opendelta.utils.logging``: standard-library loggers under ``opendelta``."""

from __future__ import annotations

import logging


def get_logger(name: str | None = None) -> logging.Logger:
    """The logger `name` (default: ``opendelta``)."""
    return logging.getLogger(name or "opendelta")


def set_verbosity(level: int) -> None:
    """Set the level of opendelta's loggers (e.g. ``logging.INFO``)."""
    logging.getLogger("opendelta").setLevel(level)
