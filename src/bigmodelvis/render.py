"""Turn a collapsed tree into a rich ``Tree``: one line per node, colour plus plain markers."""

from __future__ import annotations

from rich.text import Text
from rich.tree import Tree

from bigmodelvis.collapse import VisNode
from bigmodelvis.summary import ParamInfo, ParamStatus

#: Plain-text marker letter of each status; the line marker lists every status in the subtree.
MARKERS: dict[ParamStatus, str] = {
    ParamStatus.TRAINABLE: "T",
    ParamStatus.FROZEN: "F",
    ParamStatus.DELTA: "D",
}
#: Colour of each status, used for parameter shapes and markers.
STYLES: dict[ParamStatus, str] = {
    ParamStatus.TRAINABLE: "green",
    ParamStatus.FROZEN: "cyan",
    ParamStatus.DELTA: "bold magenta",
}


def format_count(n: int) -> str:
    """Parameter count to three significant digits: ``512``, ``148K``, ``22.7M``, ``6.74B``."""
    if n < 1000:
        return str(n)
    for unit, scale in (("K", 1e3), ("M", 1e6), ("B", 1e9)):
        short = f"{n / scale:.3g}"
        if float(short) < 1000:
            return short + unit
    return f"{n / 1e12:.3g}T"


def render_tree(root: VisNode, *, expand_params: bool = False) -> Tree:
    """Build the rich ``Tree`` for ``root``; with ``expand_params`` each parameter gets a line."""
    tree = Tree(_module_label(root, expand_params), guide_style="dim")
    _add_children(tree, root, expand_params)
    return tree


def _add_children(branch: Tree, node: VisNode, expand_params: bool) -> None:
    if expand_params:
        for param in node.params:
            branch.add(_param_label(param, node.group_size))
    for child in node.children:
        _add_children(branch.add(_module_label(child, expand_params)), child, expand_params)


def _module_label(node: VisNode, expand_params: bool) -> Text:
    text = Text()
    text.append(node.label, style="bold magenta" if node.is_delta else "bold")
    text.append(f" ({node.class_name})", style="magenta" if node.is_delta else "dim")
    if node.roles:
        text.append(" @" + ",".join(node.roles), style="yellow")
    if node.params and not expand_params:
        text.append(" ")
        text.append_text(_params_text(node.params))
    statuses = _statuses(node)
    if statuses:
        text.append(" " + _count_text(node.numel, node.group_size))
        text.append(" ")
        text.append_text(_marker(statuses))
    return text


def _param_label(param: ParamInfo, group_size: int) -> Text:
    text = Text()
    text.append(f"{param.name}:{_shape(param)}", style=STYLES[param.status])
    text.append(f" {_dtype(param)}{_packed(param)}")
    numel = 0 if param.tied_to else param.numel
    text.append(" " + _count_text(numel, group_size) + " ")
    text.append_text(_marker([param.status]))
    return text


def _params_text(params: list[ParamInfo]) -> Text:
    """``weight:[384,384] bias:[384] float32``; dtypes and markers per parameter only when mixed."""
    one_dtype = len({p.dtype for p in params}) == 1
    one_status = len({p.status for p in params}) == 1
    text = Text()
    for i, param in enumerate(params):
        if i:
            text.append(" ")
        text.append(f"{param.name}:{_shape(param)}", style=STYLES[param.status])
        if not one_dtype:
            text.append(f":{_dtype(param)}")
        if not one_status:
            text.append_text(_marker([param.status]))
    if one_dtype:
        text.append(f" {_dtype(params[0])}")
    text.append("".join(_packed(param) for param in params))
    return text


def _shape(param: ParamInfo) -> str:
    shape = "[" + ",".join(str(d) for d in param.shape) + "]"
    return f"{shape}->{param.tied_to}" if param.tied_to else shape


def _dtype(param: ParamInfo) -> str:
    return param.quantized or str(param.dtype).removeprefix("torch.")


def _packed(param: ParamInfo) -> str:
    """`` (2.37KB packed, float32 16.4KB)`` for a quantized weight: what it stores against its dense size."""
    if param.quantized is None:
        return ""
    dense = param.numel * param.dtype.itemsize
    return f" ({format_count(param.packed_bytes)}B packed, {str(param.dtype).removeprefix('torch.')} {format_count(dense)}B)"


def _count_text(numel: int, group_size: int) -> str:
    if group_size == 1:
        return format_count(numel)
    return f"{group_size} x {format_count(numel)}"


def _statuses(node: VisNode) -> list[ParamStatus]:
    present = set(node.counts) | {p.status for p in node.params}
    return [status for status in ParamStatus if status in present]


def _marker(statuses: list[ParamStatus]) -> Text:
    text = Text("[")
    for i, status in enumerate(statuses):
        if i:
            text.append(",")
        text.append(MARKERS[status], style=STYLES[status])
    text.append("]")
    return text
