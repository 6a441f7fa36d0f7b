"""Scoring continuations fast: shared-context rows, logits only where scored, length-bucketed batches.

A multiple-choice question asks for the log-likelihood of several continuations of one context. Scored
naively, the context is run through the model once per continuation and the LM head (a vocabulary-wide
matmul) is applied at every position. Here instead:

* **Shared context.** A context and its continuations are packed into one row
  ``context + cont0[:-1] + cont1[:-1] + ...``. Each continuation's positions restart where the context
  ends, and an attention mask lets a continuation see only the context and its own earlier tokens, so
  every continuation sees exactly what it would see alone, yet the context is computed once. A
  continuation's last token is only a target, so it is not fed in.
* **Logits only where scored.** The head runs only on the positions that predict a continuation token.
* **Batches across rows, bucketed by length.** Rows are padded on the right to a multiple of ``BUCKET``
  tokens (or of the row's own ``bucket``) and batched with rows of the same padded length. Attention
  kernels' last bits change with the padded length, so a row's length is set by the row alone, never by
  its batch-mates: on CPU in fp32, losses are bit-identical whatever the batch size or the number of
  ranks (GPU matmul libraries may pick kernels by batch size and move last bits). ``torch.compile`` sees
  few shapes.

The transformer itself is the model's own ``GPT.hidden`` and ``GPT.logits``: there is one forward pass,
so whatever the trained model computes, the scorer scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from gpt2.distributed import autocast
from gpt2.model import GPT

BUCKET = 8  # packed rows are padded to a multiple of this many tokens, unless a row says otherwise
MIN_HEAD_ROWS = 8  # the LM head never runs on fewer rows (see ContinuationScorer.forward)


@dataclass(frozen=True)
class PackedRow:
    """A context and its continuations laid out in one row (see the module docstring).

    ``predictors[j]`` is the row position whose output predicts ``targets[j]``: the last context token for
    a continuation's first token, the continuation's previous token for the others.
    """

    tokens: list[int]
    positions: list[int]  # each continuation restarts at len(context)
    segments: list[int]  # 0 for the context, i + 1 for continuation i
    predictors: list[int]
    targets: list[int]  # the continuations' tokens, one after the other
    continuation_lens: list[int]
    bucket: int = BUCKET  # the row is padded to a multiple of this many tokens

    @property
    def bucket_len(self) -> int:
        return math.ceil(len(self.tokens) / self.bucket) * self.bucket


def pack_row(context: list[int], continuations: list[list[int]], bucket: int = BUCKET) -> PackedRow:
    """Pack a non-empty ``context`` and its non-empty ``continuations``; the caller has already truncated the
    context so that ``len(context) + len(continuation) - 1`` fits the model's block size for each. A coarser
    ``bucket`` pads more but lets more rows share a batch (worth it where rows are few and lengths varied)."""
    if not context or not all(continuations):
        raise ValueError("a packed row needs a non-empty context and non-empty continuations")
    tokens, positions, segments = list(context), list(range(len(context))), [0] * len(context)
    predictors, targets = [], []
    for i, continuation in enumerate(continuations):
        start = len(tokens)
        predictors += [len(context) - 1, *range(start, start + len(continuation) - 1)]
        targets += continuation
        tokens += continuation[:-1]
        positions += range(len(context), len(context) + len(continuation) - 1)
        segments += [i + 1] * (len(continuation) - 1)
    return PackedRow(tokens, positions, segments, predictors, targets, [len(c) for c in continuations], bucket)


class ContinuationScorer(nn.Module):
    """Per-token cross-entropy of the targets of packed rows, and, when asked (``greedy``), whether each target
    is the model's most likely next token (lm-eval's ``is_greedy``; HellaSwag does not need it, and the argmax is
    one more pass over every chunk of vocabulary-wide logits: a quarter of a small model's scoring time).

    ``compile`` compiles the trunk (``GPT.hidden`` under the packing mask) with dynamic shapes; the LM head
    runs eagerly in chunks. One scorer serves every task and, weights loaded in place, every checkpoint of a run.
    """

    def __init__(self, model: GPT, compile: bool = False) -> None:
        super().__init__()
        self.model = model
        self._hidden = torch.compile(self.hidden, dynamic=True) if compile else self.hidden

    def hidden(self, idx: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        """The model's final hidden states of packed rows: tokens ``idx`` at positions ``pos`` in segments ``seg``."""
        T = idx.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
        key_seg, query_seg = seg.unsqueeze(1), seg.unsqueeze(2)
        # A query sees earlier keys of the shared context (segment 0) or of its own segment.
        mask = (causal & ((key_seg == 0) | (key_seg == query_seg))).unsqueeze(1)  # (B, 1, T, T)
        return self.model.hidden(idx, pos, mask)

    def forward(
        self,
        idx: torch.Tensor,
        pos: torch.Tensor,
        seg: torch.Tensor,
        src: torch.Tensor,
        tgt: torch.Tensor,
        greedy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``idx, pos, seg``: (B, T) tokens, positions, segments (-1 for padding); ``src``: flat indices into
        (B*T) of the positions that predict ``tgt``. Returns the fp32 loss of each target token and, with
        ``greedy``, whether each target is the model's most likely next token (else None)."""
        h = self._hidden(idx, pos, seg).flatten(0, 1)[src]
        # Each chunk streams the (vocab, C) head weight once and writes chunk x vocab logits: about C rows
        # balances the two, and at least 64 rows keeps a small model's logits in cache.
        chunk = max(64, self.model.config.n_embd)
        bounds = [*range(0, len(tgt), chunk), len(tgt)]
        # A matmul of very few rows takes other kernels (gemv; on some CPUs up to 3 rows), whose last bits
        # differ, and a row's loss must not depend on where its batch happens to end or how few targets it
        # holds: a short tail joins the chunk before it, and a batch's only chunk, if short, is padded with
        # zero rows (whose logits are dropped), so the head always multiplies at least MIN_HEAD_ROWS rows.
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < MIN_HEAD_ROWS:
            del bounds[-2]
        losses, is_greedy = [], []
        for a, b in zip(bounds, bounds[1:]):
            rows = F.pad(h[a:b], (0, 0, 0, max(0, MIN_HEAD_ROWS - (b - a))))
            logits = self.model.logits(rows).float()[: b - a]
            losses.append(F.cross_entropy(logits, tgt[a:b], reduction="none"))
            if greedy:
                is_greedy.append(logits.argmax(dim=-1) == tgt[a:b])
        return torch.cat(losses), torch.cat(is_greedy) if greedy else None


def batch_tensors(rows: list[PackedRow], device: str) -> tuple[torch.Tensor, ...]:
    """Right-pad rows to their common bucket length; flat indices of the positions that predict each target."""
    T = rows[0].bucket_len
    idx, pos, seg, src, tgt = [], [], [], [], []
    for b, row in enumerate(rows):
        pad = T - len(row.tokens)
        idx.append(row.tokens + [0] * pad)
        pos.append(row.positions + [0] * pad)
        seg.append(row.segments + [-1] * pad)
        src += [b * T + p for p in row.predictors]
        tgt += row.targets
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)
    return tuple(map(as_tensor, (idx, pos, seg, src, tgt)))


