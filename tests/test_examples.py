"""Every example script and every runnable snippet in README.md and docs/*.md runs as written.

Marker convention for markdown: a ```python block runs when the line right before its fence is
``<!-- runnable -->``. The runnable blocks of one file run in order in one fresh Python process,
in a temporary working directory, so a block may use names an earlier one defined. A file may
hold one hidden ``<!-- runnable setup`` ... ``-->`` comment whose Python runs first (it builds the
tiny model that stands in for "your model").
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- runnable -->"
SETUP = re.compile(r"^<!-- runnable setup\n(.*?)^-->", re.S | re.M)


def runnable_blocks(text: str) -> list[str]:
    """The Python of every block whose fence follows the marker line."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines[:-1]):
        if line.strip() == MARKER:
            end = lines.index("```", i + 2)
            blocks.append("\n".join(lines[i + 2 : end]))
    return blocks


def program(path: Path) -> str:
    text = path.read_text()
    setup = SETUP.search(text)
    return "\n\n".join(([setup.group(1)] if setup else []) + runnable_blocks(text))


def python(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)  # hangs, not slowness


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_script_runs_at_tiny_size(script, tmp_path):
    args = [str(script)] + (["--tiny"] if "--tiny" in script.read_text() else [])
    done = python(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("doc", [p for p in MARKDOWN if runnable_blocks(p.read_text())], ids=lambda p: p.name)
def test_runnable_markdown_snippets_run(doc, tmp_path):
    (tmp_path / "snippets.py").write_text(program(doc))
    done = python(["snippets.py"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: p.name)
def test_every_runnable_marker_sits_right_above_a_python_fence(doc):
    lines = doc.read_text().splitlines()
    misplaced = [i + 1 for i, line in enumerate(lines) if line.strip() == MARKER
                 and (i + 1 >= len(lines) or lines[i + 1].strip() != "```python")]
    assert misplaced == [], f"{doc.name}: '{MARKER}' on lines {misplaced} is not followed by a ```python fence"


def test_marker_convention_finds_exactly_the_marked_blocks():
    text = "```python\nskipped()\n```\n<!-- runnable -->\n```python\nx = 1\n```\n<!-- runnable -->\n```python\ny = x\n```\n"
    assert runnable_blocks(text) == ["x = 1", "y = x"]


@pytest.mark.real
def test_multitask_example_at_real_size_answers_each_task_with_its_own_delta(tmp_path):
    """The Figure 4 example on SmolLM2 (its docstring's promise): each delta answers its own token.

    Uses the backbone cache the demo keeps (~/.cache/opendelta/smollm2), as a user's run would;
    the first run dequantises the GGUF and fills it.
    """
    done = python([str(ROOT / "examples" / "multitask_attach_detach.py")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "   seven attached: next tokens [4962, 4962]" in done.stdout  # " seven" in SmolLM2's vocabulary
    assert "thirteen attached: next tokens [22063, 22063]" in done.stdout  # " thirteen"
    assert "bit for bit the original" in done.stdout
