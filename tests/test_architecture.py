"""The architecture holds: methods use only the engine's public steps (README of the redesign, STYLE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from opendelta import DeltaBase, LoraModel

METHODS_DIR = Path(__file__).resolve().parents[1] / "src" / "opendelta" / "methods"
#: calls on ``self.__dict__`` that write to it
DICT_WRITES = {"setdefault", "update", "pop", "popitem", "clear", "__setitem__", "__delitem__"}


def engine_private_names() -> set[str]:
    """Every ``_name`` a DeltaBase has: its private methods and the private state a built delta carries."""
    names = {n for n in dir(DeltaBase) if n.startswith("_") and not n.startswith("__")}
    model = nn.Sequential(nn.Linear(4, 4))
    delta = LoraModel(model, modified_modules=["0"], dummy_inputs=(torch.zeros(1, 4),))
    names |= {n for n in vars(delta) if n.startswith("_") and not n.startswith("__")}
    delta.detach()
    return names


def violations(source: str, engine_private: set[str], where: str = "<source>") -> list[str]:
    """Reads of the engine's private attributes (on any object) and writes to ``self.__dict__``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in engine_private:
            found.append(f"{where}:{node.lineno}: .{node.attr} is the engine's private state")
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                if isinstance(target, ast.Subscript) and _is_self_dict(target.value):
                    found.append(f"{where}:{node.lineno}: writes self.__dict__")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in DICT_WRITES:
            if _is_self_dict(node.func.value):
                found.append(f"{where}:{node.lineno}: writes self.__dict__ ({node.func.attr})")
    return found


def _is_self_dict(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute) and node.attr == "__dict__"
        and isinstance(node.value, ast.Name) and node.value.id == "self"
    )


def method_sources() -> list[Path]:
    return sorted(METHODS_DIR.rglob("*.py"))


def test_the_check_finds_private_engine_reads_and_dict_writes():
    source = (
        "class M:\n"
        "    def new_layer(self, path):\n"
        "        n = len(self._targets)\n"
        "        self.__dict__['cache'] = n\n"
        "        self.__dict__.setdefault('other', {})\n"
        "        return self.__dict__.get('cache')\n"
    )
    found = violations(source, engine_private_names())
    assert sorted(found) == [
        "<source>:3: ._targets is the engine's private state",
        "<source>:4: writes self.__dict__",
        "<source>:5: writes self.__dict__ (setdefault)",
    ]


def test_the_engine_private_names_include_its_state_and_helpers():
    names = engine_private_names()
    assert {"_targets", "_originals", "_setup"} <= names


@pytest.mark.parametrize("path", method_sources(), ids=lambda p: str(p.relative_to(METHODS_DIR)))
def test_methods_use_no_private_engine_attribute_and_write_no_dict(path: Path):
    assert violations(path.read_text(), engine_private_names(), path.name) == []
