"""Peak memory of a GPT-2 124M training step with and without activation checkpointing, side by side.

Each measurement is a fresh process (so that its peak resident set size is its own): it builds GPT-2 124M, the
GPT-2 recipe's AdamW, and runs ``--steps`` optimizer steps of ``gpt2.trainer.train_step`` on one micro-batch of
``--micro-batch`` x ``--seq-len`` random tokens under bf16 autocast, with the trainer's host-memory policy
(``gpt2.hostmem``: freed memory is kept, up to 4 GiB, for reuse; ``--allocator default`` leaves glibc's own). The
peak resident set size (``ru_maxrss``) is read at the end; the resident size before the model was built (the
Python runtime, torch, the libraries) is reported beside it, and so is the peak of the tensors themselves
(``gpt2.memory.TensorMemory`` around the steps, plus the weights, which exist before): what the memory plan
counts, without the allocator's free-but-kept memory and the runtime. Two steps, because the optimizer state exists from
the second on: that step's forward and backward run beside it, as every later one does. The processes alternate
(without, with, without, ...) ``--repeats`` times; the table shows medians and the memory plan
(``gpt2.memory.plan``) of the same step.

    python bench/bench_memory.py [--repeats 3] [--micro-batch 8] [--seq-len 1024] [--steps 2] [--allocator default]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT_KEYS = ("peak_rss_gib", "baseline_gib", "tensor_peak_gib", "plan_gib")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(args: argparse.Namespace) -> None:
    """One measurement, printed as one JSON line."""
    import torch

    from gpt2.config import train_config
    from gpt2.distributed import DistContext
    from gpt2.hostmem import keep_freed_memory
    from gpt2.memory import GIB, TensorMemory, plan
    from gpt2.model import GPT
    from gpt2.optim import build_optimizers
    from gpt2.parallel import checkpoint_blocks
    from gpt2.trainer import train_step

    before = rss_bytes()
    cfg = train_config(model="gpt2", seq_len=args.seq_len, micro_batch=args.micro_batch, device="cpu", dtype="bf16",
                      activation_checkpointing=args.checkpointing)  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg.model_config())
    if args.checkpointing:
        checkpoint_blocks(model)
    optimizers = build_optimizers(model, cfg, "cpu")
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    seconds = []
    policy = keep_freed_memory("cpu") if args.allocator == "trainer" else contextlib.nullcontext()
    # TensorMemory: what the steps allocate (gradients, optimizer state, activations, temporaries)
    with policy as host_memory, TensorMemory() as tensors:
        for _ in range(args.steps):
            start = time.perf_counter()
            stats = train_step(model, optimizers, lambda: (x, x), grad_accum_steps=1, lr_multiplier=1.0,
                               grad_clip=1.0, ctx=DistContext(), dtype="bf16")  # fmt: skip
            seconds.append(time.perf_counter() - start)
            if host_memory is not None:
                host_memory.after_step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    planned = plan(model.config, micro_batch=args.micro_batch, seq_len=args.seq_len, dtype="bf16",
                   optimizer=cfg.optimizer, activation_checkpointing=args.checkpointing)  # fmt: skip
    print(json.dumps({"checkpointing": args.checkpointing, "peak_rss_gib": peak / GIB, "baseline_gib": before / GIB,
                      "tensor_peak_gib": (weights + tensors.peak) / GIB, "plan_gib": planned.total / GIB,
                      "step_s": seconds, "loss": stats.loss}))  # fmt: skip


def measure(checkpointing: bool, args: argparse.Namespace) -> dict:
    sizes = ["--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
             "--allocator", args.allocator]  # fmt: skip
    command = [sys.executable, __file__, "--worker", *sizes] + (["--checkpointing"] if checkpointing else [])
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--allocator", choices=["trainer", "default"], default="trainer",
                        help="trainer: the trainer's host-memory policy; default: glibc's")  # fmt: skip
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for repeat in range(args.repeats):
        for checkpointing in (False, True):
            runs[checkpointing].append(measure(checkpointing, args))
            print(f"repeat {repeat}: {json.dumps(runs[checkpointing][-1])}", file=sys.stderr, flush=True)
    medians = {
        ac: {key: statistics.median(r[key] for r in results) for key in RESULT_KEYS}
        | {"step_s": statistics.median(r["step_s"][-1] for r in results)}
        for ac, results in runs.items()
    }
    import torch

    print(
        f"GPT-2 124M, micro-batch {args.micro_batch} x {args.seq_len}, bf16, AdamW, {args.steps} steps, "
        f"{args.allocator} allocator policy; "
        f"{datetime.date.today()}, {cpu_model()}, torch {torch.__version__}; medians of {args.repeats}\n"
    )
    print("| activation checkpointing | peak RSS GiB | RSS before the model GiB | tensor peak GiB | plan GiB "
          "| last step s | loss |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for ac in (False, True):
        m = medians[ac]
        losses = sorted({round(r["loss"], 4) for r in runs[ac]})
        print(
            f"| {'on' if ac else 'off'} | {m['peak_rss_gib']:.2f} | {m['baseline_gib']:.2f} | "
            f"{m['tensor_peak_gib']:.2f} | {m['plan_gib']:.2f} | {m['step_s']:.1f} | {', '.join(map(str, losses))} |"
        )
    ratio = medians[True]["peak_rss_gib"] / medians[False]["peak_rss_gib"]
    print(f"\npeak RSS with / without checkpointing: {ratio:.2f}")


if __name__ == "__main__":
    main()
