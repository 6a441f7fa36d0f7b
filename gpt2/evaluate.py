"""Downstream evaluation through lm-evaluation-harness: ``python -m gpt2.evaluate TARGET --tasks small``.

The harness supplies the tasks (prompts, data, metrics); ``gpt2.lm_eval.PipelineLM`` scores them, so the
numbers are the harness's own (0-shot; ``acc``, and the character-length-normalised ``acc_norm`` where the
task reports it). ``small`` is the standard small-model suite below. TARGET is a checkpoint, a Hugging Face
directory or hub id (scored once; ``--out`` writes the summary), or a run directory: every checkpoint is
scored on every task not yet in ``<run>/evals.jsonl`` (one ``{"step", "task", "acc", "acc_norm", "n"}``
record per checkpoint and task), and ``--watch`` keeps polling for new checkpoints. Under ``torchrun``
the rows are split across ranks; the results equal one process's.

The summary's **centered mean** is nanochat's CORE-style aggregate: per task ``(a - chance) / (1 - chance)``,
averaged, where ``a`` is ``acc_norm`` where the harness reports it (length-normalised, as CORE scores
multiple choice) and ``acc`` elsewhere, and ``chance`` is the expected accuracy of guessing uniformly
(the mean of 1 / number of choices over the scored examples). A random model scores about 0.

Offline (``--data-dir DIR``): each task reads ``DIR/<task>_validation.jsonl``, the hub dataset's validation
split as JSON lines with the dataset's own field names; only the task's data source changes, never its
prompts. Needs the ``[eval]`` extra: ``pip install -e '.[eval]'``.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2.checkpoint import find_checkpoints, load_model
from gpt2.cli import option, parse
from gpt2.distributed import DEVICES, DTYPES, DistContext, barrier, destroy_distributed, init_distributed, on_main
from gpt2.errors import UserError, run_cli
from gpt2.files import atomic_write_text, jsonl_text, read_jsonl
from gpt2.rundir import load_on_every_rank, run_mode, watch_run
from gpt2.tracking import Trackers, open_run_trackers

if TYPE_CHECKING:
    from lm_eval.api.task import Task

    from gpt2.lm_eval import PipelineLM
    from gpt2.model import GPT

SUITE = (
    "hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "openbookqa", "sciq", "boolq", "copa",
    "commonsense_qa", "social_iqa",
)  # fmt: skip
GROUPS = {"small": SUITE}
EVALS_FILE = "evals.jsonl"  # one {"step", "task", "acc", "acc_norm", "n"} record per checkpoint and task
INSTALL_HINT = "pip install -e '.[eval]' (or pip install 'lm-eval>=0.4.13,<0.5')"

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Tasks


def require_harness() -> None:
    """A ``UserError`` naming the pip command when lm-evaluation-harness is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"downstream evaluation needs lm-evaluation-harness: {INSTALL_HINT}") from None


def task_names(spec: str) -> list[str]:
    """The task names of a comma-separated ``--tasks`` value, groups expanded, duplicates dropped."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise UserError("--tasks is empty; give harness task names or 'small'")
    return list(dict.fromkeys(task for name in names for task in GROUPS.get(name, (name,))))


@functools.cache
def task_manager() -> Any:
    """The harness's index of its task configs (built once per process: it reads thousands of YAML files)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def load_tasks(names: list[str], data_dir: Path | None = None) -> dict[str, Task]:
    """The harness's tasks, with their data read from ``data_dir`` when given. Unknown names, missing
    files and generation tasks are ``UserError``s before anything is scored."""
    from gpt2.lm_eval import generation_error

    manager = task_manager()
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, [*manager.all_tasks, *GROUPS], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(
                f"unknown task {name!r}{hint}: not an lm-evaluation-harness task, group or tag, nor one of "
                f"this project's groups ({', '.join(GROUPS)}); `lm_eval ls tasks` lists the harness's"
            )
    if data_dir is None:
        tasks = manager.load(names)["tasks"]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tasks = manager.load([_local_task_yaml(manager, name, Path(data_dir), Path(tmp)) for name in names])[
                "tasks"
            ]
    generating = [name for name, task in tasks.items() if task.OUTPUT_TYPE == "generate_until"]
    if generating:
        raise UserError(generation_error(generating))
    return tasks


def _local_task_yaml(manager: Any, name: str, data_dir: Path, tmp: Path) -> str:
    """A task file that includes the harness's own config of ``name`` and changes only where the data comes
    from: the validation split is ``data_dir/<name>_validation.jsonl`` and it is the split scored."""
    import yaml

    if name not in manager.all_subtasks:
        raise UserError(f"--data-dir reads one file per task; {name!r} is a harness group or tag, list its tasks")
    path = data_dir / f"{name}_validation.jsonl"
    if not path.is_file():
        raise UserError(
            f"{path} does not exist: --data-dir needs {name}'s validation split as JSON lines "
            "with the hub dataset's own field names"
        )
    config = {
        "include": str(manager.task_index[name].yaml_path),
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": str(path.resolve())}},
        "training_split": None,
        "validation_split": "validation",
        "test_split": None,
        "fewshot_split": None,
    }
    task_yaml = tmp / f"{name}.yaml"
    task_yaml.write_text(yaml.safe_dump(config))
    return str(task_yaml)


