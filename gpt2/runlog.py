"""What a training run reports: ``<out>/log.jsonl`` records (written by ``gpt2.rundir.JsonlLog``) and a readable
console line per step.

Record kinds (one JSON object per line, written by rank 0 only):

- ``{"step", "kind": "train", "loss", "lr", "grad_norm", "tokens", "dt_ms", "tok_per_s", "mfu"}`` for
  optimizer step ``step`` (0-based); ``tokens`` counts all tokens trained on once it is done; on CUDA also
  ``peak_mem_gib``, the most GPU memory allocated so far.
- ``{"step", "kind": "val", "loss"}``, ``{"step", "kind": "hellaswag", "acc", "acc_norm", "n"}`` and
  ``{"step", "kind": "sample", "text"}``, measured on the weights after ``step`` optimizer steps (a
  ``hellaswag`` record holds what the scores file holds for task ``hellaswag_nanogpt``, see ``gpt2.rundir``).
- ``{"step", "kind": "memory", ...}`` once per start (or resume) of the run, after its first step (``step`` is
  then the number of steps taken): the memory plan of one process (``gpt2.memory.MemoryPlan.record``: settings,
  ``<part>_gib`` sizes and ``total_gib``) and ``measured_peak_gib``, the peak of the process so far, with how it
  was ``measured`` (CUDA's allocator peak, or the peak RSS on CPU).
"""

from __future__ import annotations

from typing import Any, Protocol, TextIO


class Reporter(Protocol):
    """Receives everything the trainer reports (on rank 0): log records and one-line messages."""

    def record(self, rec: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None: ...


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
