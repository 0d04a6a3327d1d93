"""The shape of the source tree: no import cycles, not even ones hidden inside functions; methods
use only the engine's public steps (no private engine attribute, no ``self.__dict__`` writes)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from opendelta import DeltaBase, LoraModel

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGES = ("opendelta", "bigmodelvis")


def module_files() -> dict[str, Path]:
    """Every module of our packages by dotted name (a package by its own name, for __init__.py)."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for file in sorted((SRC / package).rglob("*.py")):
            parts = file.relative_to(SRC).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: at module level, inside functions and classes, but not
    the annotation-only ones under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of our packages it imports (``from a import b`` is an edge to ``a.b``
    when that is a module, else to ``a``); importing a module's parent packages is not counted."""
    modules = module_files()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, file in modules.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        for node in runtime_imports(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_through_a_function_local_import(tmp_path):
    tree = ast.parse("def f():\n    from b import x\n")
    assert [n.module for n in runtime_imports(tree)] == ["b"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_annotation_only_imports_do_not_count():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from b import x\n")
    assert [n.module for n in runtime_imports(tree)] == ["typing"]


def test_no_import_cycle_among_our_modules_counting_function_local_imports():
    graph = import_graph()
    assert graph["opendelta.delta_base"], "the graph should see delta_base's imports"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module imported before any other of ours (third-party packages preloaded once, then
    one forked child per module), so a cycle that only one import order hides still fails."""
    script = textwrap.dedent(
        """
        import importlib, os, sys, traceback
        import torch, transformers, safetensors, rich  # noqa: F401  (shared, read-only preload)
        failed = []
        for name in sys.argv[1:]:
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module(name)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                failed.append(name)
        print("FAILED", *failed)
        sys.exit(1 if failed else 0)
        """
    )
    names = [n for n in module_files() if not n.endswith("__main__")]
    result = subprocess.run(
        [sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=600,
        env={"PYTHONPATH": str(SRC), "PATH": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_no_engine_module_imports_a_method():
    """The engine finds methods through the registry (PEFT's LoRA included), never by import
    (opendelta.delta_models is the original OpenDelta's name for the methods package: aliases)."""
    graph = import_graph()
    engine = [m for m in graph if m.startswith("opendelta.") and m.split(".")[1] not in ("methods", "delta_models", "demo", "commands")]
    assert {m: sorted(t for t in graph[m] if t.startswith("opendelta.methods")) for m in engine} == {m: [] for m in engine}


def private_reaches(tree: ast.AST) -> list[str]:
    """``x._name`` for any x but self and cls: state read around the owner's public interface."""
    return [
        ast.unparse(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
    ]  # fmt: skip


def test_the_private_reach_finder_sees_one():
    assert private_reaches(ast.parse("delta._targets[p]\nself._ok\nx.__dict__")) == ["delta._targets"]


def test_saving_loading_and_reporting_use_only_the_deltas_public_interface():
    modules = module_files()
    names = ["opendelta.serialization", "opendelta.checkpoint", "opendelta.checkpoint_files", "opendelta.peft_format",
             "opendelta.reporting"]  # fmt: skip
    found = {name: private_reaches(ast.parse(modules[name].read_text())) for name in names}
    assert found == {name: [] for name in names}


# ----------------------------------------------------------------- methods and the engine

METHODS_DIR = SRC / "opendelta" / "methods"
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
    assert {"_targets", "_changes", "_homes", "_setup"} <= names


@pytest.mark.parametrize("path", method_sources(), ids=lambda p: str(p.relative_to(METHODS_DIR)))
def test_methods_use_no_private_engine_attribute_and_write_no_dict(path: Path):
    assert violations(path.read_text(), engine_private_names(), path.name) == []
