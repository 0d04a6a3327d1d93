"""``Visualization``: the public entry point that prints, returns and exports the model tree."""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.cells import cell_len
from rich.console import Console
from rich.tree import Tree
from torch import nn

from bigmodelvis.collapse import VisNode, collapse
from bigmodelvis.render import render_tree
from bigmodelvis.summary import summarize

_GUIDE_WIDTH = 4  # rich draws "├── " before every nested label


class Visualization:
    """Collapsed structure tree of a PyTorch model.

    Options apply to every output (printed tree, exports, ``to_dict``):
    ``expand_params`` gives each parameter its own line; ``keep_non_params`` keeps modules with
    no parameters in their subtree; ``roles`` maps module paths to common-structure role names
    shown as ``@role``; ``max_depth`` limits how many levels below the root are shown.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        expand_params: bool = False,
        keep_non_params: bool = False,
        roles: Mapping[str, str] | None = None,
        max_depth: int | None = None,
        console: Console | None = None,
    ) -> None:
        self.model = model
        self.expand_params = expand_params
        self.keep_non_params = keep_non_params
        self.roles = roles
        self.max_depth = max_depth
        self.console = console

    def collapsed(self) -> VisNode:
        """The collapsed tree as ``VisNode`` objects (read from the model on every call)."""
        return collapse(
            summarize(self.model),
            keep_non_params=self.keep_non_params,
            roles=self.roles,
            max_depth=self.max_depth,
        )

    def structure_graph(
        self,
        rootname: str = "root",
        expand_params: bool | None = None,
        keep_non_params: bool | None = None,
        common_structure: bool = False,
        mapping: Mapping[str, str] | None = None,
        only_common: bool = False,
        printTree: bool = True,  # noqa: N803 - the original bigmodelvis keyword
        *,
        print_tree: bool | None = None,
    ) -> Tree:
        """Print the tree (plain text when not a terminal or ``NO_COLOR`` is set) and return it.

        The keywords are the original bigmodelvis's: `rootname` labels the root, `expand_params` and
        `keep_non_params` override the constructor's options for this call, `common_structure`
        shows each module's common-structure role (``mapping``: your own ``{path: role}``; roles
        come from opendelta, which must be installed, when no mapping is given), `only_common`
        keeps only modules that play a role and their ancestors; `printTree` / `print_tree`
        (False) only returns the tree.
        """
        roles = self.roles
        if common_structure or mapping is not None or only_common:
            if mapping is None:
                from opendelta.structure import role_map  # roles are opendelta's knowledge, not this package's

                mapping = role_map(self.model)
            roles = dict(mapping)
        node = collapse(
            summarize(self.model),
            keep_non_params=self.keep_non_params if keep_non_params is None else keep_non_params,
            roles=roles,
            max_depth=self.max_depth,
            root_name=rootname,
        )
        if only_common:
            node = _only_roles(node) or node
        tree = render_tree(node, expand_params=self.expand_params if expand_params is None else expand_params)
        if printTree if print_tree is None else print_tree:
            (self.console or _default_console()).print(tree)
        return tree

    def to_dict(self) -> dict[str, Any]:
        """The collapsed tree as nested dicts; each node lists the module ``paths`` it stands for."""
        return self.collapsed().to_dict()

    def export_text(self) -> str:
        """The tree as plain text without any escape codes."""
        return self._recorded().export_text(styles=False)

    def export_html(self) -> str:
        """The tree as a standalone HTML page with inline colours."""
        return self._recorded().export_html(inline_styles=True)

    def export_svg(self, title: str = "bigmodelvis") -> str:
        """The tree as an SVG image of a terminal."""
        return self._recorded().export_svg(title=title)

    def export(self, path: str | os.PathLike[str]) -> Path:
        """Write the tree to ``path`` as text, HTML or SVG, chosen by its suffix."""
        target = Path(path)
        writers = {".txt": self.export_text, ".html": self.export_html, ".svg": self.export_svg}
        writer = writers.get(target.suffix.lower())
        if writer is None:
            raise ValueError(
                f"cannot export to {target.name!r}: use a .txt, .html or .svg file name"
            )
        target.write_text(writer(), encoding="utf-8")
        return target

    def _recorded(self) -> Console:
        """A recording console wide enough that no line wraps, holding the printed tree."""
        root = self.collapsed()
        tree = render_tree(root, expand_params=self.expand_params)
        console = Console(
            record=True,
            file=io.StringIO(),
            width=_tree_width(tree),
            force_terminal=True,
            color_system="truecolor",
        )
        console.print(tree)
        return console


def _default_console() -> Console:
    # rich keeps bold/dim escapes under NO_COLOR; no colour system at all makes the output plain.
    if os.environ.get("NO_COLOR"):
        return Console(color_system=None)
    return Console()


def _tree_width(tree: Tree, depth: int = 0) -> int:
    own = depth * _GUIDE_WIDTH + cell_len(str(tree.label)) + 1
    return max([own] + [_tree_width(child, depth + 1) for child in tree.children])


def _only_roles(node: VisNode) -> VisNode | None:
    """`node` pruned to the nodes that play a role and their ancestors (None if none does)."""
    kept = [c for c in (_only_roles(child) for child in node.children) if c is not None]
    if not kept and not node.roles:
        return None
    return dataclasses.replace(node, children=kept)
