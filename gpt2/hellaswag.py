"""HellaSwag evaluation: data, completion-style scoring, and scoring every checkpoint of a run.

Scoring is the standard for small models (as in build-nanogpt and the lm-eval "completion" style):
the context is ``encode(ctx)``, each ending is ``encode(" " + ending)``, and each of the 4 candidates
is scored by the cross-entropy of its ending tokens given the context and the ending's earlier tokens.
``acc`` takes the argmin of the summed loss, ``acc_norm`` the argmin of the mean loss per ending token.

Scoring runs through ``gpt2.scoring``: each example is one shared-context row (the context once, the four
endings after it), the LM head runs only where an ending token is predicted, and rows are batched by
length, so predictions are bit-identical (CPU, fp32) whatever the batch size or the number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn as nn
from tqdm import tqdm

from gpt2.checkpoint import find_checkpoints, load_model, unwrap
from gpt2.cli import option
from gpt2.distributed import (
    DEVICES,
    DTYPES,
    DistContext,
    all_reduce_sum,
    barrier,
    destroy_distributed,
    gather_strided,
    init_distributed,
    on_main,
)
from gpt2.errors import UserError
from gpt2.files import atomic_write, atomic_write_text, file_sha256, jsonl_text, read_jsonl
from gpt2.rundir import load_on_every_rank, run_mode, watch_run
from gpt2.scoring import ContinuationScorer, PackedRow, RowScores, pack_row, score_rows
from gpt2.tokenizer import get_encoding
from gpt2.tracking import Trackers, open_run_trackers

log = logging.getLogger(__name__)

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
VAL_SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"
VAL_EXAMPLES = 10042
DEFAULT_DATA_DIR = Path("data/hellaswag")
SCORES_FILE = "hellaswag.jsonl"  # one {"step", "acc", "acc_norm", "n"} record per scored checkpoint of a run
N_ENDINGS = 4

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Example:
    """One HellaSwag item: a context, four candidate endings and the index of the right one."""

    ind: int  # HellaSwag's own id for the item
    ctx: str
    endings: tuple[str, ...]
    label: int


def _parse_example(record: Any, where: str) -> Example:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    ctx, endings, label = record.get("ctx"), record.get("endings"), record.get("label")
    if not isinstance(ctx, str) or not ctx.strip():
        raise UserError(f"{where}: 'ctx' must be a non-empty string")
    if not isinstance(endings, list) or len(endings) != N_ENDINGS:
        count = len(endings) if isinstance(endings, list) else "no list of"
        raise UserError(f"{where}: expected exactly {N_ENDINGS} endings, got {count}")
    if not all(isinstance(e, str) and e.strip() for e in endings):
        raise UserError(f"{where}: every ending must be a non-empty string")
    if isinstance(label, str) and label.isdigit():  # the HF copy of the dataset stores labels as strings
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < N_ENDINGS:
        raise UserError(f"{where}: label must be an integer 0-3, got {label!r}")
    ind = record.get("ind")
    if not isinstance(ind, int) or isinstance(ind, bool):
        raise UserError(f"{where}: 'ind' must be an integer, got {ind!r}")
    return Example(ind=ind, ctx=ctx, endings=tuple(endings), label=label)


def load_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """The examples of a HellaSwag JSONL file (the first ``limit`` of them when given)."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be a positive number of examples, got {limit}")
    examples = []
    for lineno, record in read_jsonl(path):
        examples.append(_parse_example(record, f"{path}:{lineno}"))
        if len(examples) == limit:
            break
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples


def ensure_val(data_dir: str | Path = DEFAULT_DATA_DIR, *, url: str = VAL_URL, timeout: float = 30.0) -> Path:
    """The canonical HellaSwag validation file in ``data_dir``, downloaded and sha256-checked on first use."""
    data_dir = Path(data_dir)
    path = data_dir / Path(VAL_URL).name
    if path.is_file() and file_sha256(path) == VAL_SHA256:
        return path

    def download(f) -> None:  # hashed as it streams; a mismatch raises before the rename, leaving nothing
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != VAL_SHA256:
            raise UserError(f"downloaded {url} has sha256 {digest.hexdigest()}, expected {VAL_SHA256}; not using it")

    try:
        atomic_write(path, download)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(
            f"cannot download HellaSwag from {url} ({reason}); "
            "pass --hellaswag-data FILE.jsonl with a local copy of hellaswag_val.jsonl"
        ) from None
    return path


