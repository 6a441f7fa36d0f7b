"""A run directory's layout: the name, reader and writer of every file a run keeps in ``<run>/``.

The trainer, the evaluators, the plot and tracking ask this module where things are and how they read:

- ``ckpt_<step:06d>.pt``: the checkpoint after ``step`` optimizer steps (its contents: ``gpt2.checkpoint``);
- ``log.jsonl``: the trainer's records, appended by rank 0 (their kinds: ``gpt2.runlog``);
- ``evals.jsonl``: the scores file, one ``{"step", "task", "acc", "acc_norm", "n"}`` record per checkpoint and
  task, from every evaluation (``python -m gpt2.evaluate``, ``eval_hellaswag.py``); ``acc_norm`` is null where a
  task has none, and a perplexity task has its own metrics in place of the three;
- ``hellaswag.jsonl``: the scores file of ``eval_hellaswag.py`` before this release, ``{"step", "acc", "acc_norm",
  "n"}`` per checkpoint, read as records of the task it scored (``LEGACY_TASK``) and copied into ``evals.jsonl``
  the next time that is written; never written;
- ``tracking.json``: which trackers the run uses (``gpt2.tracking``);
- ``run.png``: the plot (``python -m gpt2.plot``).

Every file but the append-only log is replaced atomically, so a reader sees the old file or the whole new one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from gpt2.errors import UserError
from gpt2.files import atomic_write_text, jsonl_text, read_jsonl

CKPT_PATTERN = re.compile(r"^ckpt_(\d{6,})\.(?:pt|dcp)$")
SHARDED_SUFFIX = ".dcp"  # a sharded checkpoint's directory (--parallel fsdp; gpt2.sharded_checkpoint)
LOG_FILE = "log.jsonl"
SCORES_FILE = "evals.jsonl"
LEGACY_SCORES_FILE = "hellaswag.jsonl"
LEGACY_TASK = "hellaswag_nanogpt"  # what the legacy file scored: gpt2.hellaswag.TASK
TRACKING_FILE = "tracking.json"  # {"tensorboard": {"dir"}, "wandb": {"project", "id"}} of the trackers a run used
PLOT_FILE = "run.png"


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint after ``step`` optimizer steps lives."""
    return Path(run_dir) / f"ckpt_{step:06d}.pt"


def sharded_checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """Where the sharded checkpoint (a directory) after ``step`` optimizer steps lives."""
    return Path(run_dir) / f"ckpt_{step:06d}{SHARDED_SUFFIX}"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A directory written by ``torch.distributed.checkpoint`` (it has the index, ``.metadata``)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def find_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint in ``run_dir`` (files, and sharded checkpoints' directories), oldest
    first (temp files excluded)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CKPT_PATTERN.match(p.name))]
    return sorted(found)


# ----------------------------------------------------------------------------------------------------------------------
# The training log


class JsonlLog:
    """Append-only ``log.jsonl``: each record is one ``write`` of one line, flushed at once."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)

    def read(self) -> list[dict[str, Any]]:
        """The records so far; a last line cut short by a crash is left out (a bad line elsewhere is an error)."""
        if not self.path.exists():
            return []
        return [record for _, record in read_jsonl(self.path, allow_partial_tail=True)]

    def truncate_to(self, step: int) -> int:
        """Keep only the history of the state after ``step`` optimizer steps: train records of earlier steps,
        and evaluation records up to ``step`` (those of ``step`` itself precede its checkpoint). Returns how
        many records were dropped; the file is replaced atomically."""
        records = self.read()
        kept = [r for r in records if r["step"] < step or (r["step"] == step and r["kind"] != "train" and step > 0)]
        torn = self.path.exists() and not self.path.read_bytes().endswith(b"\n") and self.path.stat().st_size > 0
        if len(kept) < len(records) or torn:  # rewrite, or the next record would be glued to the torn line
            atomic_write_text(self.path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
        return len(records) - len(kept)


# ----------------------------------------------------------------------------------------------------------------------
# Scores


def read_scores(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's score records, each with its ``task``: the legacy file's first (as ``LEGACY_TASK``), then
    ``evals.jsonl``'s; where both hold a checkpoint and task, the ``evals.jsonl`` record wins. A record that is
    not ``{"step": int, "task": str, ...}`` is a ``UserError`` naming its file and line."""
    run_dir = Path(run_dir)
    by_key: dict[tuple[int, str], dict[str, Any]] = {}
    for name, task in ((LEGACY_SCORES_FILE, LEGACY_TASK), (SCORES_FILE, None)):
        path = run_dir / name
        if not path.exists():
            continue
        for lineno, record in read_jsonl(path):
            if task is not None and isinstance(record, dict):
                record = {"step": record.get("step"), "task": task, **record}
            if not (isinstance(record, dict) and isinstance(record.get("step"), int) and record.get("task")):
                raise UserError(f"{path}:{lineno}: expected a score record with an integer 'step' and a 'task'")
            by_key[record["step"], record["task"]] = record
    return list(by_key.values())


def add_scores(run_dir: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Add ``{"step", "task", ...}`` records to ``evals.jsonl`` (replaced atomically, legacy records included)."""
    atomic_write_text(Path(run_dir) / SCORES_FILE, jsonl_text([*read_scores(run_dir), *records]))


# ----------------------------------------------------------------------------------------------------------------------
# Trackers


def read_tracking(run_dir: str | Path, warn: Callable[[str], None]) -> dict[str, Any]:
    """``<run>/tracking.json`` (empty when absent; unreadable: reported through ``warn`` and treated as absent)."""
    path = Path(run_dir) / TRACKING_FILE
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        return state
    except (OSError, ValueError) as e:
        warn(f"ignoring unreadable {path} ({e})")
        return {}


def write_tracking(run_dir: str | Path, state: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / TRACKING_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")
