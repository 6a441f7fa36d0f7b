"""Plot a training run: ``python -m gpt2.plot RUN_DIR [-o run.png]``.

Two panels, like the closing figure of the reference reproduction (build-nanogpt): train and val loss
against step from ``<run>/log.jsonl``, and HellaSwag acc_norm against step from the trainer's own
``hellaswag`` records in ``log.jsonl`` and from ``<run>/hellaswag.jsonl`` (written by
``eval_hellaswag.py RUN_DIR``; it wins where both scored a step), each with the OpenAI GPT-2 124M
(and GPT-3 125M) reference lines. When ``<run>/evals.jsonl`` exists (``python -m gpt2.evaluate RUN_DIR``),
one more panel per downstream task shows its acc_norm (acc where the harness reports no acc_norm) against
step, with GPT-2 124M's harness score where one is published. matplotlib is an optional extra
(``pip install 'gpt2[plot]'``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2.cli import option, parse
from gpt2.errors import UserError, run_cli
from gpt2.evaluate import EVALS_FILE, headline, read_evals
from gpt2.files import atomic_write, read_jsonl
from gpt2.hellaswag import SCORES_FILE, read_scores
from gpt2.runlog import LOG_FILE

GPT2_124M_VAL_LOSS = 3.2924  # OpenAI's GPT-2 124M checkpoint on the FineWeb-Edu val split
GPT2_124M_HELLASWAG = 0.2955  # acc_norm, completion style, 10,042 val examples
GPT3_125M_HELLASWAG = 0.337  # from the GPT-3 paper
# OpenAI GPT-2 124M in lm-evaluation-harness (0-shot), where a score is published: HellaSwag acc_norm on the
# 10,042 val examples, as quoted in build-nanogpt's hellaswag.py ("eleuther harness reports ... acc_norm 31.14%").
GPT2_124M_HARNESS = {"hellaswag": 0.3114}
TASK_COLUMNS = 4  # downstream-task panels per row


@dataclass
class RunCurves:
    """(step, value) points of a run, in the order they were logged."""

    train_loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    hellaswag: list[tuple[int, float]] = field(default_factory=list)  # acc_norm
    tasks: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # evals.jsonl: task -> headline


def read_run(run_dir: str | Path) -> RunCurves:
    """The curves of ``run_dir``; a trainer may still be appending to ``log.jsonl`` (a torn last line is skipped)."""
    run_dir = Path(run_dir)
    log_path = run_dir / LOG_FILE
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory")
    if not any((run_dir / name).exists() for name in (LOG_FILE, SCORES_FILE, EVALS_FILE)):
        raise UserError(f"{run_dir} has none of {LOG_FILE}, {SCORES_FILE}, {EVALS_FILE}: nothing to plot")
    curves = RunCurves()
    hellaswag: dict[int, float] = {}
    if log_path.exists():
        for lineno, record in read_jsonl(log_path, allow_partial_tail=True):
            kind = record.get("kind") if isinstance(record, dict) else None
            if kind in ("train", "val"):
                point = _point(record, "loss", f"{log_path}:{lineno}")
                (curves.train_loss if kind == "train" else curves.val_loss).append(point)
            elif kind == "hellaswag":  # scored by the trainer during the run (--hellaswag-every)
                hellaswag.update([_point(record, "acc_norm", f"{log_path}:{lineno}")])
    for i, record in enumerate(read_scores(run_dir), start=1):
        hellaswag.update([_point(record, "acc_norm", f"{run_dir / SCORES_FILE}:{i}")])
    curves.hellaswag = sorted(hellaswag.items())
    curves.tasks = read_task_curves(run_dir)
    return curves


def read_task_curves(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Each downstream task's headline score (``gpt2.evaluate.headline``) against step, from ``evals.jsonl``
    (a later record of the same step and task wins); perplexity tasks have none and are left out."""
    points: dict[str, dict[int, float]] = {}
    for i, record in enumerate(read_evals(run_dir), start=1):
        value = headline(record) if isinstance(record, dict) else None
        if value is not None:
            step, value = _point({**record, "value": value}, "value", f"{Path(run_dir) / EVALS_FILE}:{i}")
            points.setdefault(str(record.get("task")), {})[step] = value
    return {task: sorted(by_step.items()) for task, by_step in points.items()}


def _point(record: Any, key: str, where: str) -> tuple[int, float]:
    step, value = record.get("step"), record.get(key)
    if not isinstance(step, int) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: expected an integer 'step' and a number {key!r}, got {record}")
    return step, float(value)


