"""Score a model on HellaSwag: ``python eval_hellaswag.py TARGET``.

TARGET is a checkpoint file, a run directory (every checkpoint not yet scored, into <run>/hellaswag.jsonl),
a Hugging Face model directory or a hub id (gpt2 ... gpt2-xl). Under ``torchrun --nproc_per_node=N`` the
examples are shared out across ranks; the result is the same as in one process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt2.distributed import DEVICES, DTYPES
from gpt2.errors import run_cli
from gpt2.hellaswag import EvalConfig, run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="eval_hellaswag.py", description=__doc__)
    p.add_argument("target", help="checkpoint file, run directory, Hugging Face model directory or hub id")
    p.add_argument("--data", type=Path, metavar="FILE.jsonl", help="local HellaSwag JSONL (default: the val set, "
                   "downloaded once into data/hellaswag/)")  # fmt: skip
    p.add_argument("--limit", type=int, metavar="N", help="score only the first N examples")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="examples per forward pass (default 32)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="autocast dtype (default bf16)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="default auto: cuda when present, else cpu")
    p.add_argument("--compile", action="store_true", help="run the scorer through torch.compile (dynamic shapes)")
    p.add_argument("--out", type=Path, metavar="FILE.json", help="write {target, step, n, acc, acc_norm, seconds}")
    p.add_argument("--predictions", type=Path, metavar="FILE.jsonl", help="one JSON line per example: its losses "
                   "and predictions")  # fmt: skip
    p.add_argument("--watch", action="store_true", help="run directory: keep scoring new checkpoints until interrupted")
    p.add_argument("--interval", type=float, default=60.0, metavar="SECONDS", help="between polls with --watch "
                   "(default 60)")  # fmt: skip
    args = p.parse_args(argv)
    cfg = EvalConfig(**vars(args), progress=sys.stderr.isatty())
    run(cfg)


if __name__ == "__main__":
    run_cli(main)
