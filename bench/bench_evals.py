"""Downstream-suite throughput: ``gpt2.lm_eval.PipelineLM`` vs. the harness's own ``hf`` backend, side by side.

Both answer the same harness run: the 11 tasks of ``--tasks small``, the first ``--limit`` examples of each,
read offline from the shared data, scored 0-shot by ``lm_eval.simple_evaluate``. Same random weights (GPT-2
124M-shaped by default): ours from a checkpoint, the ``hf`` backend from its ``gpt2.export`` copy; fp32 for
both, so that choices can be compared exactly; interleaved repeat by repeat in one process. Prints the seconds
of each repeat, the medians and their ratio, the largest log-likelihood difference and whether every
per-example choice (the acc and the acc_norm argmax) is identical.

    .venv/bin/python bench/bench_evals.py                           # 124M-shaped, 20 examples per task
    .venv/bin/python bench/bench_evals.py --model small --limit 100
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval  # noqa: E402
import torch  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from gpt2.config import GPTConfig  # noqa: E402
from gpt2.errors import run_cli  # noqa: E402
from gpt2.evaluate import SUITE  # noqa: E402
from gpt2.hf import export_hf  # noqa: E402
from gpt2.lm_eval import PipelineLM, harness_choices, load_tasks, task_manager  # noqa: E402
from gpt2.model import GPT  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MODELS = {
    "small": dict(n_layer=4, n_head=4, n_embd=128),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
}


def link_shared_data(data_dir: Path) -> Path:
    """``data_dir/<task>_validation.jsonl`` links to the shared files, named as ``--data-dir`` reads them."""
    for task in SUITE:
        if task == "hellaswag":
            source = SHARED / "hellaswag" / "hellaswag_val_first1000.jsonl"
        else:
            source = SHARED / "evals" / f"{task}_validation_first_half.jsonl"
        (data_dir / f"{task}_validation.jsonl").symlink_to(source)
    return data_dir


def timed_run(lm, tasks: dict, limit: int) -> tuple[float, dict]:
    """Seconds for one harness run of ``tasks`` with ``lm``, and its output (per-example samples included)."""
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks.values()), limit=limit, bootstrap_iters=0, log_samples=True,
        task_manager=task_manager(),
    )  # fmt: skip
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench/bench_evals.py", description=__doc__)
    p.add_argument("--limit", type=int, default=20, help="examples per task")
    p.add_argument("--model", choices=list(MODELS), default="gpt2", help="random weights of this size")
    p.add_argument("--batch-size", type=int, default=32, help="our packed rows per forward pass")
    p.add_argument(
        "--hf-batch-size",
        type=int,
        default=8,
        help="the hf backend's requests per forward pass (8 was its fastest of 1, 8, 16, 32 here)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="intra-op threads for both")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODELS[args.model])).eval()
    with tempfile.TemporaryDirectory() as tmp:
        tasks = load_tasks(list(SUITE), link_shared_data(Path(tmp)))
        export_hf(model, Path(tmp) / "hf")
        models = {
            "hf backend": HFLM(pretrained=str(Path(tmp) / "hf"), device="cpu", batch_size=args.hf_batch_size,
                               dtype="float32"),
            "ours": PipelineLM(model, batch_size=args.batch_size, device="cpu", dtype="fp32"),
        }  # fmt: skip
        n = sum(min(args.limit, len(task.eval_docs)) for task in tasks.values())
        print(f"{len(tasks)} tasks x {args.limit} examples = {n}, {args.model} model "
              f"({model.num_params() / 1e6:.1f}M params), fp32, {args.threads} threads, batch sizes: "
              f"ours {args.batch_size} rows, hf backend {args.hf_batch_size} requests")  # fmt: skip
        seconds: dict[str, list[float]] = {name: [] for name in models}
        for repeat in range(args.repeats):
            outputs = {}
            for name, lm in models.items():
                elapsed, outputs[name] = timed_run(lm, tasks, args.limit)
                seconds[name].append(elapsed)
            print(f"repeat {repeat}: " + ", ".join(f"{name} {s[-1]:.1f} s" for name, s in seconds.items()))

    ref, ours = outputs["hf backend"], outputs["ours"]
    pairs = [(mine, theirs) for task in SUITE for mine, theirs in zip(ours["samples"][task], ref["samples"][task])]
    same = sum(harness_choices(mine) == harness_choices(theirs) for mine, theirs in pairs)
    max_diff = max(
        abs(a[0] - b[0]) for mine, theirs in pairs for a, b in zip(mine["filtered_resps"], theirs["filtered_resps"])
    )
    same_metrics = all(ours["results"][task] == ref["results"][task] for task in SUITE)
    ref_s, ours_s = statistics.median(seconds["hf backend"]), statistics.median(seconds["ours"])
    print(f"hf backend (one request per context and choice, full logits): {ref_s:.1f} s, {n / ref_s:.2f} ex/s (median)")
    print(
        f"ours (shared contexts, scored logits only):                  {ours_s:.1f} s, {n / ours_s:.2f} ex/s (median)"
    )
    paired = statistics.median(r / o for r, o in zip(seconds["hf backend"], seconds["ours"]))
    print(f"speedup: {ref_s / ours_s:.2f}x of the medians, {paired:.2f}x median of paired repeats (target >= 3x)")
    print(f"identical choices (acc and acc_norm): {same}/{len(pairs)}; identical per-task acc/acc_norm: "
          f"{same_metrics}; max |log-likelihood difference| {max_diff:.2e}")  # fmt: skip
    for task in SUITE:
        r = ours["results"][task]
        print(f"  {task:<16} acc {r['acc,none']:.4f}  acc_norm {r.get('acc_norm,none', float('nan')):.4f}")


if __name__ == "__main__":
    run_cli(main)
