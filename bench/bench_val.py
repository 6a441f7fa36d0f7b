"""The validation pass: this checkout's loss vs the previous release's, side by side on this machine.

A validation pass runs the model forward under ``torch.no_grad()`` with targets, so the fused loss
(``gpt2/loss.py``) computes the cross-entropy chunk by chunk without logits. The previous release decided whether
to also compute the gradients from ``ctx.needs_input_grad``, which follows ``requires_grad``, not grad mode: under
``no_grad`` it still computed ``dW`` and ``dh`` for every chunk. This bench times the same val pass (bf16
autocast, a model with a small body and the full 50,304-row vocabulary, where the head dominates) with both
releases' loss functions, alternating them, and reports medians and the ratio.

  python bench/bench_val.py [--baseline 3848e13] [--repeats 7]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt2 import loss as this_loss
from gpt2.config import GPTConfig
from gpt2.distributed import autocast
from gpt2.model import GPT

ROOT = Path(__file__).resolve().parents[1]


def previous_loss_module(revision: str, tmp: Path):
    """``gpt2/loss.py`` as it was at ``revision``, imported as a standalone module."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:gpt2/loss.py"], capture_output=True,
                            check=True, text=True).stdout  # fmt: skip
    path = tmp / "previous_loss.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("previous_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def val_pass(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Seconds for one pass over ``batches``, as ``gpt2.trainer.evaluate_loss`` runs it (bf16 autocast)."""
    t0 = time.perf_counter()
    for x, y in batches:
        with autocast("cpu", "bf16"):
            model(x, y)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default="3848e13", help="git revision of the previous release")
    p.add_argument("--repeats", type=int, default=7, help="timed passes per release (alternating); medians reported")
    p.add_argument("--batches", type=int, default=4, help="micro-batches per val pass")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=args.seq_len, vocab_multiple=64)
    model = GPT(config).eval()
    shape = (args.micro_batch, args.seq_len)
    batches = [(torch.randint(0, 50257, shape), torch.randint(0, 50257, shape)) for _ in range(args.batches)]
    with tempfile.TemporaryDirectory() as tmp:
        releases = {"previous": previous_loss_module(args.baseline, Path(tmp)).fused_cross_entropy,
                    "this": this_loss.fused_cross_entropy}  # fmt: skip
        model_module = sys.modules[GPT.__module__]
        times: dict[str, list[float]] = {name: [] for name in releases}
        losses = {}
        for repeat in range(args.repeats + 1):  # the first round warms up both
            for name, fn in releases.items():
                model_module.fused_cross_entropy = fn  # GPT.forward calls the module's name
                seconds = val_pass(model, batches)
                if repeat:
                    times[name].append(seconds)
                with torch.no_grad(), autocast("cpu", "bf16"):
                    losses[name] = model(*batches[0])[1].item()
        model_module.fused_cross_entropy = this_loss.fused_cross_entropy
    tokens = args.batches * args.micro_batch * args.seq_len
    print(f"val pass: {args.batches} x {args.micro_batch} x {args.seq_len} tokens, model {config.n_layer} layers x "
          f"{config.n_embd}, head {config.padded_vocab_size} rows, bf16 autocast, {torch.get_num_threads()} threads; "
          f"baseline {args.baseline}")  # fmt: skip
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<9} median {1000 * median:8.1f} ms  ({tokens / median:,.0f} tok/s)  loss {losses[name]:.6f}")
    ratio = statistics.median(times["previous"]) / statistics.median(times["this"])
    print(f"speed-up of this release's val pass: {ratio:.2f}x (median of {args.repeats} alternating passes each)")


if __name__ == "__main__":
    main()
