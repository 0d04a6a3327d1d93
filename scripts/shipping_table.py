"""Write docs/shipping.md's method x capability table from tests/support/shipping.py, the table
tests/test_shipping_matrix.py checks cell by cell.

    PYTHONPATH=src python scripts/shipping_table.py [--doc docs/shipping.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.shipping import BEGIN, END, render  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", default=str(ROOT / "docs" / "shipping.md"))
    args = parser.parse_args(argv)
    doc = Path(args.doc)
    text = doc.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    doc.write_text(text[:start] + render() + text[end:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