def load_eval_examples(data: str | Path | None, limit: int | None, ctx: DistContext) -> list[Example]:
    """The examples to score on every rank: from ``data``, or the canonical val set (downloaded by rank 0 only)."""
    return load_examples(on_main(lambda: data or ensure_val(), ctx), limit)


# ----------------------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Prediction:
    """The scores of one example, for error analysis (``--predictions``)."""

    ind: int
    label: int
    pred: int  # argmin of sum_losses
    pred_norm: int  # argmin of mean_losses
    sum_losses: list[float]
    mean_losses: list[float]


@dataclass
class HellaSwagResult:
    """Accuracy over all ``n`` examples (every rank's share together); the same on every rank."""

    n: int
    acc: float
    acc_norm: float
    correct: int
    correct_norm: int
    seconds: float
    predictions: list[Prediction] | None = field(default=None, repr=False)  # in example order, when asked for

    def summary(self) -> str:
        return f"hellaswag acc={self.acc:.4f} acc_norm={self.acc_norm:.4f} n={self.n}"


def pack_example(example: Example, block_size: int) -> PackedRow:
    """Tokenize and pack an example; the context is cut on the left until the longest ending fits the block."""
    enc = get_encoding()
    ctx = enc.encode_ordinary(example.ctx)
    endings = [enc.encode_ordinary(" " + e) for e in example.endings]
    longest = max(len(e) for e in endings)
    if longest >= block_size:
        raise UserError(
            f"HellaSwag example {example.ind}: an ending of {longest} tokens "
            f"does not fit the model's block size {block_size}"
        )
    return pack_row(ctx[-(block_size - longest) :], endings)  # keep the context nearest the endings


def _predict(example: Example, row: PackedRow, scores: RowScores) -> Prediction:
    sums = [loss for loss, _ in scores.per_continuation(row.continuation_lens)]
    means = [s / n for s, n in zip(sums, row.continuation_lens)]
    argmin = lambda values: min(range(len(values)), key=values.__getitem__)
    return Prediction(example.ind, example.label, argmin(sums), argmin(means), sums, means)