# ----------------------------------------------------------------------------------------------------------------------
# Scoring


def headline(scores: dict[str, Any]) -> float | None:
    """A task's one number: ``acc_norm`` where the harness reports it, else ``acc`` (None for perplexity tasks)."""
    return scores["acc_norm"] if scores.get("acc_norm") is not None else scores.get("acc")


def harness_choices(sample: dict[str, Any]) -> tuple[int, int]:
    """The acc and acc_norm choices of one multiple-choice example as the harness logs it (``log_samples``):
    the most likely choice, and the most likely per character of the choice."""
    lls = [ll for ll, _ in sample["filtered_resps"]]
    per_char = [ll / len(choice) for ll, (_, choice) in zip(lls, sample["arguments"])]
    argmax = lambda values: max(range(len(values)), key=values.__getitem__)
    return argmax(lls), argmax(per_char)


@dataclass
class EvalResult:
    """The harness's metrics per task (``acc``, ``acc_norm`` (None where not reported) and ``n`` for
    multiple choice; the task's own metrics for perplexity tasks) and each multiple-choice task's chance."""

    tasks: dict[str, dict[str, Any]]
    chance: dict[str, float]
    seconds: float

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
        lines = [f"{'task':<16}{'acc':>8}{'acc_norm':>10}{'n':>7}{'chance':>8}{'centered':>10}"]
        for task, scores in self.tasks.items():
            if task not in self.chance:  # a perplexity task: its own metrics
                metrics = ", ".join(f"{k}={v:.4f}" for k, v in scores.items() if k != "n")
                lines.append(f"{task:<16}{metrics}  n={scores['n']}")
                continue
            acc_norm = "-" if scores["acc_norm"] is None else f"{scores['acc_norm']:.4f}"
            lines.append(
                f"{task:<16}{scores['acc']:>8.4f}{acc_norm:>10}{scores['n']:>7}"
                f"{self.chance[task]:>8.4f}{self.centered(task):>10.4f}"
            )
        if (mean := self.centered_mean) is not None:
            lines.append(f"centered mean (acc_norm where reported, else acc): {mean:.4f}")
        return "\n".join(lines)


def evaluate_tasks(lm: PipelineLM, tasks: dict[str, Task], limit: int | None = None) -> EvalResult:
    """Score ``tasks`` (each on its first ``limit`` examples) with ``lm`` through the harness; every rank
    returns the same result.

    Every rank runs the harness (``lm`` shares the scoring out among them), but the harness hands its
    results to one process per node only (it treats a model that splits requests itself like a
    tensor-parallel one), so rank 0 summarises them for everyone.
    """
    import lm_eval

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks.values()), limit=limit, bootstrap_iters=0, log_samples=False,
        task_manager=task_manager(),  # else it indexes every task config again
    )  # fmt: skip

    def summarise() -> EvalResult:
        scores, chance = {}, {}
        for name, task in tasks.items():
            metrics = {
                key.split(",")[0]: value
                for key, value in out["results"][name].items()
                if key.endswith(",none") and "_stderr" not in key
            }
            if task.OUTPUT_TYPE == "multiple_choice":
                metrics = {"acc": metrics["acc"], "acc_norm": metrics.get("acc_norm")}
                choices = [len(task.doc_to_choice(doc)) for _, doc in task.doc_iterator(limit=limit)]
                chance[name] = statistics.fmean(1 / k for k in choices)
            scores[name] = {**metrics, "n": out["n-samples"][name]["effective"]}
        return EvalResult(scores, chance, time.perf_counter() - t0)

    return on_main(summarise, lm.dist)


# ----------------------------------------------------------------------------------------------------------------------
# The command line


