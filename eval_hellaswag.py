"""Score a model on HellaSwag: ``python eval_hellaswag.py TARGET``.

TARGET is a checkpoint file, a run directory (every checkpoint not yet scored, into <run>/hellaswag.jsonl),
a Hugging Face model directory or a hub id (gpt2 ... gpt2-xl). Under ``torchrun --nproc_per_node=N`` the
examples are shared out across ranks; the result is the same as in one process.
"""

from __future__ import annotations

import sys

from gpt2.cli import parse
from gpt2.errors import run_cli
from gpt2.hellaswag import EvalConfig, run


def main(argv: list[str] | None = None) -> None:
    cfg = parse(EvalConfig, argv, prog="eval_hellaswag.py", description=__doc__)
    cfg.progress = sys.stderr.isatty()
    run(cfg)


if __name__ == "__main__":
    run_cli(main)
