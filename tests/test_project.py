"""The project's promises to a new user: the README's two commands, CI calling the test one, pins."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", readme, re.S | re.M)
    assert section, "README.md needs a '## Quick start' section"
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section.group(1), re.S)
    assert block, "the quick start needs a code block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def test_readme_quick_start_is_exactly_two_commands_demo_and_tests():
    assert quick_start_commands() == ["./dev.sh demo", "./dev.sh test"]


def test_dev_script_sets_up_pinned_venv_and_runs_demo_and_pytest():
    script = (ROOT / "dev.sh").read_text()
    assert "python3 -m venv" in script and "-r requirements.lock" in script
    assert re.search(r"demo\).*-m opendelta demo", script)
    assert re.search(r"test\)[^;]*-m pytest", script)  # within the test job, before its closing ;;
    assert 'PYTHONHASHSEED="${PYTHONHASHSEED:-' in script  # a random, printed hash seed unless the caller set one


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./dev.sh test" in ci and "set -euo pipefail" in ci


def test_every_install_pins_torch_2_13_0():
    lock = (ROOT / "requirements.lock").read_text().splitlines()
    assert "torch==2.13.0" in lock
    for line in lock:
        if line and not line.startswith("#"):
            assert "==" in line, f"unpinned requirement: {line}"