def score_examples(
    scorer: ContinuationScorer,
    examples: list[Example],
    device: str,
    *,
    batch_size: int = 32,
    dtype: str = "bf16",
    on_batch: Callable[[int], None] | None = None,
) -> list[Prediction]:
    """Predictions for ``examples`` (in their order), on this process alone."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    rows = [pack_example(e, scorer.model.config.block_size) for e in examples]
    scores = score_rows(scorer, rows, device, batch_size=batch_size, dtype=dtype, on_batch=on_batch)
    return [_predict(e, row, score) for e, row, score in zip(examples, rows, scores)]


def evaluate(
    model: nn.Module,
    examples: list[Example],
    ctx: DistContext,
    *,
    batch_size: int = 32,
    dtype: str = "bf16",
    progress: bool = False,
    compile: bool = False,
    keep_predictions: bool = False,
) -> HellaSwagResult:
    """Score ``examples`` with ``model`` (plain, compiled or DDP-wrapped; it must sit on ``ctx.device``).

    Every rank scores a strided share of the examples and the counts are all-reduced, so all ranks get
    the same result, equal to a one-process run. ``keep_predictions`` gathers every example's
    ``Prediction`` (in example order) into the result. The model's own compiled graph is never used (its
    shapes are the training shapes); ``compile=True`` compiles the scorer's trunk with dynamic shapes instead.
    """
    gpt = unwrap(model)
    scorer = ContinuationScorer(gpt, compile=compile)
    was_training = gpt.training
    gpt.eval()
    try:
        return _evaluate_with(scorer, examples, ctx, batch_size, dtype, progress, keep_predictions)
    finally:
        gpt.train(was_training)


def _evaluate_with(
    scorer: ContinuationScorer,
    examples: list[Example],
    ctx: DistContext,
    batch_size: int,
    dtype: str,
    progress: bool,
    keep_predictions: bool,
) -> HellaSwagResult:
    t0 = time.perf_counter()
    local = examples[ctx.rank :: ctx.world_size]
    desc = "hellaswag" if ctx.world_size == 1 else f"hellaswag (rank 0 of {ctx.world_size})"
    with tqdm(total=len(local), desc=desc, unit="ex", disable=not (progress and ctx.is_main), leave=False) as bar:
        predictions = score_examples(scorer, local, ctx.device, batch_size=batch_size, dtype=dtype, on_batch=bar.update)
    counts = torch.tensor(
        [
            len(predictions),
            sum(p.pred == p.label for p in predictions),
            sum(p.pred_norm == p.label for p in predictions),
        ],
        dtype=torch.long,
        device=ctx.device,
    )
    n, correct, correct_norm = all_reduce_sum(counts, ctx).tolist()
    result = HellaSwagResult(
        n=n, acc=correct / n, acc_norm=correct_norm / n, correct=correct, correct_norm=correct_norm, seconds=0.0
    )
    if keep_predictions:
        result.predictions = gather_strided(predictions, ctx)
    result.seconds = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Files and the command line


def read_scores(run_dir: str | Path) -> list[dict]:
    """The records of ``<run>/hellaswag.jsonl`` (empty when the run has not been scored yet)."""
    path = Path(run_dir) / SCORES_FILE
    return [record for _, record in read_jsonl(path)] if path.exists() else []


@dataclass
class EvalConfig:
    """What ``eval_hellaswag.py`` is asked to do; its fields are the program's arguments (``gpt2.cli``)."""

    target: str = option(
        help="checkpoint file, run directory (every checkpoint not yet scored), Hugging Face model directory or "
        "hub id (gpt2 ... gpt2-xl)", positional=True,
    )  # fmt: skip
    hellaswag_data: Path | None = option(
        None, "local HellaSwag JSONL (default: the val set, downloaded once into data/hellaswag/)",
        aliases=["--data"], metavar="FILE.jsonl",
    )  # fmt: skip
    limit: int | None = option(None, "score only the first N examples", metavar="N")
    batch_size: int = option(32, "examples per forward pass", metavar="N")
    dtype: str = option("bf16", "autocast dtype", choices=list(DTYPES))
    device: str = option("auto", "auto: CUDA when present, else CPU", choices=DEVICES)
    compile: bool = option(False, "run the scorer through torch.compile (dynamic shapes)")
    out: Path | None = option(None, "write {target, step, n, acc, acc_norm, seconds} as JSON", metavar="FILE.json")
    predictions: Path | None = option(
        None, "one JSON line per example: its losses and predictions", metavar="FILE.jsonl"
    )
    watch: bool = option(False, "run directory: keep scoring new checkpoints until interrupted")
    interval: float = option(60.0, "seconds between polls with --watch", metavar="SECONDS")
    progress: bool = option(True, "show a progress bar", cli=False)

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise UserError(f"--interval must be a positive number of seconds, got {self.interval}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")


def run(cfg: EvalConfig, report: Callable[[str], None] = print) -> list[HellaSwagResult]:
    """Score ``cfg.target``; ``report`` receives the human-readable lines (on rank 0 only).

    A run directory is scored checkpoint by checkpoint into ``<run>/hellaswag.jsonl`` (forever with
    ``watch``); any other target is scored once and written to ``--out`` / ``--predictions``.
    """
    # --watch may start before the trainer has made the run directory.
    by_run = run_mode(cfg.target, cfg.watch)
    if by_run and (cfg.out or cfg.predictions):
        raise UserError("--out and --predictions score one model: pass a checkpoint file, not a run directory")
    if cfg.watch and not by_run:
        raise UserError(f"--watch polls a run directory for new checkpoints; {cfg.target} is not one")
    ctx = init_distributed(cfg.device)
    say = report if ctx.is_main else (lambda line: None)
    try:
        examples = load_eval_examples(cfg.hellaswag_data, cfg.limit, ctx)
        if not by_run:
            return [_score_target(cfg, examples, ctx, say)]
        state = RunState()
        return watch_run(
            cfg.target,
            lambda: score_run(cfg, examples, ctx, say, state),
            say,
            f"every checkpoint in {cfg.target} is already scored in {SCORES_FILE}",
            cfg.watch,
            cfg.interval,
        )
    finally:
        destroy_distributed()


