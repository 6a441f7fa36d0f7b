"""Masked attention on CPU: an SDPA boolean mask vs flex_attention (eager and compiled), and what document masks
and windows cost a training step, to choose ``gpt2.model``'s CPU path.

Rows hold documents of random lengths (mean ``--doc-tokens``); the mask is causal, within documents, and, for the
windowed case, within ``--window`` keys. Every time is the median of ``--repeats`` rounds after warm-up, the variants
of a table run round-robin within each round (on a shared machine, load then falls on all of them alike).

1. The attention op alone, forward (what validation and scoring run): SDPA ``is_causal`` (no mask: the unmasked
   baseline), SDPA with the boolean mask (mask building included), flex_attention eager and compiled (block mask
   building included). Forward + backward: SDPA only, because torch 2.13's flex_attention has no backward on CPU.
2. A whole training step (forward + backward) of a small model, eager and compiled: the modern block with causal
   attention (modern-v1) vs. the same with each second-generation piece, and with all of them (masks: SDPA path).

    .venv/bin/python bench/bench_masks.py --seq-len 512 1024 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F
from torch.nn.attention.flex_attention import flex_attention

from gpt2 import model as model_module
from gpt2.config import GPTConfig
from gpt2.errors import run_cli
from gpt2.model import GPT, flex_block_mask

EOT = 50256
MODERN = dict(rope_theta=10000.0, norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=False, bias=False)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, run round-robin (one call of each per round), so that load from other
    processes on a shared machine falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def document_rows(B: int, T: int, doc_tokens: int, seed: int = 0) -> torch.Tensor:
    """Token rows whose documents (each starting with EOT) have exponentially distributed lengths."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 50000, (B, T), generator=g)
    starts = torch.rand(B, T, generator=g) < 1 / doc_tokens
    starts[:, 0] = True
    idx[starts] = EOT
    return idx


def sdpa_mask(idx: torch.Tensor, window: int | None) -> torch.Tensor:
    T = idx.size(1)
    docs = (idx == EOT).cumsum(1)
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & (docs[:, None, :, None] == docs[:, None, None, :])
    if window is not None:
        i = torch.arange(T)
        mask = mask & ((i[:, None] - i[None, :]) < window)
    return mask


def op_timings(B: int, H: int, T: int, D: int, doc_tokens: int, window: int | None, repeats: int) -> dict[str, float]:
    idx = document_rows(B, T, doc_tokens)
    docs = (idx == EOT).cumsum(1)
    q, k, v = torch.randn(3, B, H, T, D).unbind(0)
    compiled_flex = torch.compile(flex_attention, dynamic=False)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    @torch.no_grad()
    def forward(kind: str) -> None:
        if kind == "causal":
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif kind == "sdpa":
            F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(idx, window))
        else:
            flex = flex_attention if kind == "flex eager" else compiled_flex
            flex(q, k, v, block_mask=flex_block_mask(docs, window, B, T, q.device))

    def backward(mask: torch.Tensor | None) -> None:
        y = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, is_causal=mask is None)
        y.sum().backward()

    return interleaved_medians(
        {
            "fwd sdpa causal (no mask)": lambda: forward("causal"),
            "fwd sdpa bool mask": lambda: forward("sdpa"),
            "fwd flex eager": lambda: forward("flex eager"),
            "fwd flex compiled": lambda: forward("flex compiled"),
            "fwd+bwd sdpa causal (no mask)": lambda: backward(None),
            "fwd+bwd sdpa bool mask": lambda: backward(sdpa_mask(idx, window)),
        },
        repeats,
    )


def step_timings(args: argparse.Namespace, T: int) -> dict[str, float]:
    """Seconds per training step (forward + backward) of the small model, per variant and compile mode."""
    idx = document_rows(args.micro_batch, T, args.doc_tokens, seed=1)
    every = dict(doc_mask=True, window_pattern="SSSL", short_window=args.window, split_qkv=True, value_embeds=1,
                 unet_skips=True)  # fmt: skip
    variants = {
        "modern-v1 (causal)": {},
        "+ doc_mask": dict(doc_mask=True),
        "+ doc_mask + windows SSSL": dict(doc_mask=True, window_pattern="SSSL", short_window=args.window),
        "+ split_qkv": dict(split_qkv=True),
        "+ value_embeds 1 + unet_skips": dict(value_embeds=1, unet_skips=True),
        "+ every piece": every,
    }
    steps = {}
    for compile in (False, True):
        for name, extra in variants.items():
            torch.manual_seed(0)
            model = GPT(GPTConfig(block_size=T, n_layer=args.n_layer, n_head=args.n_embd // 64, n_embd=args.n_embd,
                                  vocab_multiple=64, **MODERN, **extra))  # fmt: skip
            forward = torch.compile(model) if compile else model

            def step(model: GPT = model, forward: Callable = forward) -> None:
                model.zero_grad(set_to_none=True)
                forward(idx, idx)[1].backward()

            steps[f"{'compiled' if compile else 'eager'} {name}"] = step
    return interleaved_medians(steps, args.repeats)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--batch", type=int, default=4, help="rows in the attention-op benchmark")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--doc-tokens", type=int, default=300, help="mean document length in tokens")
    p.add_argument("--window", type=int, default=128, help="the short window (tokens)")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-steps", action="store_true", help="only the attention op")
    p.add_argument("--no-ops", action="store_true", help="only the training steps")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_module.MASKED_ATTENTION = "auto"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); medians of {args.repeats} runs (ms)")
    for T in args.seq_len:
        for window in () if args.no_ops else (None, args.window):
            what = f"T={T}, batch {args.batch} x {args.heads} heads x {args.head_dim}, docs ~{args.doc_tokens} tokens"
            print(f"\nattention op, {what}, window {window or 'none'}")
            for name, seconds in op_timings(
                args.batch, args.heads, T, args.head_dim, args.doc_tokens, window, args.repeats
            ).items():
                print(f"  {name:34s} {seconds * 1e3:9.2f}")
        if not args.no_steps:
            print(f"\ntraining step, {args.n_layer} layers x {args.n_embd}, micro-batch {args.micro_batch} x {T}")
            steps = step_timings(args, T)
            for name, seconds in steps.items():
                base = steps[f"{name.split()[0]} modern-v1 (causal)"]
                print(f"  {name:42s} {seconds * 1e3:9.1f}  x{seconds / base:.2f}")


if __name__ == "__main__":
    run_cli(main)
