"""Score a model on HellaSwag as build-nanogpt does: ``python eval_hellaswag.py TARGET``.

The evaluation runner (``python -m gpt2.evaluate``) with the one task ``hellaswag_nanogpt``. TARGET is a
checkpoint file, a run directory (every checkpoint not yet scored, into the run's scores file <run>/evals.jsonl),
a Hugging Face model directory or a hub id (gpt2 ... gpt2-xl). Under ``torchrun --nproc_per_node=N`` the
examples are shared out across ranks; the result is the same as in one process.
"""

from __future__ import annotations

import sys

from gpt2.cli import parse
from gpt2.errors import run_cli
from gpt2.evaluate import HellaSwagConfig, run


def main(argv: list[str] | None = None) -> None:
    cfg = parse(HellaSwagConfig, argv, prog="eval_hellaswag.py", description=__doc__)
    cfg.progress = sys.stderr.isatty()
    run(cfg)


if __name__ == "__main__":
    run_cli(main)
