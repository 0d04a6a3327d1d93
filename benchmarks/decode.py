"""Serving speed of unmerged deltas (issue 21): greedy decoding and batch forwards on SmolLM2-135M.

Figures, each configuration timed once per round, rounds interleaved in one process:
  * decode attached / detached: LoRA r=8 on q,v of all 30 layers, IA3 and the adapter (defaults),
    batch 1 and batch 8, 16 new tokens: the cost of one unmerged delta per decoded token (attach and
    detach run between the timed generates, untimed, each followed by one untimed forward of the prompt
    unless --cold, so the first call after a switch is not in the timing); for LoRA and IA3 also fused / detached, the delta
    served by ``delta.fuse()`` (one linear map with a cached merged weight), and for LoRA peft / detached,
    PEFT's unmerged LoRA with the same factors (on a copy of the bare backbone);
  * one decode step (--only step): the same cases, each timed as the median of 24 one-token forwards
    through the KV cache instead of a whole generate(), which filters out the steps a preemption hit;
  * mixed-task decode: ``generate()`` inside ``mixed_batch`` over 8 tasks (batch 8) and 32 tasks
    (batch 32), one row each, / the same batch through one attached delta; PEFT's ``adapter_names=``
    generate beside it (its own ratio to its single adapter);
  * unmerged forward of 8 prompts: opendelta LoRA / PEFT LoRA.
Each ratio is given three ways: of the two configurations' min over the rounds, of their medians, and
paired: the ratio within each round (the two timed back to back, the order alternating between rounds),
as its median, quartiles and range, which a slow round affects once instead of through either side;
and the paired ratio on the process CPU clock, which time lost to other processes does not inflate.
The LoRA training step against PEFT is the main suite's ``train_step`` figure (``./dev.sh bench``).

    ./dev.sh python -m benchmarks.decode [--rounds 10] [--only decode] [--methods lora] [--batches 1 8]
                                         [--threads 1] [--json PATH] [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.timing import write_json
from opendelta import AdapterModel, IA3Model, LoraModel, mixed_batch
from opendelta.routing import site_of

NEW_TOKENS = 16
PROMPT = 8
QV = ["q_proj", "v_proj"]


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def smollm2() -> nn.Module:
    from benchmarks.workloads import _smollm2

    return _smollm2().eval()


def perturbed(delta, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=generator).to(p.dtype))
    return delta


@dataclass
class Case:
    """One configuration to time: `run` is timed; `enter` and `leave` (attach, detach) run around it, untimed."""

    run: Callable[[], object]
    enter: Callable[[], object] | None = None
    leave: Callable[[], object] | None = None
    #: `run` returns its own (wall, cpu) seconds instead of being timed whole
    measures: bool = False


#: a case's samples on each clock, over the rounds: {"wall": [...], "cpu": [...]}
Samples = dict[str, dict[str, list[float]]]


def interleaved(cases: dict[str, Case | Callable[[], object]], rounds: int) -> Samples:
    """Seconds of each case in each round, on the wall clock and on this process's CPU clock (which time
    slices lost to other processes do not inflate; with one thread, the steadier figure on a busy
    machine): every case once per round, back to back, in the given order on even rounds and the
    reverse on odd ones (drift and order effects cancel in a pair), after one untimed warm-up of each."""
    items = [(name, case if isinstance(case, Case) else Case(case)) for name, case in cases.items()]
    samples: Samples = {name: {"wall": [], "cpu": []} for name, _ in items}
    for r in range(-1, rounds):  # round -1: the warm-up
        for name, case in items if r % 2 == 0 else items[::-1]:
            if case.enter is not None:
                case.enter()
            try:
                if case.measures:
                    wall, cpu = case.run()
                else:
                    wall, cpu = time.perf_counter(), time.process_time()
                    case.run()
                    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            finally:
                if case.leave is not None:
                    case.leave()
            if r >= 0:
                samples[name]["wall"].append(wall)
                samples[name]["cpu"].append(cpu)
    return samples


def summary(samples: Samples) -> dict[str, dict[str, float]]:
    """Each case's wall-clock seconds as min and median over the rounds."""
    return {name: {"min": min(v["wall"]), "median": statistics.median(v["wall"])} for name, v in samples.items()}


