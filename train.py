"""Pretrain GPT-2 on token shards: ``python train.py`` (one process) or ``torchrun --nproc_per_node=N train.py``.

The defaults reproduce GPT-2 124M on FineWeb-Edu 10B (GPT-3 paper recipe, 19073 steps of 524288 tokens).
Relaunching the same command resumes from the newest checkpoint in --out; SIGTERM or Ctrl-C finishes the
current step, writes a checkpoint and exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT).
Multi-node: ``torchrun --nnodes 2 --node-rank K --nproc-per-node 8 --rdzv-backend c10d
--rdzv-endpoint HOST:29500 train.py ...`` on every node.
"""

from __future__ import annotations

import signal
import sys

from gpt2.cli import parse
from gpt2.config import TrainConfig, train_config
from gpt2.errors import run_cli
from gpt2.runlog import ConsoleReporter
from gpt2.trainer import StopRequest, train


def main() -> None:
    cfg = parse(TrainConfig, prog="train.py", description=__doc__, factory=train_config)
    stop = StopRequest()
    with stop.catch_signals():
        result = train(cfg, ConsoleReporter(cfg.max_steps, sys.stdout), stop)
    if result.stopped_by in signal.Signals.__members__:
        sys.exit(128 + signal.Signals[result.stopped_by].value)


if __name__ == "__main__":
    run_cli(main)
