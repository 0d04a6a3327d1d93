"""Interactive module selection: click modules in the model tree on a local web page."""

from opendelta.interactive.patterns import SelectionCompressor, compress_selection
from opendelta.interactive.server import select_modules

__all__ = ["SelectionCompressor", "compress_selection", "select_modules"]
