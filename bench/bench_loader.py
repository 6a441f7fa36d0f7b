"""Loader throughput: ``gpt2.data.TrainLoader`` vs. the textbook build-nanogpt ``DataLoaderLite``, side by side.

Both read the same synthetic uint16 shards (random ids < 50257) for one full epoch per repeat, so the
reference's cost of turning each whole shard into an int64 tensor is counted where it falls. Prints the
median tokens/s and batches/s of each, the ratio ours/reference, the time to the first batch, and the data
time per micro-batch as a share of an estimated GPT-2 124M training micro-step on an H100.

    .venv/bin/python bench/bench_loader.py --shard-tokens 50000000 --shards 3 --micro-batch 16 64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gpt2.config import GPTConfig
from gpt2.data import TrainLoader, list_shards
from gpt2.errors import run_cli
from gpt2.model import GPT

H100_BF16_FLOPS = 989e12  # dense bf16 peak
ASSUMED_MFU = 0.4


class DataLoaderLite:
    """build-nanogpt's loader (train_gpt2.py), as published: a whole shard as int64, sliced in order."""

    def __init__(self, data_dir: Path, B: int, T: int, process_rank: int = 0, num_processes: int = 1) -> None:
        self.B, self.T, self.process_rank, self.num_processes = B, T, process_rank, num_processes
        self.shards = [str(p) for p in list_shards(data_dir, "train")]
        self.reset()

    def reset(self) -> None:
        self.current_shard = 0
        self.tokens = self.load_tokens(self.shards[self.current_shard])
        self.current_position = self.B * self.T * self.process_rank

    @staticmethod
    def load_tokens(filename: str) -> torch.Tensor:
        npt = np.load(filename).astype(np.int32)
        return torch.tensor(npt, dtype=torch.long)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.B, self.T
        buf = self.tokens[self.current_position : self.current_position + B * T + 1]
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)
        self.current_position += B * T * self.num_processes
        if self.current_position + (B * T * self.num_processes + 1) > len(self.tokens):
            self.current_shard = (self.current_shard + 1) % len(self.shards)
            self.tokens = self.load_tokens(self.shards[self.current_shard])
            self.current_position = B * T * self.process_rank
        return x, y


def write_shards(directory: Path, shards: int, shard_tokens: int) -> None:
    rng = np.random.default_rng(0)
    for index in range(1, shards + 1):
        np.save(directory / f"train_{index:06d}.npy", rng.integers(0, 50257, shard_tokens, dtype=np.uint16))


def time_epoch(make: Callable[[], object], n_batches: int) -> tuple[float, float]:
    """(seconds to the first batch including construction, seconds for n_batches batches in all)."""
    start = time.perf_counter()
    loader = make()
    loader.next_batch()
    first = time.perf_counter() - start
    for _ in range(n_batches - 1):
        loader.next_batch()
    return first, time.perf_counter() - start


def estimated_step_seconds(micro_batch: int, seq_len: int) -> float:
    """Compute time of one 124M micro-step (fwd+bwd) on an H100 at ASSUMED_MFU."""
    with torch.device("meta"):
        model = GPT(GPTConfig.preset("gpt2"))
    return model.flops_per_token(seq_len) * micro_batch * seq_len / (H100_BF16_FLOPS * ASSUMED_MFU)


def bench_micro_batch(data_dir: Path, B: int, T: int, shards: int, shard_tokens: int, repeats: int) -> None:
    # The reference drops each shard's tail, so it yields fewer batches per epoch; time that many for all.
    n_batches = shards * ((shard_tokens - 1) // (B * T))
    loaders: dict[str, Callable[[], object]] = {
        "build-nanogpt": lambda: DataLoaderLite(data_dir, B, T),
        "ours (in order)": lambda: TrainLoader(data_dir, T, B * T, B, shuffle=False),
        "ours (shuffled)": lambda: TrainLoader(data_dir, T, B * T, B, shuffle=True),
    }
    # Interleave the loaders within each repeat so background load on a shared machine hits all alike.
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in loaders}
    for _ in range(repeats):
        for name, make in loaders.items():
            runs[name].append(time_epoch(make, n_batches))
    print(f"\nB x T = {B} x {T}, {n_batches} batches per run")
    step_s = estimated_step_seconds(B, T)
    reference_rate = None
    for name, timings in runs.items():
        first = statistics.median(t[0] for t in timings)
        seconds = statistics.median(t[1] for t in timings)
        rate = n_batches * B * T / seconds
        reference_rate = reference_rate or rate
        per_batch = seconds / n_batches
        print(
            f"  {name:16s} {rate / 1e6:8.1f} M tok/s {n_batches / seconds:9.0f} batch/s  "
            f"ratio {rate / reference_rate:5.2f}  first batch {first * 1e3:7.1f} ms  "
            f"{per_batch * 1e3:6.3f} ms/batch = {100 * per_batch / step_s:5.2f}% of an est. H100 micro-step"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard-tokens", type=int, default=50_000_000, help="tokens per synthetic shard")
    parser.add_argument("--shards", type=int, default=3, help="number of synthetic train shards")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per loader; medians are reported")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        write_shards(Path(tmp), args.shards, args.shard_tokens)
        total = args.shards * args.shard_tokens
        print(
            f"{args.shards} shards x {args.shard_tokens:,} tokens ({total * 2 / 1e6:.0f} MB uint16), one epoch per run"
        )
        for B in args.micro_batch:
            bench_micro_batch(Path(tmp), B, args.seq_len, args.shards, args.shard_tokens, args.repeats)
        print(
            f"\n(H100 micro-step estimated from 124M FLOPs at {ASSUMED_MFU:.0%} MFU; the reference also holds "
            f"{args.shard_tokens * 8 / 1e6:.0f} MB of int64 per rank, ours only the batch)"
        )


if __name__ == "__main__":
    run_cli(main)
