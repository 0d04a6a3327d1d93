"""Where a LoRA training step's time goes on MiniLM (batch 32x64, 2 threads): torch.profiler self CPU
time of the ops whose input shapes involve the rank r=8 (the LoRA factors: forward, backward and
AdamW on them), against the whole step, for the frozen floor, opendelta LoRA and PEFT LoRA.

    PYTHONPATH=src python benchmarks/profile_lora.py
"""
import copy, sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from benchmarks.variants import build, train_step
from benchmarks.workloads import FULL
torch.set_num_threads(2)
w = next(x for x in FULL if x.name == "minilm")
base = w.load(); batch = w.batch(base, torch.device("cpu"))
from torch.profiler import profile, ProfilerActivity
for variant in ("frozen", "opendelta:lora", "peft:lora"):
    step = train_step(build(variant, copy.deepcopy(base)), batch)
    for _ in range(3): step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(5): step()
    total = lora = 0.0; n_ops = 0; lora_ops = 0
    for e in prof.key_averages(group_by_input_shape=True):
        total += e.self_cpu_time_total; n_ops += e.count
        shapes = [s for s in (e.input_shapes or []) if isinstance(s, list)]
        if any(8 in s for s in shapes if s):
            lora += e.self_cpu_time_total; lora_ops += e.count
    print(f"{variant:16s} step {total/5/1e3:8.1f} ms self-CPU | ops/step {n_ops/5:7.0f} | rank-8 ops {lora_ops/5:5.0f}/step, {lora/5/1e3:6.1f} ms = {100*lora/total:4.1f}% of the step")
