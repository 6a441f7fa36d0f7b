"""One evaluation runner for every task: ``python -m gpt2.evaluate TARGET --tasks LIST``; ``eval_hellaswag.py``
is this runner with the task ``hellaswag_nanogpt``.

**Tasks.** ``hellaswag_nanogpt`` is HellaSwag as build-nanogpt scores it (``gpt2.hellaswag``; GPT-2 124M: acc_norm
0.2955). Every other name is an lm-evaluation-harness task, scored through the harness itself (``gpt2.lm_eval``,
the ``[eval]`` extra): its prompts, data and metrics, 0-shot (``acc``, and the character-length-normalised
``acc_norm`` where the task reports it), such as its own ``hellaswag`` (GPT-2 124M: 0.3114). ``small`` is the
harness suite ``SUITE``. All tasks run on one scorer (``gpt2.scoring``), kept for a whole run: with ``--compile`` its
trunk is compiled once.

**Targets.** A checkpoint, a Hugging Face directory or a hub id is scored once: the table is printed, ``--out``
writes it as JSON, ``--predictions`` writes ``hellaswag_nanogpt``'s per-example losses. A run directory is scored
checkpoint by checkpoint on each task its scores file (``<run>/evals.jsonl``, see ``gpt2.rundir``) lacks for it,
one record per checkpoint and task; ``--watch`` keeps polling for new checkpoints until Ctrl-C. Under ``torchrun``
the examples are split across ranks; the results equal one process's.

The summary's **centered mean** is nanochat's CORE-style aggregate: per task ``(a - chance) / (1 - chance)``,
averaged, where ``a`` is ``acc_norm`` where the task reports it (length-normalised, as CORE scores multiple
choice) and ``acc`` elsewhere, and ``chance`` is the expected accuracy of guessing uniformly (the mean of
1 / number of choices over the scored examples). A random model scores about 0.

**Offline** (``--data-dir DIR``): each harness task reads ``DIR/<task>_validation.jsonl``, the hub dataset's
validation split as JSON lines with the dataset's own field names; only the task's data source changes, never
its prompts. ``hellaswag_nanogpt`` reads the harness's HellaSwag file there, ``DIR/hellaswag_validation.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from gpt2.checkpoint import load_checkpoint, load_model, model_from_checkpoint
from gpt2.cli import option, parse
from gpt2.distributed import (
    DEVICES,
    DTYPES,
    DistContext,
    all_reduce_sum,
    barrier,
    destroy_distributed,
    init_distributed,
    on_main,
)
from gpt2.errors import UserError, run_cli
from gpt2.files import atomic_write_text, jsonl_text
from gpt2.hellaswag import N_ENDINGS, TASK, Example, Prediction, evaluate_with, load_eval_examples
from gpt2.hf import is_hub_id
from gpt2.model import GPT
from gpt2.rundir import SCORES_FILE, add_scores, find_checkpoints, read_scores
from gpt2.scoring import ContinuationScorer
from gpt2.tracking import Trackers, open_run_trackers

if TYPE_CHECKING:
    from lm_eval.api.task import Task

SUITE = (
    "hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "openbookqa", "sciq", "boolq", "copa",
    "commonsense_qa", "social_iqa",
)  # fmt: skip
GROUPS = {"small": SUITE}
INSTALL_HINT = "pip install -e '.[eval]' (or pip install 'lm-eval>=0.4.13,<0.5')"

log = logging.getLogger(__name__)
T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------------------------
# Results


def headline(scores: dict[str, Any]) -> float | None:
    """A task's one number: ``acc_norm`` where the task reports it, else ``acc`` (None for perplexity tasks)."""
    return scores["acc_norm"] if scores.get("acc_norm") is not None else scores.get("acc")