def _ratio(num: list[float], den: list[float]) -> dict[str, object]:
    pairs = sorted(a / b for a, b in zip(num, den))
    quartiles = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [pairs[0]] * 3
    return {
        "min": min(num) / min(den),
        "median": statistics.median(num) / statistics.median(den),
        "paired": {"median": statistics.median(pairs), "q1": quartiles[0], "q3": quartiles[2],
                   "low": pairs[0], "high": pairs[-1], "rounds": pairs},
    }


def ratio(samples: Samples, num: str, den: str) -> dict[str, object]:
    """`num` / `den` on the wall clock: the ratio of their min and of their median over the rounds, and
    the per-round paired ratio (the two timed back to back in each round): its median, quartiles and
    range over the rounds; under "cpu", the same on the CPU clock."""
    return {**_ratio(samples[num]["wall"], samples[den]["wall"]), "cpu": _ratio(samples[num]["cpu"], samples[den]["cpu"])}


def shown(figure: dict[str, object]) -> str:
    """A ratio as one line: wall min-of-rounds, median-of-rounds, paired median [quartiles] (range); the CPU
    clock's paired median [quartiles]."""
    p, c = figure["paired"], figure["cpu"]["paired"]
    return (f"{figure['min']:.3f} min, {figure['median']:.3f} median; paired {p['median']:.3f} "
            f"[{p['q1']:.3f}-{p['q3']:.3f}] ({p['low']:.3f}-{p['high']:.3f}); cpu paired {c['median']:.3f} "
            f"[{c['q1']:.3f}-{c['q3']:.3f}]")


def generate(model: nn.Module, ids: torch.Tensor, **extra: object) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                  min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **extra)

    return run


#: the step section's timed decode steps per case and round
STEPS = 24


def decode_steps(model: nn.Module, ids: torch.Tensor, steps: int = STEPS) -> Callable[[], tuple[float, float]]:
    """One greedy decode step's seconds, on the wall and CPU clocks: the median over `steps` timed one-token
    forwards through the KV cache, after an untimed prefill of `ids` and one untimed step. The median of
    many short timings leaves out the steps a preemption hit, which a whole generate() cannot."""

    def run() -> tuple[float, float]:
        walls, cpus = [], []
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            for step in range(steps + 1):
                token = out.logits[:, -1:].argmax(-1)
                wall, cpu = time.perf_counter(), time.process_time()
                out = model(input_ids=token, cache=out.cache, use_cache=True)
                if step:
                    walls.append(time.perf_counter() - wall)
                    cpus.append(time.process_time() - cpu)
        return statistics.median(walls), statistics.median(cpus)

    return run


METHODS = ("lora", "ia3", "adapter")


#: called with each case's name and figures as soon as it is measured
OnCase = Callable[[str, dict], None]


