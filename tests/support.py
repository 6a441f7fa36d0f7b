"""Helpers the test modules share: the repository root, tiny models, running a program like a user would.

A plain module (not a test module and not conftest): tests import what they need from here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from gpt2.config import MODERN_BLOCK, GPTConfig, TrainConfig, train_config
from gpt2.hellaswag import Example
from gpt2.model import GPT
from gpt2.schedule import lr_multiplier
from gpt2.tokenizer import N_VOCAB, get_encoding
from gpt2.trainer import StopRequest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
GOLDEN = ROOT / "tests" / "fixtures" / "golden_v0_1"  # the v0.1 release's behaviour, frozen (see make.py there)
GOLDEN_V0_2 = ROOT / "tests" / "fixtures" / "golden_v0_2"  # v0.2's modern recipe (today's modern-v1)
SAMPLE_HELLASWAG = ROOT / "data" / "sample" / "hellaswag_val_200.jsonl"


def tiny_config(**overrides: int) -> GPTConfig:
    """A GPT small enough to train in seconds on a CPU, with GPT-2's real vocabulary."""
    return GPTConfig(**{**dict(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32), **overrides})


def tiny_model(seed: int = 0, **overrides: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides))


def adversarial_padded_model(seed: int = 0) -> GPT:
    """A model saved the nanoGPT way (``vocab_size`` 50304) whose 47 padding rows would win every softmax."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(vocab_size=50304))
    with torch.no_grad():
        h = model.hidden(torch.randint(0, N_VOCAB, (4, 32))).flatten(0, 1)
        model.lm_head.weight[N_VOCAB:] = 200 * h.mean(0) / h.mean(0).norm() ** 2
    return model


def run_python(*args: str | Path, cwd: Path = ROOT, timeout: float = 300, env: dict | None = None):
    """Run ``python ARGS`` (a script or ``-m module``) like a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def write_shards(directory: Path, val: np.ndarray, train_parts: list[np.ndarray]) -> Path:
    """A data directory in the loader's format (val_000000.npy, train_000001.npy, ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "val_000000.npy", val.astype(np.uint16))
    for i, part in enumerate(train_parts, start=1):
        np.save(directory / f"train_{i:06d}.npy", part.astype(np.uint16))
    return directory


@torch.no_grad()
def reference_losses(model: torch.nn.Module, example: Example) -> tuple[list[float], list[float]]:
    """HellaSwag the obvious way, through the model's ``forward``: each ending alone after the (left-truncated)
    context, full logits, no padding, no packing."""
    enc = get_encoding()
    ctx = enc.encode_ordinary(example.ctx)
    endings = [enc.encode_ordinary(" " + e) for e in example.endings]
    ctx = ctx[max(0, len(ctx) + max(map(len, endings)) - model.config.block_size) :]
    sums = []
    for ending in endings:
        logits, _ = model(torch.tensor([ctx + ending]))
        logprobs = F.log_softmax(logits[0].double(), dim=-1)
        sums.append(-sum(logprobs[len(ctx) - 1 + j, t].item() for j, t in enumerate(ending)))
    return sums, [s / len(e) for s, e in zip(sums, endings)]


# A model whose steps take milliseconds on a CPU: 2 layers, 32 wide, a 256-token vocabulary (synthetic data).
TINY = dict(
    n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=256, seq_len=32, micro_batch=2, batch_tokens=128,
    warmup_steps=2, max_steps=20, eval_every=0, val_tokens=1024, sample_every=0, save_every=0,
    device="cpu", dtype="fp32", compile=False, peak_tflops="none",
)  # fmt: skip


# On a shared CPU, OpenMP threads spinning against other processes make tiny steps up to 100x slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def tiny(data: Path, out: Path, **overrides) -> TrainConfig:
    return train_config(data=str(data), out=str(out), **{**TINY, **overrides})


def cli_flags(data: Path, out: Path, **overrides) -> list[str]:
    """The train.py command line of ``tiny(data, out, **overrides)`` (a None leaves the flag at its default)."""
    args = []
    for name, value in {**TINY, **overrides, "data": data, "out": out}.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


class Capture:
    """A reporter that keeps what the trainer reports, and can ask it to stop after a given step."""

    def __init__(self, stop: StopRequest | None = None, stop_after: int | None = None) -> None:
        self.records, self.messages = [], []
        self.stop, self.stop_after = stop, stop_after

    def record(self, rec: dict) -> None:
        self.records.append(rec)
        if self.stop is not None and rec["kind"] == "train" and rec["step"] + 1 == self.stop_after:
            self.stop.request("test")

    def message(self, text: str) -> None:
        self.messages.append(text)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def losses(records: list[dict], kind: str = "train") -> dict[int, float]:
    steps = [r["step"] for r in records if r["kind"] == kind]
    assert len(steps) == len(set(steps)), f"duplicate {kind} records: {steps}"
    return {r["step"]: r["loss"] for r in records if r["kind"] == kind}


@dataclass(frozen=True)
class Recording:
    """A previous release's fp32 outputs, recorded on one kind of machine (see tests/fixtures/golden_*/make.py)."""

    path: Path
    exact: bool  # recorded on this kind of machine: reproduced bit for bit; else within the stated tolerances


def machine_key() -> str:
    """What sets the last bits of fp32 results here (the recordings' folder names; golden_v0_1/make.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("golden_make", GOLDEN / "make.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.machine_key()


def recordings(fixture: Path) -> list[Recording]:
    """Every kind of machine's recording of ``fixture``, this machine's (exact) first. Never empty, so a golden
    test always compares with something: on a kind of machine without a recording, the others within tolerance
    (``tests/fixtures/golden_v0_1/make.py`` at that release records one)."""
    key = machine_key()
    found = [Recording(path, path.name == key) for path in sorted(fixture.iterdir()) if path.is_dir() and
             path.name != "data"]  # fmt: skip
    assert found, f"no recordings in {fixture}"
    return sorted(found, key=lambda r: not r.exact)


# Every second-generation piece on, over the modern block (written out: the recipes are not this helper's business).
SPEEDRUN_BLOCK = dict(
    rope_theta=10000.0, norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=False, bias=False,
    split_qkv=True, doc_mask=True, window_pattern="SL", short_window=6, value_embeds=1, unet_skips=True, x0_mix=True,
    smear=True,
)  # fmt: skip


def speedrun_model(seed: int = 0, **overrides) -> GPT:
    """A tiny model with every second-generation piece on (4 layers: windows 6, full, 6, full; value embeddings in
    layers 0 and 3; skips 0 -> 3 and 1 -> 2; the x0 mix; the smear) and every weight random, the value-embedding
    gates, the skip weights, the x0-mix weights and the smear's included, so that each piece changes the output."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**{**SPEEDRUN_BLOCK, "n_layer": 4, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ve_gate" in name or "skip_weights" in name or "lambda" in name or "smear" in name:
                p.normal_(0.5, 0.5)
    return model.eval()


def worker_pid(parent: int, rank: int) -> int:
    """The pid of torchrun worker ``rank`` among the children of process ``parent`` (Linux /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile, or not ours to read
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"no worker of rank {rank} under pid {parent}")


def modern_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    # random weights everywhere, and the soft-cap on (the recipe leaves it off; its path is tested here)
    model = GPT(tiny_config(**{**MODERN_BLOCK, "zero_init": False, "logit_softcap": 15.0, **overrides}))
    return model.eval()


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """The GPT-2 recipe's learning rate at ``step``: ``lr`` times the cosine schedule's multiplier."""
    return lr * lr_multiplier(step, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr / lr)
