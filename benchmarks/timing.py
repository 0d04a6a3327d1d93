"""Interleaved timing: every configuration runs once per round, so slow phases of a shared machine
hit all of them alike; ratios are taken round by round and summarised by their median and quartiles.

Each sample is read on two clocks: wall time (what a user waits) and this process's CPU time
(which time slices lost to other processes do not inflate; on a GPU it misses the device's work).
The benchmark scripts write their results through `write_json`, one way for all of them.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Spread:
    """Median and interquartile range of a sample (plus its minimum and size)."""

    median: float
    q1: float
    q3: float
    min: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        ordered = sorted(values)
        if len(ordered) >= 2:
            q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        else:
            q1 = q3 = ordered[0]
        return cls(statistics.median(ordered), q1, q3, ordered[0], len(ordered))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


Samples = dict[str, dict[str, list[float]]]  # clock ("wall", "cpu") -> configuration -> seconds per call
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved(
    fns: Mapping[str, Callable[..., object]],
    rounds: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    min_seconds: float = 0.0,
    setup: Mapping[str, Callable[[], object]] | None = None,
) -> Samples:
    """Seconds per call of each function, one sample per round, rotating the order every round.

    Each function is first called `warmup` times. With `min_seconds`, fast functions are repeated
    inside a sample (the same count for all) until the first one takes that long. With `setup`,
    every call is ``fn(setup[name]())`` and only `fn` is timed (one call per sample).
    """
    if setup:
        return _interleaved_with_setup(fns, setup, rounds, warmup, sync)
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync()
    inner = 1
    if min_seconds > 0:
        while True:
            start = time.perf_counter()
            for _ in range(inner):
                fns[names[0]]()
            sync()
            if time.perf_counter() - start >= min_seconds or inner >= 1 << 16:
                break
            inner *= 2
    samples: Samples = {clock: {name: [] for name in names} for clock in CLOCKS}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn = fns[name]
            sync()
            starts = {clock: read() for clock, read in CLOCKS.items()}
            for _ in range(inner):
                fn()
            sync()
            for clock, read in CLOCKS.items():
                samples[clock][name].append((read() - starts[clock]) / inner)
    return samples


def _interleaved_with_setup(
    fns: Mapping[str, Callable[[object], object]],
    setup: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int,
    sync: Callable[[], None],
) -> Samples:
    names = list(fns)
    samples: Samples = {clock: {name: [] for name in names} for clock in CLOCKS}
    for r in range(-warmup, rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            arg = setup[name]()
            sync()
            starts = {clock: read() for clock, read in CLOCKS.items()}
            fns[name](arg)
            sync()
            if r >= 0:
                for clock, read in CLOCKS.items():
                    samples[clock][name].append(read() - starts[clock])
            del arg
    return samples


def ratio(samples: Mapping[str, list[float]], numerator: str, denominator: str) -> Spread:
    """Round-by-round ratio numerator / denominator of interleaved samples."""
    return Spread.of([a / b for a, b in zip(samples[numerator], samples[denominator], strict=True)])


def once(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> tuple[float, object]:
    """Seconds one call of `fn` takes, and its result."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def write_json(result: Mapping[str, Any], path: str | None) -> None:
    """Write a benchmark's results as indented JSON to `path`; nothing when no path was asked for."""
    if path:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
            handle.write("\n")
