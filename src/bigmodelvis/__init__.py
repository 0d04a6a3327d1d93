"""bigmodelvis: readable structure trees of big PyTorch models.

Identical sibling subtrees collapse into one line (``layer 0-11``), parameters fold onto their
module's line, and trainable ``[T]``, frozen ``[F]`` and delta ``[D]`` parameters are told apart
by colour and by those plain-text markers.
"""

from bigmodelvis.collapse import VisNode
from bigmodelvis.render import MARKERS, format_count
from bigmodelvis.summary import ParamStatus, is_delta_module
from bigmodelvis.visualization import Visualization

__all__ = ["MARKERS", "ParamStatus", "VisNode", "Visualization", "format_count", "is_delta_module"]
