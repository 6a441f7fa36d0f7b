"""Plot a training run: ``python -m gpt2.plot RUN_DIR [-o run.png]``.

One panel for the loss, from ``<run>/log.jsonl``: the train loss smoothed (a debiased moving average) over the raw
curve drawn faint, the val loss as markers, and OpenAI GPT-2 124M's val loss for reference, on a log scale so that
the first steps' ~11 and a trained model's ~3 both show. Then one panel per scored task, from the run's scores
(``gpt2.rundir.read_scores``) and, for ``hellaswag_nanogpt``, the trainer's own ``hellaswag`` records (the scores
file wins where both scored a step): the task's headline score (acc_norm, else acc) against step, with the
published numbers of OpenAI's GPT-2 124M (and GPT-3 125M) where there are some. Every panel has step as its
x-axis, over the whole run, and tokens as a second one on top; every plotted point lies inside its axes, and a
panel is drawn only where there is data. matplotlib is an optional extra (``pip install 'gpt2[plot]'``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2.cli import option, parse
from gpt2.errors import UserError, run_cli
from gpt2.evaluate import headline
from gpt2.files import atomic_write, read_jsonl
from gpt2.hellaswag import TASK as HELLASWAG_NANOGPT
from gpt2.rundir import LOG_FILE, PLOT_FILE, SCORES_FILE, read_scores

GPT2_124M_VAL_LOSS = 3.2924  # OpenAI's GPT-2 124M checkpoint on the FineWeb-Edu val split
# Published scores per task: OpenAI GPT-2 124M on the 10,042 HellaSwag val examples, completion style as in
# build-nanogpt, and in lm-evaluation-harness (0-shot; quoted in build-nanogpt's hellaswag.py: "eleuther harness
# reports ... acc_norm 31.14%"); GPT-3 Small from the GPT-3 paper.
REFERENCES = {
    HELLASWAG_NANOGPT: {"OpenAI GPT-2 (124M)": 0.2955, "OpenAI GPT-3 (125M)": 0.337},
    "hellaswag": {"OpenAI GPT-2 (124M)": 0.3114},
}
COLUMNS = 3  # panels per row
PANEL_SIZE = (6.0, 4.2)  # inches
MIN_SPAN = 0.05  # an accuracy panel shows at least this much of the y-axis around its points


@dataclass
class RunCurves:
    """(step, value) points of a run, sorted by step."""

    train_loss: list[tuple[int, float]] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    tasks: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # task -> headline score
    metrics: dict[str, str] = field(default_factory=dict)  # task -> the headline's metric, acc_norm or acc
    tokens_per_step: float | None = None  # from the train records; None in logs without token counts

    @property
    def last_step(self) -> int:
        points = [*self.train_loss, *self.val_loss, *(p for series in self.tasks.values() for p in series)]
        return max(step for step, _ in points)


def read_run(run_dir: str | Path) -> RunCurves:
    """The curves of ``run_dir``; a trainer may still be appending to ``log.jsonl`` (a torn last line is skipped)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory")
    curves = RunCurves()
    tasks: dict[str, dict[int, float]] = {}
    log_path = run_dir / LOG_FILE
    records = read_jsonl(log_path, allow_partial_tail=True) if log_path.exists() else []
    for lineno, record in records:
        kind = record.get("kind") if isinstance(record, dict) else None
        where = f"{log_path}:{lineno}"
        if kind == "train":
            curves.train_loss.append(_point(record, record.get("loss"), where))
            if isinstance(record.get("tokens"), int):
                curves.tokens_per_step = record["tokens"] / (record["step"] + 1)
        elif kind == "val":
            curves.val_loss.append(_point(record, record.get("loss"), where))
        elif kind == "hellaswag":  # scored by the trainer during the run (--hellaswag-every)
            tasks.setdefault(HELLASWAG_NANOGPT, {}).update([_point(record, record.get("acc_norm"), where)])
            curves.metrics[HELLASWAG_NANOGPT] = "acc_norm"
    for record in read_scores(run_dir):
        value = headline(record)
        if value is not None:  # perplexity tasks have no headline score
            task = record["task"]
            tasks.setdefault(task, {}).update([_point(record, value, f"{run_dir / SCORES_FILE}")])
            curves.metrics[task] = "acc_norm" if record.get("acc_norm") is not None else "acc"
    curves.train_loss.sort()
    curves.val_loss.sort()
    curves.tasks = {task: sorted(by_step.items()) for task, by_step in tasks.items()}
    if not (curves.train_loss or curves.val_loss or curves.tasks):
        raise UserError(f"{run_dir} has no losses in {LOG_FILE} and no scores in {SCORES_FILE}: nothing to plot")
    return curves


def _point(record: dict[str, Any], value: Any, where: str) -> tuple[int, float]:
    step = record.get("step")
    if not isinstance(step, int) or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: expected an integer 'step' and a number, got {record}")
    return step, float(value)


