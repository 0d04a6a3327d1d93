"""The benchmarks keep what they measured as they go: `interleaved` reports every finished round, and
`write_json` replaces the file whole (a run stopped by a timeout keeps its last complete write)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package sits beside src/

from benchmarks.timing import interleaved, summary, write_json  # noqa: E402


def test_every_round_is_reported_with_the_samples_so_far() -> None:
    seen: list[tuple[int, dict[str, int]]] = []
    fns = {"a": lambda: None, "b": lambda: None}

    def on_round(samples: dict, done: int) -> None:
        seen.append((done, {name: len(values) for name, values in samples["wall"].items()}))

    interleaved(fns, rounds=3, warmup=0, on_round=on_round)
    assert seen == [(n, {"a": n, "b": n}) for n in (1, 2, 3)]
    seen.clear()
    interleaved({"a": lambda _: None}, rounds=2, warmup=1, setup={"a": lambda: None}, on_round=on_round)
    assert seen == [(1, {"a": 1}), (2, {"a": 2})]  # the warm-up round is not reported


def test_write_json_replaces_the_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    samples = interleaved({"a": lambda: None, "b": lambda: None}, rounds=2, warmup=0)
    write_json({"rounds_done": 1, **summary(samples, [("a", "b"), ("a", "missing")])}, str(path))
    write_json({"rounds_done": 2}, str(path))
    assert json.loads(path.read_text()) == {"rounds_done": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    write_json({"x": 1}, None)  # no path: nothing written
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_summary_leaves_out_pairs_without_samples() -> None:
    samples = interleaved({"a": lambda: None, "b": lambda: None}, rounds=2, warmup=0)
    figures = summary(samples, [("a", "b"), ("a", "missing")])
    assert set(figures["ratios"]) == set(figures["cpu_ratios"]) == {"a / b"}
    assert set(figures["seconds"]) == {"a", "b"} and figures["seconds"]["a"]["n"] == 2
