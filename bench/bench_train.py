"""Training throughput and MFU of our train step vs. the textbook nanoGPT loop, side by side on this machine.

For each model size it times one optimizer step on one micro-batch of random tokens:

- ``plain``: the textbook loop in the plainest PyTorch: attention written out (``q @ k^T``, a causal mask buffer,
  softmax, ``@ v``), one ``torch.optim.AdamW`` over all parameters (default, unfused implementation), no compile;
- ``ours eager`` and ``ours compiled``: ``gpt2.trainer.train_step`` on ``gpt2.model.GPT`` (SDPA attention,
  vocabulary padded to 50304, fused AdamW with decay groups), without and with ``torch.compile``.

All variants run under the same ``--dtype`` autocast. MFU is ``flops_per_token x tokens/s / peak`` with the peak
measured here with bf16 matmuls before and after the runs (the higher of the two; ``measure_matmul_peak``).
Medians over ``--steps`` timed steps after ``--warmup`` untimed ones (which include compilation).
Run: ``python bench/bench_train.py [--configs 124m,small]``; on a shared machine all numbers are noisy.

``--end-to-end`` instead runs ``train.py`` itself, this checkout's and the previous release's (``--baseline``, a
git revision checked out into a temporary directory), on the same synthetic shards: GPT-2 124M, bf16, 8
micro-steps of 1 x 1024 tokens per optimizer step, eager and compiled, alternating releases ``--repeats``
times. It reports the median tokens/s of the steps after the first (compilation, warm-up), the speed-up over
the baseline, MFU against the measured bf16 matmul peak, and each run's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from gpt2.config import GPTConfig, gpt2_recipe
from gpt2.distributed import DistContext, autocast
from gpt2.metrics import measure_matmul_peak
from gpt2.model import GPT
from gpt2.optim import build_optimizers
from gpt2.trainer import train_step

# name -> (architecture, seq_len, micro_batch): 124M as trained, and a small model that times in seconds.
CONFIGS = {
    "124m": (dict(n_layer=12, n_head=12, n_embd=768), 1024, 1),
    "small": (dict(n_layer=4, n_head=4, n_embd=256), 256, 8),
}


# ----------------------------------------------------------------------------------------------------------------------
# The reference: the textbook nanoGPT model and step


class PlainAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size))
        self.register_buffer("bias", mask.view(1, 1, cfg.block_size, cfg.block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class PlainBlock(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = PlainAttention(cfg)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(approximate="tanh"), nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class PlainGPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(PlainBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def plain_step_fn(cfg: GPTConfig, batch: tuple[torch.Tensor, torch.Tensor], dtype: str) -> Callable[[], float]:
    model = PlainGPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def step() -> float:
        with autocast("cpu", dtype):
            _, loss = model(*batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    return step


def our_step_fn(cfg: GPTConfig, batch: tuple[torch.Tensor, torch.Tensor], dtype: str, compile: bool):
    model = GPT(cfg)
    optimizer = build_optimizers(model, gpt2_recipe(), device_type="cpu")  # the GPT-2 recipe's AdamW
    runner = torch.compile(model) if compile else model

    def step() -> float:
        kwargs = dict(grad_accum_steps=1, lr_multiplier=1.0, grad_clip=1.0, ctx=DistContext(), dtype=dtype)
        return train_step(runner, optimizer, lambda: batch, **kwargs).loss

    return step


# ----------------------------------------------------------------------------------------------------------------------
# Timing and the report


@dataclass
class Timing:
    config: str
    variant: str
    tok_per_s: float
    flops_per_token: int
    first_s: float  # the first (untimed) step: compilation and warm-up


def time_variant(config: str, variant: str, step: Callable[[], float], tokens: int, flops_per_token: int,
                 warmup: int, steps: int) -> Timing:  # fmt: skip
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    first_s = time.perf_counter() - t0
    durations = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        durations.append(time.perf_counter() - t0)
    return Timing(config, variant, tokens / statistics.median(durations), flops_per_token, first_s)


def bench_config(name: str, args: argparse.Namespace) -> Iterator[Timing]:
    """Time each variant in turn (plain first), yielding as soon as one is done."""
    arch, seq_len, micro_batch = CONFIGS[name]
    padded = GPTConfig(block_size=seq_len, vocab_multiple=64, **arch)
    plain = GPTConfig(block_size=seq_len, **arch)  # the textbook model does not pad its vocabulary
    torch.manual_seed(0)
    x = torch.randint(0, padded.vocab_size, (micro_batch, seq_len))
    batch = (x, torch.roll(x, -1, dims=1))
    tokens, flops = micro_batch * seq_len, GPT(padded).flops_per_token(seq_len)
    variants = {
        "plain": lambda: plain_step_fn(plain, batch, args.dtype),
        "ours eager": lambda: our_step_fn(padded, batch, args.dtype, compile=False),
        "ours compiled": lambda: our_step_fn(padded, batch, args.dtype, compile=True),
    }
    for variant, make in variants.items():
        yield time_variant(name, variant, make(), tokens, flops, args.warmup, args.steps)


# ----------------------------------------------------------------------------------------------------------------------
# End to end: train.py itself, this checkout vs the previous release

ROOT = Path(__file__).resolve().parents[1]
E2E_FLAGS = ["--model", "gpt2", "--seq-len", "1024", "--micro-batch", "1", "--batch-tokens", str(8 * 1024),
             "--warmup-steps", "1", "--eval-every", "0", "--sample-every", "0", "--device", "cpu", "--dtype", "bf16",
             "--peak-tflops", "none"]  # fmt: skip


def checkout(revision: str, into: Path) -> Path:
    """The tree of ``revision`` (a git revision of this repository), extracted into ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def synthetic_shards(directory: Path, tokens: int) -> Path:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    np.save(directory / "val_000000.npy", rng.integers(0, 50257, 1 << 16, dtype=np.uint16))
    np.save(directory / "train_000001.npy", rng.integers(0, 50257, tokens, dtype=np.uint16))
    return directory