def decode_ratios(model: nn.Module, rounds: int, vocab: int, methods: tuple[str, ...] = METHODS,
                  batches: tuple[int, ...] = (1, 8), on_case: OnCase = lambda name, figures: None,
                  warm: bool = True, step: bool = False) -> dict[str, object]:
    """Greedy decoding with one delta attached / the same model detached (attach and detach untimed); for
    the mergeable methods also the delta served fused (``delta.fuse()``), and for LoRA PEFT's unmerged LoRA
    with the same factors. With `warm`, every case's first forward after its attach / fuse / detach (one
    untimed forward of the prompt) is left out of the timing, so the ratio is the per-token cost of
    steady serving; without it, the timed generate also pays what the first call after a switch builds
    (the fused route's merged weights, for one). With `step`, each case's figure is instead one decode
    step's median seconds (`decode_steps`), the prefill and a first step left out."""
    results: dict[str, object] = {}
    builders = {"lora": lambda: LoraModel(model, name="d", modified_modules=QV, lora_r=8),
                "ia3": lambda: IA3Model(model, name="d"), "adapter": lambda: AdapterModel(model, name="d")}
    for method in methods:
        delta = perturbed(builders[method](), seed=1)
        delta.detach()
        peft = peft_like(model, delta) if method == "lora" else None
        fuses = method in FUSABLE
        handle: list = []

        def fused_on(delta=delta, handle=handle) -> None:
            delta.attach()
            handle.append(delta.fuse())

        def fused_off(delta=delta, handle=handle) -> None:
            handle.pop().remove()
            delta.detach()

        for batch in batches:
            ids = torch.randint(3, vocab, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
            def case(served: nn.Module, enter: Callable[[], object] | None,
                     leave: Callable[[], object] | None = None, ids: torch.Tensor = ids) -> Case:
                """`served` timed after `enter` (and, if warm, one untimed forward of the prompt), then `leave`."""

                def entering() -> None:
                    if enter is not None:
                        enter()
                    if warm:
                        with torch.no_grad():
                            served(input_ids=ids)

                if step:
                    return Case(decode_steps(served, ids), entering, leave, measures=True)
                return Case(generate(served, ids), entering, leave)

            cases: dict[str, Case | Callable[[], object]] = {
                "attached": case(model, delta.attach, delta.detach), "detached": case(model, None)}
            if fuses:
                cases["fused"] = case(model, fused_on, fused_off)
            if peft is not None:
                cases["peft"] = case(peft, None)
            samples = interleaved(cases, rounds)
            results[f"{method} batch {batch}"] = {
                "seconds": summary(samples),
                **{f"{name} / detached": ratio(samples, name, "detached") for name in cases if name != "detached"},
            }
            on_case(f"{method} batch {batch}", results[f"{method} batch {batch}"])
        del peft
    return results


#: the decode section's methods that merge into their modules' weights, so ``fuse()`` serves them
FUSABLE = ("lora", "ia3")


def peft_like(model: nn.Module, delta) -> nn.Module:
    """PEFT's LoRA on a copy of `model` (`delta` detached) with `delta`'s factors."""
    peft = peft_model(model, ["d"])
    with torch.no_grad():
        for path, layer in delta.layers.items():
            target = peft.base_model.model.get_submodule(path)
            target.lora_A["d"].weight.copy_(layer.lora_A)
            target.lora_B["d"].weight.copy_(layer.lora_B)
    return peft


def peft_model(model: nn.Module, names: list[str]):
    """PEFT LoRA adapters `names` on a copy of `model`, which must carry no attached opendelta delta: the copy
    would carry its hooks too, and PEFT's figures would include opendelta's work."""
    from peft import LoraConfig, get_peft_model

    if any(site_of(module) is not None for module in model.modules()):
        raise RuntimeError("build the PEFT copy from the bare backbone: detach every opendelta delta first")

    config = LoraConfig(r=8, lora_alpha=16, target_modules=QV, init_lora_weights=False)
    peft = get_peft_model(copy.deepcopy(model), config, adapter_name=names[0])
    for name in names[1:]:
        peft.add_adapter(name, config)
    return peft.eval()


def mixed_decode(model: nn.Module, rounds: int, vocab: int, counts: tuple[int, ...],
                 on_case: OnCase = lambda name, figures: None) -> dict[str, object]:
    results: dict[str, object] = {}
    for tasks in counts:
        names = [f"t{i}" for i in range(tasks)]
        peft = peft_model(model, names)
        deltas = [perturbed(LoraModel(model, name=n, modified_modules=QV, lora_r=8), seed=i + 1) for i, n in enumerate(names)]
        for d in deltas[1:]:
            d.detach()
        ids = torch.randint(3, vocab, (tasks, PROMPT), generator=torch.Generator().manual_seed(tasks))
        single = generate(model, ids)
        for d in deltas[1:]:
            d.attach()

        def mixed(deltas=deltas, ids=ids) -> object:
            with mixed_batch(deltas, list(range(len(deltas)))):
                return generate(model, ids)()

        def others(attach: bool, deltas=deltas) -> None:
            for d in deltas[1:]:
                d.attach() if attach else d.detach()

        peft.set_adapter(names[0])
        cases = {"opendelta mixed": mixed, "opendelta one delta": Case(single, lambda: others(False), lambda: others(True)),
                 "peft mixed": generate(peft, ids, adapter_names=names), "peft one adapter": generate(peft, ids)}
        samples = interleaved(cases, rounds)
        results[f"{tasks} tasks"] = {
            "seconds": summary(samples),
            "opendelta mixed / one delta": ratio(samples, "opendelta mixed", "opendelta one delta"),
            "peft mixed / one adapter": ratio(samples, "peft mixed", "peft one adapter"),
            "opendelta mixed / peft mixed": ratio(samples, "opendelta mixed", "peft mixed"),
        }
        on_case(f"{tasks} tasks", results[f"{tasks} tasks"])
        for d in deltas:
            d.detach()
        del peft
    return results


def forward_vs_peft(model: nn.Module, rounds: int, vocab: int) -> dict[str, object]:
    peft = peft_model(model, ["f"])
    delta = perturbed(LoraModel(model, name="f", modified_modules=QV, lora_r=8), seed=3)
    ids = torch.randint(3, vocab, (8, 32), generator=torch.Generator().manual_seed(8))

    def forward(m: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return m(input_ids=ids)

        return run

    samples = interleaved({"opendelta": forward(model), "peft": forward(peft)}, rounds)
    delta.detach()
    return {"seconds": summary(samples), "opendelta / peft": ratio(samples, "opendelta", "peft")}


SECTIONS = ("decode", "step", "mixed_decode", "forward")


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny LLaMA, 2 rounds: checks that everything runs")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10; 2 with --smoke)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="the sections to run")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="the decode and step sections' methods")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="the decode and step sections' batch sizes")
    parser.add_argument("--cold", action="store_true",
                        help="decode section: time the first call after each attach / fuse / detach too (no untimed warm forward)")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = tiny_llama() if args.smoke else smollm2()
    rounds = args.rounds or (2 if args.smoke else 10)
    vocab = min(1000, model.config.vocab_size)
    started = time.perf_counter()
    results: dict[str, object] = {
        "model": "tiny-llama" if args.smoke else "SmolLM2-135M", "threads": args.threads, "rounds": rounds,
        "new_tokens": NEW_TOKENS, "torch": torch.__version__,
    }
    print("ratios on the wall clock: min-of-rounds, median-of-rounds; paired = per-round ratio of the two timed "
          "back to back: median [quartiles] (range); cpu paired: the same on the process CPU clock", flush=True)

    def record(section: str) -> OnCase:
        """Print a case's rows and rewrite the JSON as soon as the case is measured (a stopped run keeps it)."""

        def on_case(name: str, figures: dict) -> None:
            results.setdefault(section, {})[name] = figures  # type: ignore[union-attr]
            results["seconds"] = time.perf_counter() - started
            for key, figure in figures.items():
                if " / " in key:
                    print(f"{section:13s} {name:15s} {key:29s} {shown(figure)}", flush=True)
            write_json(results, args.json)

        return on_case

    if "decode" in args.only:
        results["decode_protocol"] = "cold: the first call after a switch timed" if args.cold else "warm: one untimed forward after each switch"
        decode_ratios(model, rounds, vocab, tuple(args.methods), tuple(args.batches), on_case=record("decode"), warm=not args.cold)
    if "step" in args.only:
        results["step_protocol"] = f"median of {STEPS} timed one-token steps per case and round, after a prefill and one untimed step"
        decode_ratios(model, rounds, vocab, tuple(args.methods), tuple(args.batches), on_case=record("step"), step=True)
    if "mixed_decode" in args.only:
        mixed_decode(model, rounds, vocab, (2, 4) if args.smoke else (8, 32), on_case=record("mixed_decode"))
    if "forward" in args.only:
        record("forward")("8 prompts", forward_vs_peft(model, rounds, vocab))
    results["seconds"] = time.perf_counter() - started
    print(f"{rounds} rounds in {results['seconds']:.0f} s")
    write_json(results, args.json)
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
