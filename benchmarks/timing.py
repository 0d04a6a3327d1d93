"""Interleaved timing: every configuration runs once per round, so slow phases of a shared machine
hit all of them alike; ratios are taken round by round and summarised by their median and quartiles.

Each sample is read on two clocks: wall time (what a user waits) and this process's CPU time
(which time slices lost to other processes do not inflate; on a GPU it misses the device's work).
The benchmark scripts write their results through `write_json`, one way for all of them, and rewrite
the file after every finished case or round (``on_round``), so a run stopped by a timeout keeps
everything it measured.
"""

from __future__ import annotations

import json
import os
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
#: called after every finished round with the samples so far and the number of rounds in them
OnRound = Callable[[Samples, int], None]


def interleaved(
    fns: Mapping[str, Callable[..., object]],
    rounds: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    min_seconds: float = 0.0,
    setup: Mapping[str, Callable[[], object]] | None = None,
    on_round: OnRound | None = None,
) -> Samples:
    """Seconds per call of each function, one sample per round, rotating the order every round.

    Each function is first called `warmup` times. With `min_seconds`, fast functions are repeated
    inside a sample (the same count for all) until the first one takes that long. With `setup`,
    every call is ``fn(setup[name]())`` and only `fn` is timed (one call per sample). `on_round`
    sees the samples after every complete round (every configuration has the same number).
    """
    if setup:
        return _interleaved_with_setup(fns, setup, rounds, warmup, sync, on_round)
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
        if on_round is not None:
            on_round(samples, r + 1)
    return samples


def _interleaved_with_setup(
    fns: Mapping[str, Callable[[object], object]],
    setup: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int,
    sync: Callable[[], None],
    on_round: OnRound | None,
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
        if r >= 0 and on_round is not None:
            on_round(samples, r + 1)
    return samples


def ratio(samples: Mapping[str, list[float]], numerator: str, denominator: str) -> Spread:
    """Round-by-round ratio numerator / denominator of interleaved samples."""
    return Spread.of([a / b for a, b in zip(samples[numerator], samples[denominator], strict=True)])


def summary(samples: Samples, pairs: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """Seconds per configuration and the round-by-round ratios of `pairs` on the wall clock; the same
    ratios on the CPU clock (pairs naming a configuration not in `samples` are left out)."""
    wall, cpu = samples["wall"], samples["cpu"]
    present = [(a, b) for a, b in pairs if a in wall and b in wall]
    return {
        "seconds": {name: Spread.of(values).to_dict() for name, values in wall.items()},
        "ratios": {f"{a} / {b}": ratio(wall, a, b).to_dict() for a, b in present},
        "cpu_ratios": {f"{a} / {b}": ratio(cpu, a, b).to_dict() for a, b in present},
    }


def round_line(samples: Samples, done: int, rounds: int, started: float) -> str:
    """One progress row: the round just finished, each configuration's wall seconds in it (its CPU seconds
    after the slash: a busy machine inflates the wall clock, much less the CPU clock), time so far."""
    shown = " ".join(f"{name} {wall[-1]:.3f}/{samples['cpu'][name][-1]:.3f}" for name, wall in samples["wall"].items())
    return f"  round {done}/{rounds} ({time.perf_counter() - started:.0f} s): {shown}"


def recording_rounds(result: dict, pairs: list[tuple[str, str]] | tuple[tuple[str, str], ...], rounds: int,
                     started: float, on_update: Callable[[dict], None]) -> Callable[[Samples, int], None]:
    """An `interleaved(..., on_round=...)` callback that, after every round, puts the rounds done and
    `summary(samples, pairs)` into `result`, prints the round's row (time since `started`) and calls
    `on_update(result)`, so a stopped run keeps every finished round."""

    def on_round(samples: Samples, done: int) -> None:
        result.update(rounds_done=done, **summary(samples, pairs))
        print(round_line(samples, done, rounds, started), flush=True)
        on_update(result)

    return on_round


def once(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> tuple[float, object]:
    """Seconds one call of `fn` takes, and its result."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def write_json(result: Mapping[str, Any], path: str | None) -> None:
    """Write a benchmark's results as indented JSON to `path`; nothing when no path was asked for.

    Atomic (a temporary file beside it, then a rename): a run killed while writing leaves the previous
    complete file, never half of one, so the scripts can call this after every finished case.
    """
    if path:
        temporary = f"{path}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
            handle.write("\n")
        os.replace(temporary, path)