def length_batches(rows: list[PackedRow], batch_size: int) -> Iterator[list[int]]:
    """Indices of rows, grouped by bucket length (longest first) into batches of at most ``batch_size``."""
    order = sorted(range(len(rows)), key=lambda i: (-rows[i].bucket_len, i))
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) == batch_size or rows[batch[0]].bucket_len != rows[i].bucket_len):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@dataclass
class RowScores:
    """Per-target-token losses (fp64 copies of the fp32 values) and greedy flags (None when not asked for) of one
    packed row."""

    losses: list[float]
    greedy: list[bool] | None

    def per_continuation(self, lens: list[int]) -> list[tuple[float, bool | None]]:
        """``(summed loss, all tokens greedy)`` of each continuation (None for the flag when not asked for); the sum
        is exact (``math.fsum``), so it does not depend on summation order."""
        out, start = [], 0
        for n in lens:
            greedy = None if self.greedy is None else all(self.greedy[start : start + n])
            out.append((math.fsum(self.losses[start : start + n]), greedy))
            start += n
        return out


@torch.no_grad()
def score_rows(
    scorer: ContinuationScorer,
    rows: list[PackedRow],
    device: str,
    *,
    batch_size: int = 32,
    dtype: str = "bf16",
    greedy: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> list[RowScores]:
    """The scores of ``rows`` (in their order), on this process alone; ``greedy`` adds the greedy flags."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    scores: list[RowScores | None] = [None] * len(rows)
    for batch in length_batches(rows, batch_size):
        with autocast(torch.device(device).type, dtype):
            losses, flags = scorer(*batch_tensors([rows[i] for i in batch], device), greedy=greedy)
        losses = losses.double().cpu().tolist()
        flags = None if flags is None else flags.cpu().tolist()
        start = 0
        for i in batch:
            n = len(rows[i].targets)
            scores[i] = RowScores(losses[start : start + n], None if flags is None else flags[start : start + n])
            start += n
        if on_batch is not None:
            on_batch(len(batch))
    return scores  # type: ignore[return-value]