@dataclass
class EvalResult:
    """One model's metrics per task (``acc``, ``acc_norm`` (None where not reported) and ``n`` for multiple
    choice; the task's own metrics for perplexity tasks), each multiple-choice task's chance, and, when asked for,
    ``hellaswag_nanogpt``'s per-example predictions (in example order)."""

    tasks: dict[str, dict[str, Any]]
    chance: dict[str, float]
    seconds: float
    predictions: list[Prediction] | None = field(default=None, repr=False)

    def centered(self, task: str) -> float | None:
        """``(a - chance) / (1 - chance)`` with ``a`` the task's acc_norm, else its acc (module docstring)."""
        if task not in self.chance:
            return None
        return (headline(self.tasks[task]) - self.chance[task]) / (1 - self.chance[task])

    @property
    def centered_mean(self) -> float | None:
        values = [c for task in self.tasks if (c := self.centered(task)) is not None]
        return statistics.fmean(values) if values else None

    def table(self) -> str:
        width = max([16, *(len(task) + 2 for task in self.tasks)])
        lines = [f"{'task':<{width}}{'acc':>8}{'acc_norm':>10}{'n':>7}{'chance':>8}{'centered':>10}"]
        for task, scores in self.tasks.items():
            if task not in self.chance:  # a perplexity task: its own metrics
                metrics = ", ".join(f"{k}={v:.4f}" for k, v in scores.items() if k != "n")
                lines.append(f"{task:<{width}}{metrics}  n={scores['n']}")
                continue
            acc_norm = "-" if scores["acc_norm"] is None else f"{scores['acc_norm']:.4f}"
            lines.append(
                f"{task:<{width}}{scores['acc']:>8.4f}{acc_norm:>10}{scores['n']:>7}"
                f"{self.chance[task]:>8.4f}{self.centered(task):>10.4f}"
            )
        if (mean := self.centered_mean) is not None:
            lines.append(f"centered mean (acc_norm where reported, else acc): {mean:.4f}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Tasks


def task_names(spec: str) -> list[str]:
    """The task names of a comma-separated ``--tasks`` value, groups expanded, duplicates dropped."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise UserError(f"--tasks is empty; give {TASK}, harness task names or 'small'")
    return list(dict.fromkeys(task for name in names for task in GROUPS.get(name, (name,))))


def require_harness() -> None:
    """A ``UserError`` naming the pip command when lm-evaluation-harness is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"downstream evaluation needs lm-evaluation-harness: {INSTALL_HINT}") from None


