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
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from gpt2.config import TrainConfig
from gpt2.distributed import DistContext, autocast
from gpt2.metrics import measure_matmul_peak
from gpt2.model import GPT, GPTConfig
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
    optimizer = build_optimizers(model, TrainConfig(), device_type="cpu")  # the GPT-2 recipe's AdamW
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="124m,small", help=f"comma-separated, of: {', '.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation, allocator warm-up)")
    p.add_argument("--dtype", default="bf16", help="autocast dtype of every variant: bf16 or fp32")
    p.add_argument("--peak-seconds", type=float, default=6.0, help="time spent measuring the bf16 matmul peak")
    args = p.parse_args()

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
