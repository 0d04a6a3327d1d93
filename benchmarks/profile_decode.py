"""What one LoRA adds to one module call in decode shape (issue 21): SmolLM2's q_proj, an
``nn.Linear(576, 576)`` called on 1 x 1 x 576 under ``no_grad``, bare, with LoRA r=8 attached, and with
that LoRA served fused (``delta.fuse()``: one linear map with a cached merged weight).

Per call: Python function calls (cProfile, builtins included), top-level aten ops (torch.profiler:
ops called from Python, not those they call), and the time attached / bare and fused / bare as the per-round paired
ratio of benchmarks.decode (each round times both back to back, the order alternating). Counts are
exact on any machine; the times are worth what the machine's quiet is.

    ./dev.sh python -m benchmarks.profile_decode [--calls 2000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import statistics
import sys
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.decode import interleaved, ratio, shown
from opendelta import LoraModel

FEATURES = 576


class Block(nn.Module):
    """A module holding the q_proj, so a delta addresses it as it would in the model."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(FEATURES, FEATURES, bias=False)  # as SmolLM2's

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.q_proj(h)


def python_calls(fn: Callable[[], object], calls: int = 200) -> float:
    """Python function calls per `fn()` (cProfile's primitive and recursive calls), minus the loop's own."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = sum(entry[1] for entry in stats.stats.values())  # type: ignore[attr-defined]
    return (total - 1) / calls  # less profiler.disable, once


def aten_ops(fn: Callable[[], object], calls: int = 50) -> tuple[float, list[str]]:
    """Top-level aten ops per `fn()` and their names (those called from Python, not from other ops)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    top = [e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
    names = sorted({e.name.removeprefix("aten::") for e in top})
    return len(top) / calls, names


def repeated(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_decode", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed sample")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    bare_block, lora_block, fused_block = Block().eval(), Block().eval(), Block().eval()
    lora_block.load_state_dict(bare_block.state_dict())
    fused_block.load_state_dict(bare_block.state_dict())
    deltas = [LoraModel(block, name="d", modified_modules=["q_proj"], lora_r=8) for block in (lora_block, fused_block)]
    with torch.no_grad():
        for delta in deltas:
            for p in delta.delta_parameters():
                p.add_(0.01)
    deltas[1].fuse()
    h = torch.randn(1, 1, FEATURES)
    blocks = {"attached": lora_block, "fused": fused_block, "bare": bare_block}
    with torch.no_grad():
        for block in blocks.values():
            block(h)  # the model's first forward: the delta's reachability check removes its hooks
        fns = {name: functools.partial(block.q_proj, h) for name, block in blocks.items()}
        counts = {name: {"python calls": python_calls(fn), "aten ops": aten_ops(fn)} for name, fn in fns.items()}
        samples = interleaved({name: repeated(fn, args.calls) for name, fn in fns.items()}, args.rounds)
    results = {
        **counts,
        "us per call": {name: 1e6 * statistics.median(v["wall"]) / args.calls for name, v in samples.items()},
        "attached / bare": ratio(samples, "attached", "bare"),
        "fused / bare": ratio(samples, "fused", "bare"),
    }
    for name, count in counts.items():
        ops, names = count["aten ops"]
        print(f"{name:8s} per call: {count['python calls']:.0f} Python calls, {ops:.0f} top-level aten ops {names}")
    print(f"us per call (median of {args.rounds} rounds): {results['us per call']}")
    for key in ("attached / bare", "fused / bare"):
        print(f"{key}: {shown(results[key])}")
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