def run_train(tree: Path, data: Path, out: Path, steps: int, compile: bool) -> tuple[float, float]:
    """Median tokens/s of steps 1.. of ``tree``'s train.py, and the run's peak RSS in GB (from wait4)."""
    command = [sys.executable, "train.py", "--data", str(data), "--out", str(out), "--max-steps", str(steps),
               "--save-every", "0", *E2E_FLAGS, "--compile" if compile else "--no-compile"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{tree.name} train.py failed: {proc.stderr.read()[-2000:]}")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rates = [r["tok_per_s"] for r in records if r["kind"] == "train" and r["step"] >= 1]
    return statistics.median(rates), usage.ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def end_to_end(args: argparse.Namespace) -> None:
    peaks = [measure_matmul_peak("cpu", seconds=args.peak_seconds)]
    flops = GPT(GPTConfig(vocab_multiple=64)).flops_per_token(1024)
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {"previous": checkout(args.baseline, tmp / "previous"), "this": ROOT}
        data = synthetic_shards(tmp / "data", (args.steps + 1) * 8 * 1024 + 1)
        for repeat in range(args.repeats):
            for mode in ("eager", "compiled"):
                for release, tree in trees.items():
                    out = tmp / f"run_{release}_{mode}_{repeat}"
                    rate, rss = run_train(tree, data, out, args.steps, compile=mode == "compiled")
                    results.setdefault((release, mode), []).append((rate, rss))
                    print(f"{release:>8} {mode:<8} repeat {repeat}: {rate:7.1f} tok/s, peak RSS {rss:5.1f} GB",
                          flush=True)  # fmt: skip
    peaks.append(measure_matmul_peak("cpu", seconds=args.peak_seconds))
    peak = max(peaks)
    print(f"\nbf16 matmul peak: {peak / 1e9:.1f} GFLOP/s (before {peaks[0] / 1e9:.1f}, after {peaks[1] / 1e9:.1f}); "
          f"124M, 8 x 1024 tokens per step, baseline {args.baseline}")  # fmt: skip
    print(
        f"{'mode':<9} {'previous tok/s':>14} {'this tok/s':>11} {'speed-up':>9} {'MFU':>6} {'peak RSS prev/this':>19}"
    )
    for mode in ("eager", "compiled"):
        prev, this = results["previous", mode], results["this", mode]
        prev_rate, this_rate = statistics.median(r for r, _ in prev), statistics.median(r for r, _ in this)
        print(f"{mode:<9} {prev_rate:>14.1f} {this_rate:>11.1f} {this_rate / prev_rate:>8.2f}x "
              f"{100 * flops * this_rate / peak:>5.1f}% {max(m for _, m in prev):>8.1f} / "
              f"{max(m for _, m in this):.1f} GB")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="124m,small", help=f"comma-separated, of: {', '.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation, allocator warm-up)")
    p.add_argument("--dtype", default="bf16", help="autocast dtype of every variant: bf16 or fp32")
    p.add_argument("--peak-seconds", type=float, default=6.0, help="time spent measuring the bf16 matmul peak")
    p.add_argument("--end-to-end", action="store_true", help="run train.py itself: this checkout vs --baseline")
    p.add_argument("--baseline", default="eb7dc4e", help="git revision of the previous release (end-to-end mode)")
    p.add_argument("--repeats", type=int, default=2, help="end-to-end runs per release and mode (medians reported)")
    args = p.parse_args()
    if args.end_to_end:
        end_to_end(args)
        return

    # On a shared machine the reachable peak drifts: measure it before and after, and take the higher.
    peaks = [measure_matmul_peak("cpu", seconds=args.peak_seconds)]
    timings = []
    for name in args.configs.split(","):
        for t in bench_config(name, args):
            print(f"timed {t.config} {t.variant}: {t.tok_per_s:.1f} tok/s", flush=True)
            timings.append(t)
    peaks.append(measure_matmul_peak("cpu", seconds=args.peak_seconds))
    peak = max(peaks)
    print(f"bf16 matmul peak on this CPU ({torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s "
          f"(before {peaks[0] / 1e9:.1f}, after {peaks[1] / 1e9:.1f})")  # fmt: skip
    print(f"{'config':<7} {'variant':<14} {'tok/s':>9} {'MFU':>7} {'vs plain':>9} {'1st step s':>11}")
    base = {t.config: t.tok_per_s for t in timings if t.variant == "plain"}
    for t in timings:
        print(
            f"{t.config:<7} {t.variant:<14} {t.tok_per_s:>9.1f} {100 * t.flops_per_token * t.tok_per_s / peak:>6.1f}% "
            f"{t.tok_per_s / base[t.config]:>8.2f}x {t.first_s:>11.1f}"
        )


if __name__ == "__main__":
    main()