def smooth(values: list[float], span: float) -> list[float]:
    """A debiased exponential moving average over about ``span`` points (the first value is kept as is)."""
    weight, average, out = 1 - 1 / span, 0.0, []
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def draw_run(curves: RunCurves, title: str = ""):
    """A matplotlib ``Figure``: the loss panel (when the log has losses), then a panel per scored task."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'gpt2[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    panels = (["loss"] if curves.train_loss or curves.val_loss else []) + list(curves.tasks)
    per_step = curves.tokens_per_step
    to_tokens = (lambda step: step * per_step, lambda tokens: tokens / per_step) if per_step else None
    columns = min(COLUMNS, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, grid = plt.subplots(rows, columns, squeeze=False, figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows))
    axes = list(grid.flat)
    for ax in axes[len(panels) :]:
        ax.remove()  # no empty panels
    for ax, panel in zip(axes, panels):
        if panel == "loss":
            _draw_loss(ax, curves)
        else:
            _draw_task(ax, panel, curves.metrics[panel], curves.tasks[panel])
        pad = max(curves.last_step, 1) * 0.03
        ax.set_xlim(-pad, curves.last_step + pad)  # the whole run on every panel, however few its points
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        if to_tokens:
            tokens = ax.secondary_xaxis("top", functions=to_tokens)
            tokens.xaxis.set_major_formatter(_tokens)
            tokens.set_xlabel("tokens", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _draw_loss(ax, curves: RunCurves) -> None:
    values = [GPT2_124M_VAL_LOSS]
    if curves.train_loss:
        steps, losses = zip(*curves.train_loss)
        smoothed = smooth(list(losses), span=min(100.0, max(1.0, len(losses) / 50)))
        (line,) = ax.plot(steps, smoothed, lw=1.5, label=f"train loss, smoothed (min {min(losses):.4f})")
        ax.plot(steps, losses, lw=0.6, alpha=0.3, color=line.get_color())
        values += [*losses, *smoothed]
    if curves.val_loss:
        steps, losses = zip(*curves.val_loss)
        ax.plot(steps, losses, "o-", ms=4, lw=1, label=f"val loss (min {min(losses):.4f})")
        values += losses
    ax.axhline(GPT2_124M_VAL_LOSS, color="r", ls="--", lw=1, label=f"OpenAI GPT-2 (124M) val loss {GPT2_124M_VAL_LOSS}")
    # A log scale shows the first steps' ~11 and a trained model's ~3 at once, each inside the axes.
    from matplotlib import ticker

    ax.set_yscale("log")
    ax.set_ylim(min(values) / 1.05, max(values) * 1.05)
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 1.5, 2, 3, 4, 5, 6, 8)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set(ylabel="loss", title="loss")


def _draw_task(ax, task: str, metric: str, points: list[tuple[int, float]]) -> None:
    steps, values = zip(*points)
    best = max(range(len(values)), key=values.__getitem__)
    label = f"this run (max {values[best]:.4f} at step {steps[best]})"
    ax.plot(steps, values, "o-", ms=5 if len(points) > 1 else 8, lw=1, color="g", label=label)
    refs = REFERENCES.get(task, {})
    for (name, ref), color in zip(refs.items(), ("r", "orange")):
        ax.axhline(ref, color=color, ls="--", lw=1, label=f"{name} {ref}")
    lo, hi = min([*values, *refs.values()]), max([*values, *refs.values()])
    if hi - lo < MIN_SPAN:  # a lone point (or a flat curve) in a readable window, not a sliver of the axis
        lo, hi = (lo + hi - MIN_SPAN) / 2, (lo + hi + MIN_SPAN) / 2
    margin = 0.08 * (hi - lo)
    ax.set_ylim(lo - margin, hi + margin)
    ax.set(ylabel=metric, title=task)


def _tokens(value: float, _position: int) -> str:
    """``2048`` -> ``2K``, ``1.5e9`` -> ``1.5B``."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``run_dir`` into a PNG (default ``<run>/run.png``), written atomically; returns its path."""
    out = Path(out) if out is not None else Path(run_dir) / PLOT_FILE
    fig = draw_run(read_run(run_dir), title=str(run_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


@dataclass
class PlotConfig:
    """``python -m gpt2.plot``'s arguments (``gpt2.cli``)."""

    run_dir: Path = option(help="run directory with log.jsonl and/or scores (evals.jsonl)", positional=True)
    out: Path | None = option(None, "PNG to write (default: RUN_DIR/run.png)", short="-o")


def main(argv: list[str] | None = None) -> None:
    cfg = parse(PlotConfig, argv, prog="python -m gpt2.plot", description=__doc__)
    print(f"wrote {plot_run(cfg.run_dir, cfg.out)}")


if __name__ == "__main__":
    run_cli(main)