def draw_run(curves: RunCurves, title: str = ""):
    """A matplotlib ``Figure`` with the loss panel and the HellaSwag panel."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'gpt2[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    task_rows = math.ceil(len(curves.tasks) / TASK_COLUMNS)
    fig = plt.figure(figsize=(14, 5 + 3.5 * task_rows))
    grid = fig.add_gridspec(1 + task_rows, TASK_COLUMNS, height_ratios=[5] + [3.5] * task_rows)
    ax_loss, ax_hs = fig.add_subplot(grid[0, :2]), fig.add_subplot(grid[0, 2:])
    if curves.train_loss:
        ax_loss.plot(*zip(*curves.train_loss), lw=0.8, alpha=0.6, label=f"train loss (min {_min(curves.train_loss)})")
    if curves.val_loss:
        ax_loss.plot(*zip(*curves.val_loss), "o-", ms=3, label=f"val loss (min {_min(curves.val_loss)})")
    ax_loss.axhline(GPT2_124M_VAL_LOSS, color="r", ls="--", label=f"OpenAI GPT-2 (124M) val loss {GPT2_124M_VAL_LOSS}")
    losses = [v for _, v in curves.train_loss + curves.val_loss]
    if losses:  # the first steps' loss (~11) would squash the interesting part; show down from 4 or so
        ax_loss.set_ylim(top=min(max(losses), max(4.0, min(losses) + 1.0)) + 0.05)
    ax_loss.set(xlabel="step", ylabel="loss", title="Loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)

    if curves.hellaswag:
        best = max(v for _, v in curves.hellaswag)
        ax_hs.plot(*zip(*curves.hellaswag), "o-", ms=3, color="g", label=f"this run (max {best:.4f})")
    else:
        ax_hs.text(0.5, 0.5, f"no HellaSwag scores yet:\neval_hellaswag.py RUN_DIR writes {SCORES_FILE}",
                   ha="center", va="center", transform=ax_hs.transAxes)  # fmt: skip
    ax_hs.axhline(GPT2_124M_HELLASWAG, color="r", ls="--", label=f"OpenAI GPT-2 (124M) {GPT2_124M_HELLASWAG}")
    ax_hs.axhline(GPT3_125M_HELLASWAG, color="orange", ls="--", label=f"OpenAI GPT-3 (125M) {GPT3_125M_HELLASWAG}")
    ax_hs.set(xlabel="step", ylabel="acc_norm", title="HellaSwag eval")
    ax_hs.legend()
    ax_hs.grid(alpha=0.3)
    _draw_tasks(fig, grid, curves.tasks)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _draw_tasks(fig, grid, tasks: dict[str, list[tuple[int, float]]]) -> None:
    """One panel per downstream task below the first row, with GPT-2 124M's harness score where published."""
    for i, (task, points) in enumerate(tasks.items()):
        ax = fig.add_subplot(grid[1 + i // TASK_COLUMNS, i % TASK_COLUMNS])
        ax.plot(*zip(*points), "o-", ms=3, color="g", label=f"this run (max {max(v for _, v in points):.4f})")
        if task in GPT2_124M_HARNESS:
            ref = GPT2_124M_HARNESS[task]
            ax.axhline(ref, color="r", ls="--", label=f"OpenAI GPT-2 (124M) {ref}")
        ax.set(xlabel="step", title=task)
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)


def _min(points: list[tuple[int, float]]) -> str:
    return f"{min(v for _, v in points):.4f}"


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``run_dir`` into a PNG (default ``<run>/run.png``), written atomically; returns its path."""
    out = Path(out) if out is not None else Path(run_dir) / "run.png"
    fig = draw_run(read_run(run_dir), title=str(run_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


@dataclass
class PlotConfig:
    """``python -m gpt2.plot``'s arguments (``gpt2.cli``)."""

    run_dir: Path = option(help="run directory with log.jsonl and/or hellaswag.jsonl", positional=True)
    out: Path | None = option(None, "PNG to write (default: RUN_DIR/run.png)", short="-o")


def main(argv: list[str] | None = None) -> None:
    cfg = parse(PlotConfig, argv, prog="python -m gpt2.plot", description=__doc__)
    print(f"wrote {plot_run(cfg.run_dir, cfg.out)}")


if __name__ == "__main__":
    run_cli(main)
