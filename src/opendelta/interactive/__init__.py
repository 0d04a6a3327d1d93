"""Interactive module selection: click modules in the model tree on a local web page."""

from torch import nn

from opendelta.interactive.patterns import SelectionCompressor, compress_selection
from opendelta.interactive.server import select_modules

__all__ = ["SelectionCompressor", "choose_modules", "compress_selection", "select_modules"]


def choose_modules(backbone: nn.Module, interactive_modify: bool | int) -> list[str]:
    """The modules picked on the selector page, for ``interactive_modify=``: True serves it on a
    free port, an int on that port."""
    port = None if interactive_modify is True else int(interactive_modify)
    return select_modules(backbone, port=port)