def _score_target(
    cfg: EvalConfig, examples: list[Example], ctx: DistContext, say: Callable[[str], None]
) -> HellaSwagResult:
    model, info = load_model(cfg.target, ctx.device)
    result = evaluate(
        model, examples, ctx, batch_size=cfg.batch_size, dtype=cfg.dtype, progress=cfg.progress,
        compile=cfg.compile, keep_predictions=cfg.predictions is not None,
    )  # fmt: skip
    if ctx.is_main:
        say(result.summary())
        if cfg.out:
            summary = {"target": str(cfg.target), "step": info["step"], "n": result.n, "acc": result.acc,
                       "acc_norm": result.acc_norm, "seconds": round(result.seconds, 3)}  # fmt: skip
            atomic_write_text(cfg.out, json.dumps(summary, indent=2) + "\n")
        if cfg.predictions:
            atomic_write_text(cfg.predictions, jsonl_text(asdict(p) for p in result.predictions))
    return result


@dataclass
class RunState:
    """What one pass over a run directory hands to the next while watching."""

    scorer: ContinuationScorer | None = None  # kept, so a compiled trunk is compiled once
    skipped: set[str] = field(default_factory=set)  # unreadable checkpoints already reported


def score_run(
    cfg: EvalConfig,
    examples: list[Example],
    ctx: DistContext,
    say: Callable[[str], None],
    state: RunState | None = None,
) -> list[HellaSwagResult]:
    """Score each checkpoint of the run directory ``cfg.target`` that ``hellaswag.jsonl`` does not list yet.

    Checkpoints are written by temp file + rename, so a listed ``ckpt_*.pt`` is complete. While
    watching, a checkpoint that cannot be read (deleted by rotation, copied in by hand) is retried at
    the next poll instead of ending the watch (each is reported once).
    """
    run_dir = Path(cfg.target)

    def pending() -> list[tuple[int, str]]:
        done = {record.get("step") for record in read_scores(run_dir)}
        return [(step, str(path)) for step, path in find_checkpoints(run_dir) if step not in done]

    state = state or RunState()
    results = []
    todo = on_main(pending, ctx)
    # A run trained with --tensorboard/--wandb gets the scores too (rank 0; nothing when it was not tracked).
    trackers = open_run_trackers(run_dir, warn=log.warning) if todo and ctx.is_main else Trackers()
    with trackers:
        for step, path in todo:
            result = _score_checkpoint(cfg, examples, ctx, state, path)
            if result is None:
                continue
            if ctx.is_main:
                record = {"step": step, "acc": result.acc, "acc_norm": result.acc_norm, "n": result.n}
                atomic_write_text(run_dir / SCORES_FILE, jsonl_text([*read_scores(run_dir), record]))
                trackers.log_record({"kind": "hellaswag", **record})
                say(f"step {step}: {result.summary()}")
            barrier(ctx)
            results.append(result)
    return results


def _score_checkpoint(
    cfg: EvalConfig, examples: list[Example], ctx: DistContext, state: RunState, path: str
) -> HellaSwagResult | None:
    """One checkpoint of a run scored on every rank (None: unreadable for now, while watching)."""
    model = load_on_every_rank(path, ctx, state.skipped if cfg.watch else None)
    if model is None:
        return None
    if state.scorer is None or state.scorer.model.config != model.config:
        state.scorer = ContinuationScorer(model, compile=cfg.compile)
    else:  # same architecture: load the weights in place and keep the compiled trunk
        state.scorer.model.load_state_dict(model.state_dict())
    return _evaluate_with(state.scorer, examples, ctx, cfg.batch_size, cfg.dtype, cfg.progress, False)
