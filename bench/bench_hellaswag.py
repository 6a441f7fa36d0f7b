"""HellaSwag throughput: ``gpt2.hellaswag.evaluate`` vs. the plain one-example-at-a-time loop, side by side.

The reference is build-nanogpt's hellaswag.py loop: per example, the 4 rows ``ctx + ending`` padded to
the longest, full logits over every position, cross-entropy masked to the ending tokens. Both run on the
same random weights in fp32, interleaved repeat by repeat; prints the median examples/s of each, the
ratio ours/reference, and whether every prediction (acc and acc_norm argmins) is identical.

    .venv/bin/python bench/bench_hellaswag.py                              # small GPT, 1,000 examples
    .venv/bin/python bench/bench_hellaswag.py --model gpt2 --limit 40      # GPT-2 124M-sized weights
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from gpt2.config import GPTConfig
from gpt2.distributed import DistContext
from gpt2.errors import run_cli
from gpt2.hellaswag import Example, evaluate, load_examples
from gpt2.model import GPT
from gpt2.tokenizer import get_encoding

SHARED_VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "hellaswag" / "hellaswag_val_first1000.jsonl"
MODELS = {
    "small": dict(n_layer=4, n_head=4, n_embd=128),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
}


@torch.no_grad()
def reference_predictions(model: GPT, examples: list[Example]) -> list[tuple[int, int, list[float]]]:
    """build-nanogpt's loop: (pred, pred_norm, summed losses) per example."""
    enc = get_encoding()
    out = []
    for example in examples:
        ctx = enc.encode_ordinary(example.ctx)
        rows = [ctx + enc.encode_ordinary(" " + e) for e in example.endings]
        width = max(map(len, rows))
        tokens = torch.zeros((4, width), dtype=torch.long)
        mask = torch.zeros((4, width), dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row)
            mask[i, len(ctx) : len(row)] = 1
        logits, _ = model(tokens)
        shift_logits, shift_tokens = logits[:, :-1, :].contiguous(), tokens[:, 1:].contiguous()
        losses = F.cross_entropy(shift_logits.flatten(0, 1), shift_tokens.flatten(), reduction="none").view(4, -1)
        shift_mask = mask[:, 1:]
        sums = (losses * shift_mask).sum(dim=1)
        means = sums / shift_mask.sum(dim=1)
        out.append((int(sums.argmin()), int(means.argmin()), sums.tolist()))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench/bench_hellaswag.py", description=__doc__)
    p.add_argument("--data", type=Path, default=SHARED_VAL, help="HellaSwag JSONL (default: the shared 1,000)")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--model", choices=list(MODELS), default="small", help="random weights of this size")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads for both")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    examples = load_examples(args.data, args.limit)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODELS[args.model])).eval()
    print(f"{len(examples)} examples, {args.model} model ({model.num_params() / 1e6:.1f}M params), fp32, "
          f"{args.threads} threads, batch size {args.batch_size}")  # fmt: skip

    ours_rates, ref_rates = [], []
    for repeat in range(args.repeats):
        t0 = time.perf_counter()
        ref = reference_predictions(model, examples)
        ref_rates.append(len(examples) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        ours = evaluate(model, examples, DistContext(), batch_size=args.batch_size, dtype="fp32", keep_predictions=True)
        ours_rates.append(len(examples) / (time.perf_counter() - t0))
        print(f"repeat {repeat}: reference {ref_rates[-1]:.1f} ex/s, ours {ours_rates[-1]:.1f} ex/s")

    same = sum((p.pred, p.pred_norm) == (r[0], r[1]) for p, r in zip(ours.predictions, ref))
    max_diff = max(abs(a - b) for p, r in zip(ours.predictions, ref) for a, b in zip(p.sum_losses, r[2]))
    ref_rate, ours_rate = statistics.median(ref_rates), statistics.median(ours_rates)
    print(f"reference (one example, 4 padded rows, full logits): {ref_rate:.1f} ex/s (median)")
    print(f"ours (packed shared context, scored logits only):    {ours_rate:.1f} ex/s (median)")
    paired = statistics.median(o / r for o, r in zip(ours_rates, ref_rates))
    print(f"speedup: {ours_rate / ref_rate:.2f}x of the medians, {paired:.2f}x median of paired repeats (target >= 3x)")
    print(f"identical predictions: {same}/{len(examples)} (acc {ours.acc:.4f}, acc_norm {ours.acc_norm:.4f}); "
          f"max |summed loss difference| {max_diff:.2e}")  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
