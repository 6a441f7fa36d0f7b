"""The task ``hellaswag_nanogpt``: HellaSwag as build-nanogpt scores it (GPT-2 124M: acc_norm 0.2955 on the
10,042 val examples), for the evaluation runner (``gpt2.evaluate``, ``eval_hellaswag.py``) and the trainer's
``--hellaswag-every``.

Completion style, build-nanogpt's convention: the context is ``encode(ctx)`` as the dataset writes it, each
ending is ``encode(" " + ending)``, and each of the 4 candidates is scored by the cross-entropy of its ending
tokens given the context and the ending's earlier tokens. ``acc`` takes the argmin of the summed loss,
``acc_norm`` the argmin of the mean loss per ending token. lm-evaluation-harness's ``hellaswag`` (GPT-2 124M:
0.3114) is another task: it rewrites the context (activity label, cleaned text) and normalises by characters.

Scoring runs through ``gpt2.scoring``: each example is one shared-context row (the context once, the four
endings after it), the LM head runs only where an ending token is predicted, and rows are batched by
length, so predictions are bit-identical (CPU, fp32) whatever the batch size or the number of ranks.
"""

from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from gpt2.checkpoint import unwrap
from gpt2.distributed import DistContext, all_reduce_sum, gather_strided, on_main
from gpt2.errors import UserError
from gpt2.files import atomic_write, file_sha256, read_jsonl
from gpt2.scoring import ContinuationScorer, PackedRow, RowScores, pack_row, score_rows
from gpt2.tokenizer import get_encoding

TASK = "hellaswag_nanogpt"  # the runner's name for this task (a harness task of that name would be another)
VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
VAL_SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"
VAL_EXAMPLES = 10042
DEFAULT_DATA_DIR = Path("data/hellaswag")
N_ENDINGS = 4


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

    def scores(self) -> dict[str, Any]:
        """The task's scores as every scores record and ``hellaswag`` log record holds them."""
        return {"acc": self.acc, "acc_norm": self.acc_norm, "n": self.n}


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
        return evaluate_with(scorer, examples, ctx, batch_size, dtype, progress, keep_predictions)
    finally:
        gpt.train(was_training)


def evaluate_with(
    scorer: ContinuationScorer,
    examples: list[Example],
    ctx: DistContext,
    batch_size: int = 32,
    dtype: str = "bf16",
    progress: bool = False,
    keep_predictions: bool = False,
) -> HellaSwagResult:
    """``evaluate`` with a scorer of an eval-mode model (the runner keeps one per run)."""
    t0 = time.perf_counter()
    local = examples[ctx.rank :: ctx.world_size]
    desc = TASK if ctx.world_size == 1 else f"{TASK} (rank 0 of {ctx.world_size})"
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