@dataclass
class EvaluateConfig:
    """What ``python -m gpt2.evaluate`` is asked to do; its fields are the program's arguments (``gpt2.cli``)."""

    target: str = option(
        help="checkpoint file, run directory (every checkpoint not yet scored on every task), Hugging Face model "
        "directory or hub id (gpt2 ... gpt2-xl)", positional=True,
    )  # fmt: skip
    tasks: str = option("small", "comma-separated harness task names; 'small' is the suite", metavar="LIST")
    limit: int | None = option(None, "score only the first N examples of each task", metavar="N")
    batch_size: int = option(32, "packed rows (one per distinct context) per forward pass", metavar="N")
    dtype: str = option("bf16", "autocast dtype", choices=list(DTYPES))
    device: str = option("auto", "auto: CUDA when present, else CPU", choices=DEVICES)
    data_dir: Path | None = option(
        None, "offline: read each task from DIR/<task>_validation.jsonl instead of the hub", metavar="DIR"
    )
    out: Path | None = option(None, "write {target, step, tasks, centered_mean} as JSON", metavar="FILE.json")
    watch: bool = option(False, "run directory: keep scoring new checkpoints until interrupted")
    interval: float = option(60.0, "seconds between polls with --watch", metavar="SECONDS")

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise UserError(f"--interval must be a positive number of seconds, got {self.interval}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"--limit must be a positive number of examples, got {self.limit}")


def read_evals(run_dir: str | Path) -> list[dict]:
    """The records of ``<run>/evals.jsonl`` (empty when nothing is scored yet)."""
    path = Path(run_dir) / EVALS_FILE
    return [record for _, record in read_jsonl(path)] if path.exists() else []


def run(cfg: EvaluateConfig, report: Callable[[str], None] = print) -> list[EvalResult]:
    """Score ``cfg.target`` on ``cfg.tasks``; ``report`` receives the human-readable lines (rank 0 only)."""
    require_harness()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task config notices drown the results
    by_run = run_mode(cfg.target, cfg.watch)
    if by_run and cfg.out:
        raise UserError("--out summarises one model: pass a checkpoint file, not a run directory")
    if cfg.watch and not by_run:
        raise UserError(f"--watch polls a run directory for new checkpoints; {cfg.target} is not one")
    tasks = load_tasks(task_names(cfg.tasks), cfg.data_dir)
    ctx = init_distributed(cfg.device)
    say = report if ctx.is_main else (lambda line: None)
    try:
        if not by_run:
            return [_score_target(cfg, tasks, ctx, say)]
        skipped: set[str] = set()
        return watch_run(
            cfg.target,
            lambda: score_run(cfg, tasks, ctx, say, skipped),
            say,
            f"every checkpoint in {cfg.target} is already scored on these tasks in {EVALS_FILE}",
            cfg.watch,
            cfg.interval,
        )
    finally:
        destroy_distributed()


def _pipeline_lm(model: GPT, cfg: EvaluateConfig) -> PipelineLM:
    from gpt2.lm_eval import PipelineLM

    return PipelineLM(model, batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype)


def _score_target(
    cfg: EvaluateConfig, tasks: dict[str, Task], ctx: DistContext, say: Callable[[str], None]
) -> EvalResult:
    model, info = load_model(cfg.target, ctx.device)
    result = evaluate_tasks(_pipeline_lm(model, cfg), tasks, cfg.limit)
    say(result.table())
    if cfg.out and ctx.is_main:
        summary = {"target": str(cfg.target), "step": info["step"], "tasks": result.tasks,
                   "centered_mean": result.centered_mean}  # fmt: skip
        atomic_write_text(cfg.out, json.dumps(summary, indent=2) + "\n")
    return result


def score_run(
    cfg: EvaluateConfig, tasks: dict[str, Task], ctx: DistContext, say: Callable[[str], None], skipped: set[str]
) -> list[EvalResult]:
    """Score each checkpoint of the run directory ``cfg.target`` on the tasks ``evals.jsonl`` lacks for it,
    appending the records atomically. While watching, an unreadable checkpoint is retried at the next poll
    (and reported once, via ``skipped``) instead of ending the watch."""
    run_dir = Path(cfg.target)

    def pending() -> list[tuple[int, str, list[str]]]:
        done = {(record.get("step"), record.get("task")) for record in read_evals(run_dir)}
        todo = [
            (step, str(path), [t for t in tasks if (step, t) not in done]) for step, path in find_checkpoints(run_dir)
        ]
        return [(step, path, missing) for step, path, missing in todo if missing]

    results = []
    todo = on_main(pending, ctx)
    # A run trained with --tensorboard/--wandb gets the scores too, as eval/downstream/<task>/<metric> (rank 0).
    trackers = open_run_trackers(run_dir, warn=log.warning) if todo and ctx.is_main else Trackers()
    with trackers:
        for step, path, missing in todo:
            model = load_on_every_rank(path, ctx, skipped if cfg.watch else None)
            if model is None:
                continue
            result = evaluate_tasks(_pipeline_lm(model, cfg), {t: tasks[t] for t in missing}, cfg.limit)
            if ctx.is_main:
                records = [{"step": step, "task": task, **scores} for task, scores in result.tasks.items()]
                atomic_write_text(run_dir / EVALS_FILE, jsonl_text([*read_evals(run_dir), *records]))
                for record in records:
                    trackers.log_record({"kind": "downstream", **record})
                say(f"step {step}:\n{result.table()}")
            barrier(ctx)
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> None:
    run(parse(EvaluateConfig, argv, prog="python -m gpt2.evaluate", description=__doc__))


if __name__ == "__main__":
    run_cli(main)
