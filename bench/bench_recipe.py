"""The two recipes side by side at CPU scale: how many tokens does ``--recipe modern`` need to reach the loss that
``--recipe gpt2`` reaches with its whole budget?

Measured the speedrun way, on the same shards, model size, seed and data order:

1. sweep: each recipe at several base learning rates (``--gpt2-lrs``; ``--modern-scales`` multiplies all of the
   modern recipe's rates: Muon, embeddings, head) with the full token budget; each recipe keeps its best;
2. budgets: the modern recipe at its best rates with 10-80% of the budget, each a complete run (its
   warmup-stable-decay schedule finished within its own budget);
3. the ratio: where the modern final val loss, interpolated linearly between budgets, crosses the classic one;
4. ablation: the modern recipe with one piece switched back to GPT-2's, at 40% of the budget.

Every run is ``gpt2.trainer.train`` (the pipeline itself) with validation on the same fixed tokens every
``--eval-every`` steps. Results go to ``<work>/results.json`` as each run finishes, so an interrupted bench
resumes; ``--timing`` measures seconds per token of both recipes, eager and compiled, on short runs (do it on
an otherwise idle machine). A PNG of val loss against tokens is written next to the results.

  python bench/bench_recipe.py --input ../shared/data/corpus/openstax_textbooks_75pct.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from gpt2.config import train_config
from gpt2.files import atomic_write_text
from gpt2.prepare import PrepareConfig, prepare
from gpt2.rundir import JsonlLog
from gpt2.trainer import train

ABLATIONS = {  # one piece of the modern recipe switched back to GPT-2's (or, for the soft-cap, on)
    "adamw instead of muon": dict(optimizer="adamw", lr=1.8e-3, embed_lr=1.8e-3, head_lr=1.8e-3),
    "learned positions": dict(rope_theta=0.0),
    "no qk-norm": dict(qk_norm=False),
    "gelu instead of relu2": dict(mlp="gelu"),
    "tied head (at the head's rate)": dict(tie_embeddings=True, embed_lr=0.006),
    "with a logit soft-cap of 15": dict(logit_softcap=15.0),  # the one piece the recipe leaves off
    "cosine instead of wsd": dict(schedule="cosine"),
}


def model_flags(args: argparse.Namespace) -> dict[str, Any]:
    return dict(n_layer=args.n_layer, n_head=args.n_embd // 64, n_embd=args.n_embd, block_size=args.seq_len,
                seq_len=args.seq_len, micro_batch=args.micro_batch, batch_tokens=args.batch_tokens,
                val_tokens=args.val_tokens, eval_every=args.eval_every, sample_every=0, save_every=0,
                device="cpu", dtype="bf16", peak_tflops="none", seed=1337)  # fmt: skip


def steps_for(args: argparse.Namespace, fraction: float) -> int:
    return max(1, round(fraction * args.budget_tokens / args.batch_tokens))


def run(args: argparse.Namespace, data: Path, name: str, fraction: float, **flags: Any) -> dict[str, Any]:
    """One training run (or its stored result): final val loss, the val curve and tokens/s."""
    results = load_results(args.work)
    if name in results:
        return results[name]
    out = args.work / "runs" / name.replace(" ", "_")
    max_steps = steps_for(args, fraction)
    if flags.get("recipe") == "gpt2":  # the GPT-2 schedule's shape at this length: 715/19073 of it warming up
        flags = {"warmup_steps": max(1, round(max_steps * 715 / 19073)), **flags}
    cfg = train_config(data=str(data), out=str(out), max_steps=max_steps, resume="never",
                      **{**model_flags(args), **flags})  # fmt: skip
    if out.exists():  # a run cut short by an interrupted bench starts again
        for path in out.iterdir():
            path.unlink()
    t0 = time.perf_counter()
    train(cfg)
    records = JsonlLog(out / "log.jsonl").read()
    val = [(r["step"] * args.batch_tokens, r["loss"]) for r in records if r["kind"] == "val"]
    rates = [r["tok_per_s"] for r in records if r["kind"] == "train" and r["step"] > 0]
    result = {"name": name, "fraction": fraction, "flags": flags, "steps": max_steps, "final_val": val[-1][1],
              "curve": val, "tok_per_s": statistics.median(rates), "seconds": time.perf_counter() - t0}  # fmt: skip
    results[name] = result
    atomic_write_text(args.work / "results.json", json.dumps(results, indent=1) + "\n")
    print(f"{name:<40} {fraction:4.0%} budget  final val {result['final_val']:.4f}  "
          f"{result['tok_per_s']:7.0f} tok/s  {result['seconds']:5.0f} s", flush=True)  # fmt: skip
    return result


def load_results(work: Path) -> dict[str, Any]:
    path = work / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def crossing(points: list[tuple[float, float]], target: float) -> tuple[float | None, str]:
    """The budget fraction where the loss (linear between measured budgets) first reaches ``target``."""
    points = sorted(points)
    if points[0][1] <= target:
        return points[0][0], f"<= {points[0][0]:.2f} (already reached at the smallest budget measured)"
    for (f0, l0), (f1, l1) in zip(points, points[1:]):
        if l1 <= target:
            f = f0 + (f1 - f0) * (l0 - target) / (l0 - l1)
            return f, f"{f:.3f}"
    return None, f"> {points[-1][0]:.2f} (never reached)"


def prepare_data(args: argparse.Namespace) -> Path:
    data = args.work / "shards"
    prepare(PrepareConfig(out=data, input=[str(args.input)], shard_tokens=1 << 22, val_shard_tokens=1 << 18))
    return data


def plot(args: argparse.Namespace, curves: dict[str, list[tuple[int, float]]], target: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for label, curve in curves.items():
        ax.plot([t / 1e6 for t, _ in curve], [v for _, v in curve], "o-" if "gpt2" in label else ".-", ms=3,
                label=label)  # fmt: skip
    ax.axhline(target, color="gray", ls="--", lw=0.8, label=f"gpt2 recipe's final val loss {target:.3f}")
    ax.set(xlabel="training tokens (M)", ylabel="val loss", title="gpt2 vs modern recipe, same data and model size")
    ax.set_ylim(top=min(8.0, max(v for c in curves.values() for _, v in c)))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path = args.work / "recipes.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def timing(args: argparse.Namespace, data: Path) -> None:
    """Seconds per token of each recipe, eager and compiled: short runs, the median step after the first two."""
    print(f"{'recipe':<8} {'mode':<9} {'us/token':>9}")
    for compile in (False, True):
        for recipe in ("gpt2", "modern"):
            out = args.work / "timing" / f"{recipe}_{compile}"
            cfg = train_config(data=str(data), out=str(out), recipe=recipe, max_steps=8, warmup_steps=1, resume="never",
                              compile=compile, **{**model_flags(args), "eval_every": 0})  # fmt: skip
            if out.exists():
                for path in out.iterdir():
                    path.unlink()
            train(cfg)
            rates = [r["tok_per_s"] for r in JsonlLog(out / "log.jsonl").read() if r["step"] >= 2]
            mode = "compiled" if compile else "eager"
            print(f"{recipe:<8} {mode:<9} {1e6 / statistics.median(rates):>9.1f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, default=Path("../shared/data/corpus/openstax_textbooks_75pct.jsonl"))
    p.add_argument("--work", type=Path, default=Path("runs/bench_recipe"), help="shards, runs and results.json")
    p.add_argument("--budget-tokens", type=int, default=786_432, help="the gpt2 recipe's training tokens")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256, help="width (heads of 64)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--val-tokens", type=int, default=32768)
    p.add_argument("--eval-every", type=int, default=12)
    p.add_argument("--gpt2-lrs", default="6e-4,1.8e-3,3.6e-3", help="the gpt2 recipe's sweep of --lr")
    p.add_argument("--modern-scales", default="0.5,1,2", help="the modern recipe's sweep: x all its rates")
    p.add_argument(
        "--budgets", default="0.1,0.15,0.2,0.3,0.4,0.6,0.8", help="fractions of the budget for the modern recipe"
    )
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--timing", action="store_true", help="only measure seconds per token (idle machine)")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data = prepare_data(args)
    if args.timing:
        timing(args, data)
        return

    gpt2 = [run(args, data, f"gpt2 lr {lr}", 1.0, recipe="gpt2", lr=float(lr), min_lr=float(lr) / 10)
            for lr in args.gpt2_lrs.split(",")]  # fmt: skip
    modern_lrs = {"lr": 0.02, "embed_lr": 0.3, "head_lr": 0.006}
    scaled = lambda s: {k: v * float(s) for k, v in modern_lrs.items()}  # noqa: E731
    modern = [run(args, data, f"modern x{s}", 1.0, recipe="modern", **scaled(s)) for s in args.modern_scales.split(",")]
    best_gpt2 = min(gpt2, key=lambda r: r["final_val"])
    best_modern = min(modern, key=lambda r: r["final_val"])
    best_flags = best_modern["flags"]
    target = best_gpt2["final_val"]
    budgets = [(1.0, best_modern["final_val"])]
    curves = {f"{best_gpt2['name']} (100%)": best_gpt2["curve"], f"{best_modern['name']} (100%)": best_modern["curve"]}
    for fraction in map(float, args.budgets.split(",")):
        result = run(args, data, f"{best_modern['name']} at {fraction:.0%}", fraction, **best_flags)
        budgets.append((fraction, result["final_val"]))
        curves[f"{best_modern['name']} ({fraction:.0%})"] = result["curve"]
    ratio, ratio_text = crossing(budgets, target)

    print(f"\nmodel: {args.n_layer} layers x {args.n_embd}, seq {args.seq_len}, {args.batch_tokens} tokens/step; "
          f"budget {args.budget_tokens:,} tokens; data {args.input.name}")  # fmt: skip
    print("sweep (final val loss at the full budget):")
    for r in gpt2 + modern:
        print(f"  {r['name']:<28} {r['final_val']:.4f}  {1e6 / r['tok_per_s']:.1f} us/token")
    print(f"best: {best_gpt2['name']} {target:.4f}; {best_modern['name']} {best_modern['final_val']:.4f}")
    print("modern at its best rates, by budget: " + ", ".join(f"{f:.0%} {v:.4f}" for f, v in sorted(budgets)))
    print(f"tokens the modern recipe needs to reach the gpt2 recipe's final val loss: {ratio_text} of the budget")
    if not args.no_ablation:
        print("ablation at 40% of the budget (final val loss; the full modern recipe there is "
              f"{dict(budgets).get(0.4, float('nan')):.4f}):")  # fmt: skip
        for name, change in ABLATIONS.items():
            result = run(args, data, f"ablation {name}", 0.4, **{**best_flags, **change})
            print(f"  {name:<28} {result['final_val']:.4f}")
    print(f"plot: {plot(args, curves, target)}")


if __name__ == "__main__":
    main()