class Evaluator:
    """The tasks of one evaluation and the scorer they share, on this rank: scores models one after another."""

    def __init__(self, cfg: EvaluateConfig, ctx: DistContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        wanted = task_names(cfg.tasks)
        self.examples: list[Example] | None = None  # hellaswag_nanogpt's, when asked for
        if TASK in wanted:
            data = cfg.hellaswag_data or (cfg.data_dir / "hellaswag_validation.jsonl" if cfg.data_dir else None)
            self.examples = load_eval_examples(data, cfg.limit, ctx)
        self.harness: dict[str, Task] = {}
        if others := [name for name in wanted if name != TASK]:
            require_harness()
            from gpt2.lm_eval import load_tasks

            self.harness = load_tasks(others, cfg.data_dir)
        scored = ([TASK] if self.examples is not None else []) + list(self.harness)
        # In --tasks order; the tasks of a harness group (listed by the harness, not by us) after them.
        self.names = [name for name in wanted if name in scored] + [name for name in scored if name not in wanted]
        self.scorer: ContinuationScorer | None = None

    def score(self, model: GPT, names: list[str] | None = None) -> EvalResult:
        """``model``'s scores on ``names`` (default: every task), on every rank alike."""
        cfg, names = self.cfg, self.names if names is None else names
        scorer, t0 = self._scorer(model), time.perf_counter()
        tasks, chance, predictions = {}, {}, None
        if TASK in names:
            result = evaluate_with(scorer, self.examples, self.ctx, cfg.batch_size, cfg.dtype, cfg.progress,
                                   keep_predictions=cfg.predictions is not None)  # fmt: skip
            tasks[TASK], chance[TASK], predictions = result.scores(), 1 / N_ENDINGS, result.predictions
        if harness := [name for name in names if name in self.harness]:
            from gpt2.lm_eval import PipelineLM, evaluate_tasks

            lm = PipelineLM(scorer, batch_size=cfg.batch_size, device=self.ctx.device, dtype=cfg.dtype)
            result = evaluate_tasks(lm, {name: self.harness[name] for name in harness}, cfg.limit)
            tasks.update(result.tasks)
            chance.update(result.chance)
        return EvalResult({name: tasks[name] for name in names}, chance, time.perf_counter() - t0, predictions)

    def _scorer(self, model: GPT) -> ContinuationScorer:
        """The scorer of ``model``: the one of the previous model, with these weights loaded in place, where the
        architecture is the same (a compiled trunk stays compiled)."""
        if self.scorer is None or self.scorer.model.config != model.config:
            self.scorer = ContinuationScorer(model.eval(), compile=self.cfg.compile)
        else:
            self.scorer.model.load_state_dict(model.state_dict())
        return self.scorer


# ----------------------------------------------------------------------------------------------------------------------
# Targets


def is_run_dir(target: str | Path) -> bool:
    """A directory for ``ckpt_*.pt`` files: not a Hugging Face model directory (it has a config.json), nor
    a hub id that happens to name a folder without checkpoints (``gpt2`` is also this package's folder)."""
    path = Path(target)
    if not path.is_dir() or (path / "config.json").exists():
        return False
    return bool(find_checkpoints(path)) or not is_hub_id(str(target))


def run_mode(target: str | Path, watch: bool) -> bool:
    """Whether ``target`` is scored as a run directory (``--watch`` may start before the trainer made it)."""
    return is_run_dir(target) or (watch and not Path(target).exists())


def load_on_every_rank(path: str, ctx: DistContext, skipped: set[str] | None) -> GPT | None:
    """The checkpoint's model on every rank; or, when any rank could not read it, None on every rank if
    ``skipped`` is given (the path is added to it) and a ``UserError`` if not."""
    error = None
    try:
        model = model_from_checkpoint(load_checkpoint(path), path).to(ctx.device).eval()
    except UserError as e:
        model, error = None, e
    failed = all_reduce_sum(torch.tensor([error is not None], dtype=torch.long, device=ctx.device), ctx).item()
    if not failed:
        return model
    if skipped is None:
        raise error or UserError(f"checkpoint {path} cannot be loaded on another rank")
    if path not in skipped:
        log.warning("skipping %s for now: %s", path, error or "unreadable on another rank")
        skipped.add(path)
    return None


def watch_run(
    target: str | Path,
    score_pass: Callable[[], list[T]],
    say: Callable[[str], None],
    nothing_new: str,
    watch: bool,
    interval: float,
) -> list[T]:
    """Run ``score_pass`` (which scores what the run's scores file lacks) once, or every ``interval`` seconds
    until Ctrl-C (KeyboardInterrupt); ``nothing_new`` is said when a single pass found everything scored already."""
    if not watch:
        if not find_checkpoints(target):
            raise UserError(f"{target} holds no ckpt_*.pt checkpoints and is not a Hugging Face model directory")
        results = score_pass()
        if not results:
            say(nothing_new)
        return results
    say(f"watching {target} for new checkpoints every {interval:g}s (Ctrl-C to stop)")
    with _remembered_interrupt() as interrupted:
        results = score_pass()
        while not interrupted.wait(interval):
            results += score_pass()
    # Only Ctrl-C ends a watch, normally as the KeyboardInterrupt it raises. Here that was swallowed: it came
    # while Python ran a finalizer (a progress bar's, a tensor's), which drops exceptions; the event kept it.
    raise KeyboardInterrupt


@contextlib.contextmanager
def _remembered_interrupt() -> Iterator[threading.Event]:
    """SIGINT raises KeyboardInterrupt as usual and also sets the event it yields, so that an interrupt that a
    finalizer swallowed is not lost. Only where Python's own Ctrl-C handler is in place (on the main thread, and
    not where SIGINT is ignored, as in a background job): elsewhere the event stays unset."""
    interrupted = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    if not in_main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield interrupted
        return

    def on_sigint(signum: int, frame: object) -> None:
        interrupted.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------------------------------------------------
# The command line


@dataclass
class EvaluateConfig:
    """What ``python -m gpt2.evaluate`` is asked to do; its fields are the program's arguments (``gpt2.cli``)."""

    target: str = option(
        help="checkpoint file, run directory (every checkpoint not yet scored on every task), Hugging Face model "
        "directory or hub id (gpt2 ... gpt2-xl)", positional=True,
    )  # fmt: skip
    tasks: str = option(
        "small", f"comma-separated tasks: {TASK} (build-nanogpt's HellaSwag), harness task names, 'small' (the "
        "harness suite)", metavar="LIST",
    )  # fmt: skip
    limit: int | None = option(None, "score only the first N examples of each task", metavar="N")
    batch_size: int = option(32, "packed rows (one per example or distinct context) per forward pass", metavar="N")
    dtype: str = option("bf16", "autocast dtype", choices=list(DTYPES))
    device: str = option("auto", "auto: CUDA when present, else CPU", choices=DEVICES)
    compile: bool = option(False, "run the scorer through torch.compile (dynamic shapes)")
    data_dir: Path | None = option(
        None, "offline: read each task from DIR/<task>_validation.jsonl instead of the hub", metavar="DIR"
    )
    hellaswag_data: Path | None = option(
        None, f"{TASK}'s local HellaSwag JSONL (default: the val set, downloaded once into data/hellaswag/, or "
        "DIR/hellaswag_validation.jsonl with --data-dir)", metavar="FILE.jsonl",
    )  # fmt: skip
    out: Path | None = option(None, "write {target, step, tasks, centered_mean, seconds} as JSON", metavar="FILE.json")
    predictions: Path | None = option(
        None, f"one JSON line per {TASK} example: its losses and predictions", metavar="FILE.jsonl"
    )
    watch: bool = option(False, "run directory: keep scoring new checkpoints until interrupted")
    interval: float = option(60.0, "seconds between polls with --watch", metavar="SECONDS")
    progress: bool = option(True, "show progress bars", cli=False)

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise UserError(f"--interval must be a positive number of seconds, got {self.interval}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be a positive number of examples, got {self.limit}")
        if self.predictions is not None and TASK not in task_names(self.tasks):
            raise UserError(f"--predictions writes {TASK}'s per-example losses; add {TASK} to --tasks")


@dataclass
class HellaSwagConfig(EvaluateConfig):
    """``eval_hellaswag.py``: the runner with the task ``hellaswag_nanogpt`` and the flags it has always had."""

    tasks: str = option(TASK, cli=False)
    data_dir: Path | None = option(None, cli=False)
    hellaswag_data: Path | None = option(
        None, "local HellaSwag JSONL (default: the val set, downloaded once into data/hellaswag/)",
        aliases=["--data"], metavar="FILE.jsonl",
    )  # fmt: skip


def run(cfg: EvaluateConfig, report: Callable[[str], None] = print) -> list[EvalResult]:
    """Score ``cfg.target`` on ``cfg.tasks``; ``report`` receives the human-readable lines (on rank 0 only)."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task config notices drown the results
    by_run = run_mode(cfg.target, cfg.watch)
    if by_run and (cfg.out or cfg.predictions):
        raise UserError("--out and --predictions score one model: pass a checkpoint file, not a run directory")
    if cfg.watch and not by_run:
        raise UserError(f"--watch polls a run directory for new checkpoints; {cfg.target} is not one")
    ctx = init_distributed(cfg.device)
    say = report if ctx.is_main else (lambda line: None)
    try:
        evaluator = Evaluator(cfg, ctx)
        if not by_run:
            return [_score_target(cfg, evaluator, say)]
        skipped: set[str] = set()
        return watch_run(
            cfg.target,
            lambda: score_run(Path(cfg.target), evaluator, say, skipped if cfg.watch else None),
            say,
            f"every checkpoint in {cfg.target} is already scored on these tasks in {SCORES_FILE}",
            cfg.watch,
            cfg.interval,
        )
    finally:
        destroy_distributed()


def _score_target(cfg: EvaluateConfig, evaluator: Evaluator, say: Callable[[str], None]) -> EvalResult:
    """Score one model (checkpoint, HF directory, hub id); write ``--out`` and ``--predictions`` (rank 0)."""
    model, info = load_model(cfg.target, evaluator.ctx.device)
    result = evaluator.score(model)
    say(result.table())
    if evaluator.ctx.is_main and cfg.out:
        summary = {"target": str(cfg.target), "step": info["step"], "tasks": result.tasks,
                   "centered_mean": result.centered_mean, "seconds": round(result.seconds, 3)}  # fmt: skip
        atomic_write_text(cfg.out, json.dumps(summary, indent=2) + "\n")
    if evaluator.ctx.is_main and cfg.predictions:
        atomic_write_text(cfg.predictions, jsonl_text(asdict(p) for p in result.predictions))
    return result


def score_run(
    run_dir: Path, evaluator: Evaluator, say: Callable[[str], None], skipped: set[str] | None
) -> list[EvalResult]:
    """Score each checkpoint of ``run_dir`` on the tasks the scores file lacks for it, adding the records
    (atomically) as each checkpoint is done. Checkpoints are written by temp file + rename, so a listed one is
    complete; with ``skipped`` (while watching), one that cannot be read (deleted by rotation, copied in by hand)
    is retried at the next poll instead of ending the watch, and reported once."""
    ctx = evaluator.ctx

    def pending() -> list[tuple[int, str, list[str]]]:
        done = {(record["step"], record["task"]) for record in read_scores(run_dir)}
        todo = [(step, str(path), [task for task in evaluator.names if (step, task) not in done])
                for step, path in find_checkpoints(run_dir)]  # fmt: skip
        return [(step, path, missing) for step, path, missing in todo if missing]

    results = []
    todo = on_main(pending, ctx)
    # A run trained with --tensorboard/--wandb gets the scores too, as eval/downstream/<task>/<metric> (rank 0).
    trackers = open_run_trackers(run_dir, warn=log.warning) if todo and ctx.is_main else Trackers()
    with trackers:
        for step, path, missing in todo:
            model = load_on_every_rank(path, ctx, skipped)
            if model is None:
                continue
            result = evaluator.score(model, missing)
            if ctx.is_main:
                records = [{"step": step, "task": task, **scores} for task, scores in result.tasks.items()]
                add_scores(run_dir, records)
                for record in records:
                    trackers.log_record({"kind": "downstream", **record})
                say(f"step {step}:\n{result.table()}")
            barrier(ctx)
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> None:
    cfg = parse(EvaluateConfig, argv, prog="python -m gpt2.evaluate", description=__doc__)
    cfg.progress = sys.stderr.isatty()
    run(cfg)


if __name__ == "__main__":
    run_cli(main)
