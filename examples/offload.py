"""Delta-tune a backbone bigger than memory: accelerate keeps most layers on disk, LoRA trains beside them.

Each case runs in a fresh process, so its peak resident memory (VmHWM) is its own:

    python examples/offload.py                  # SmolLM2-135M: fully loaded vs layers 6-29 on disk
    python examples/offload.py --tiny           # the same on a tiny LLaMA built from a config
    python examples/offload.py --billions 1.1   # a random-init LLaMA of ~1.1B parameters (bf16) written to disk
    python examples/offload.py --billions 3 --steps 1 --length 16   # the least work that proves each step

Each phase prints its wall time and the peak RSS so far on stderr as it ends, so a run stopped by
``timeout`` still shows how far it got; the result adds the disk used (checkpoint, offload copies,
delta). With ``--billions`` the offloaded layers are read from the checkpoint's own shards (no
copy; ``--copy-offload`` streams with ``load_checkpoint_and_dispatch`` instead, which writes them
all again into ``offload_folder``).

A case: load the backbone (``device_map`` with decoder layers on ``"disk"`` and ``offload_folder``;
or, for ``--billions``, a meta-device skeleton from ``from_config`` under ``init_empty_weights``,
where the LoRA delta is planned and sized without memory, then the real weights put in place: the
resident ones read, the offloaded ones indexed in the checkpoint's shards), attach LoRA on q/v of every layer, check that detaching gives
the bare model's logits bit for bit with accelerate's hooks in place, train a few steps (with
gradient checkpointing, so that backward reloads one layer's weights at a time instead of keeping
every layer's alive), save, reload onto a freshly loaded backbone and compare logits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from opendelta import LoraModel  # noqa: E402


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def disk_mib(*folders: Path) -> float:
    """Bytes under these folders (model shards, accelerate's offload files, the saved delta), in MiB."""
    return sum(f.stat().st_size for folder in folders for f in folder.rglob("*") if f.is_file()) / 2**20


class Phases:
    """Wall time of each phase; each is also reported on stderr as it ends, so that a run stopped by
    `timeout` still says how far it got and at what peak memory."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 1)
        self.last = now
        print(f"[offload] {name}: {self.seconds[name]} s, peak RSS {peak_rss_mib():.0f} MiB", file=sys.stderr, flush=True)


def device_map(n_layers: int, on_disk_from: int) -> dict[str, str]:
    placed = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    placed.update({f"model.layers.{i}": "disk" if i >= on_disk_from else "cpu" for i in range(n_layers)})
    return placed


def write_random_llama(folder: Path, billions: float) -> dict:
    """A LLaMA of about `billions` parameters with random bf16 weights, written one decoder layer per
    safetensors shard so that no more than one layer is ever in memory."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    hidden = 2048 if billions < 2 else 3200
    sizes = dict(hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64, num_attention_heads=hidden // 64,
                 num_key_value_heads=hidden // 64, vocab_size=32000, tie_word_embeddings=False, torch_dtype="bfloat16")
    per_layer = 4 * hidden * hidden + 3 * hidden * sizes["intermediate_size"] + 2 * hidden
    sizes["num_hidden_layers"] = max(1, round((billions * 1e9 - 2 * 32000 * hidden) / per_layer))
    config = LlamaConfig(**sizes)
    config.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    index: dict[str, str] = {}
    shards = {"model-embed.safetensors": {"model.embed_tokens.weight": rand(32000, hidden)},
              "model-head.safetensors": {"lm_head.weight": rand(32000, hidden),
                                         "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}}
    for name, tensors in shards.items():
        save_file(tensors, folder / name, metadata={"format": "pt"})
        index.update(dict.fromkeys(tensors, name))
    inter = sizes["intermediate_size"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors = {p + "self_attn.q_proj.weight": rand(hidden, hidden), p + "self_attn.k_proj.weight": rand(hidden, hidden),
                   p + "self_attn.v_proj.weight": rand(hidden, hidden), p + "self_attn.o_proj.weight": rand(hidden, hidden),
                   p + "mlp.gate_proj.weight": rand(inter, hidden), p + "mlp.up_proj.weight": rand(inter, hidden),
                   p + "mlp.down_proj.weight": rand(hidden, inter),
                   p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                   p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        name = f"model-layer-{i:03d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        index.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return {"layers": config.num_hidden_layers, "hidden": hidden}


def dispatch_from_shards(model: torch.nn.Module, folder: Path, placed: dict[str, str]) -> torch.nn.Module:
    """Stream a skeleton's weights in without copying the disk-placed ones: those stay in the
    checkpoint's own safetensors shards, and accelerate's hooks read them from there at each call
    (an offload index into the shards, as transformers' ``from_pretrained`` makes for safetensors),
    where ``load_checkpoint_and_dispatch`` writes them all again into ``offload_folder``."""
    from accelerate import dispatch_model
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    on_disk = tuple(module + "." for module, device in placed.items() if device == "disk")
    index, in_memory = {}, {}
    for name, shard in weight_map.items():
        if name.startswith(on_disk):
            index[name] = {"safetensors_file": str(folder / shard), "weight_name": name, "dtype": "bfloat16"}
        else:
            in_memory.setdefault(shard, []).append(name)
    for shard, names in in_memory.items():
        with safe_open(folder / shard, framework="pt") as f:
            for name in names:
                set_module_tensor_to_device(model, name, "cpu", value=f.get_tensor(name))
    return dispatch_model(model, device_map=placed, main_device="cpu", offload_index=index)


def load(folder: Path, on_disk_from: int | None, offload: Path, skeleton: bool, copy: bool = False):
    """The backbone (and, for a skeleton, the LoRA config planned on it before any weight was read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    n = config.num_hidden_layers
    placed = None if on_disk_from is None else device_map(n, on_disk_from)
    if not skeleton:
        return AutoModelForCausalLM.from_pretrained(folder, device_map=placed, offload_folder=offload), None
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    planned = LoraModel(model, modified_modules=["q_proj", "v_proj"])  # runs its dummy pass on meta: no memory
    plan = {"delta_parameters": sum(p.numel() for p in planned.delta_parameters()), "modules": len(planned.layers),
            "on_meta": all(p.is_meta for p in planned.delta_parameters())}
    planned.detach()  # the skeleton is bare again; the same config builds the delta once the weights are in
    if copy or placed is None:
        model = load_checkpoint_and_dispatch(model, str(folder), device_map=placed, offload_folder=str(offload),
                                             dtype=torch.bfloat16)
    else:
        model = dispatch_from_shards(model, folder, placed)
    return model, (planned.config, plan)


def case(folder: Path, on_disk_from: int | None, steps: int, skeleton: bool, length: int, copy: bool = False) -> dict:
    """One run in this process: load, attach, detach check, train, save, reload check."""
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="offload_case_"))
    phases = Phases()
    model, planned = load(folder, on_disk_from, work / "offload", skeleton, copy)
    phases.done("load")
    model.eval()
    ids = torch.randint(10, 5000, (1, length), generator=torch.Generator().manual_seed(1))
    hooks = {n: m._hf_hook for n, m in model.named_modules() if hasattr(m, "_hf_hook")}
    with torch.no_grad():
        bare = model(ids).logits
    phases.done("bare forward")
    delta = LoraModel(model, modified_modules=["q_proj", "v_proj"]) if planned is None else LoraModel.from_config(planned[0], model)
    phases.done("attach")
    delta.detach()
    with torch.no_grad():
        detached_exact = torch.equal(model(ids).logits, bare)
    phases.done("detach + forward")
    hooks_intact = all(getattr(model.get_submodule(n), "_hf_hook", None) is h for n, h in hooks.items())
    delta.attach()
    delta.freeze_module(exclude=["deltas"], set_state_dict=True)
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(delta.delta_parameters(), lr=1e-3)
    losses, times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        phases.done(f"train step {len(times)}")
    model.eval()
    with torch.no_grad():
        tuned = model(ids).logits
    phases.done("tuned forward")
    delta.save_finetuned(work / "delta")
    phases.done("save")
    result = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "delta_parameters": sum(p.numel() for p in delta.delta_parameters()),
        "offloaded_layers": 0 if on_disk_from is None else model.config.num_hidden_layers - on_disk_from,
        "layers": model.config.num_hidden_layers,
        "load_s": phases.seconds["load"], "seconds_per_step": [round(t, 2) for t in times], "losses": losses,
        "detach_exact": detached_exact, "hooks_intact": hooks_intact, "peak_rss_mib": round(peak_rss_mib()),
        "skeleton_plan": None if planned is None else planned[1],
    }
    del model, delta, optimizer
    fresh, _ = load(folder, on_disk_from, work / "offload2", skeleton, copy)
    LoraModel.from_finetuned(work / "delta", fresh)
    with torch.no_grad():
        result["reload_equal"] = torch.equal(fresh.eval()(ids).logits, tuned)
    phases.done("reload + forward")
    result.update(phases=phases.seconds, peak_rss_mib=round(peak_rss_mib()),
                  disk_mib={"checkpoint": round(disk_mib(folder)), "offload_folders": round(disk_mib(work / "offload", work / "offload2")),
                            "delta": round(disk_mib(work / "delta"), 1)})
    shutil.rmtree(work)
    return result


def smollm2_folder() -> Path:
    """SmolLM2-135M as a safetensors folder (the demo's cache; made once, in another process, from the GGUF)."""
    from opendelta.demo.multitask import DEFAULT_CACHE

    if not (DEFAULT_CACHE / "model.safetensors").is_file():
        code = ("from rich.console import Console; from opendelta.demo.multitask import DEFAULT_CACHE, load_backbone; "
                "load_backbone(DEFAULT_CACHE, Console(stderr=True))")
        subprocess.run([sys.executable, "-c", code], check=True)
    return DEFAULT_CACHE


def tiny_folder(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=5000)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def in_child(args: list[str]) -> dict:
    """Run one case in a fresh Python process; its JSON result."""
    done = subprocess.run([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:  # its traceback went to our stderr
        raise SystemExit(f"the case failed (exit status {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny LLaMA built from a config")
    parser.add_argument("--billions", type=float, help="a random-init LLaMA of this many billion parameters")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--length", type=int, default=32, help="tokens in the training row")
    parser.add_argument("--copy-offload", action="store_true",
                        help="--billions: stream with load_checkpoint_and_dispatch, which copies the offloaded layers "
                             "into offload_folder (default: read them from the checkpoint's own shards)")
    parser.add_argument("--child", nargs=4, metavar=("FOLDER", "ON_DISK_FROM", "SKELETON", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.child:
        folder, on_disk_from, skeleton, steps = args.child
        result = case(Path(folder), None if on_disk_from == "none" else int(on_disk_from), int(steps),
                      skeleton == "1", args.length, args.copy_offload)
        print(json.dumps(result))
        return
    work = Path(tempfile.mkdtemp(prefix="offload_"))
    common = ["--length", str(args.length), *(["--copy-offload"] if args.copy_offload else [])]
    try:
        if args.billions:
            started = time.perf_counter()
            shape = write_random_llama(work / "model", args.billions)
            print(f"wrote a random {args.billions}B LLaMA ({shape}) in {time.perf_counter() - started:.0f} s", flush=True)
            runs = {"skeleton, 2 layers in memory, rest on disk": in_child([str(work / "model"), "2", "1", str(args.steps), *common])}
        else:
            folder = tiny_folder(work / "tiny") if args.tiny else smollm2_folder()
            n = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
            if args.tiny:  # no memory to measure: both cases in this process, to stay quick
                runs = {"fully loaded": case(folder, None, args.steps, False, args.length),
                        f"layers {n // 4}-{n - 1} on disk": case(folder, n // 4, args.steps, False, args.length)}
            else:
                runs = {
                    "fully loaded": in_child([str(folder), "none", "0", str(args.steps), *common]),
                    f"layers {n // 5}-{n - 1} on disk": in_child([str(folder), str(n // 5), "0", str(args.steps), *common]),
                }
    finally:  # the random checkpoint of --billions is gigabytes
        shutil.rmtree(work)
    for name, result in runs.items():
        print(f"{name}: {json.dumps(result)}")
        assert result["detach_exact"] and result["hooks_intact"] and result["reload_equal"], name


if __name__ == "__main__":
    main()
