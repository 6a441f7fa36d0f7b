"""What a training run reports: ``<out>/log.jsonl`` records and a readable console line per step.

Record kinds (one JSON object per line, written by rank 0 only):

- ``{"step", "kind": "train", "loss", "lr", "grad_norm", "tokens", "dt_ms", "tok_per_s", "mfu"}`` for
  optimizer step ``step`` (0-based); ``tokens`` counts all tokens trained on once it is done; on CUDA also
  ``peak_mem_gib``, the most GPU memory allocated so far.
- ``{"step", "kind": "val", "loss"}``, ``{"step", "kind": "hellaswag", "acc", "acc_norm", "n"}`` and
  ``{"step", "kind": "sample", "text"}``, measured on the weights after ``step`` optimizer steps.
- ``{"step", "kind": "memory", ...}`` once per start (or resume) of the run, after its first step (``step`` is
  then the number of steps taken): the memory plan of one process (``gpt2.memory.MemoryPlan.record``: settings,
  ``<part>_gib`` sizes and ``total_gib``) and ``measured_peak_gib``, the peak of the process so far, with how it
  was ``measured`` (CUDA's allocator peak, or the peak RSS on CPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, TextIO

from gpt2.files import atomic_write_text, read_jsonl

LOG_FILE = "log.jsonl"  # a run directory's log, one JSON record per line


class Reporter(Protocol):
    """Receives everything the trainer reports (on rank 0): log records and one-line messages."""

    def record(self, rec: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None: ...


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


class ConsoleReporter:
    """One readable line per step (with an ETA from the recent step times), evaluations and messages."""

    def __init__(self, max_steps: int, stream: TextIO, smoothing: float = 0.9) -> None:
        self.max_steps = max_steps
        self.stream = stream
        self.smoothing = smoothing
        self._dt_ms: float | None = None  # smoothed step time
        self._seen = 0

    def record(self, rec: dict[str, Any]) -> None:
        kind, step = rec["kind"], rec["step"]
        if kind == "train":
            line = self._train_line(rec)
        elif kind == "val":
            line = f"step {step:>6} | val loss {rec['loss']:.4f}"
        elif kind == "hellaswag":
            line = f"step {step:>6} | hellaswag acc_norm {rec['acc_norm']:.4f} (acc {rec['acc']:.4f}, n={rec['n']})"
        elif kind == "memory":
            line = (
                f"step {step:>6} | memory per process: planned {rec['total_gib']:.2f} GiB, measured peak "
                f"{rec['measured_peak_gib']:.2f} GiB ({rec['measured']})"
            )
        else:
            line = "\n".join(f"step {step:>6} | sample: {text!r}" for text in rec["text"])
        self._print(line)

    def message(self, text: str) -> None:
        self._print(text)

    def _train_line(self, rec: dict[str, Any]) -> str:
        # The first step of a process pays for compilation and warm-up: the ETA starts afresh from the second.
        dt = rec["dt_ms"]
        self._seen += 1
        if self._dt_ms is None or self._seen == 2:
            self._dt_ms = dt
        else:
            self._dt_ms = self.smoothing * self._dt_ms + (1 - self.smoothing) * dt
        eta_s = (self.max_steps - rec["step"] - 1) * self._dt_ms / 1000
        mfu = f"{100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else "n/a"
        memory = f" | mem {rec['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in rec else ""
        return (
            f"step {rec['step']:>6}/{self.max_steps} | loss {rec['loss']:.6f} | lr {rec['lr']:.3e} | "
            f"norm {rec['grad_norm']:.4f} | {dt:.0f} ms | {rec['tok_per_s']:,.0f} tok/s | mfu {mfu}{memory} | "
            f"eta {format_duration(eta_s)}"
        )

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def format_duration(seconds: float) -> str:
    """``3725`` -> ``1h02m``, ``75`` -> ``1m15s``, ``9`` -> ``9s``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
