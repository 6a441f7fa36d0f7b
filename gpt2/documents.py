"""Document-aligned training rows: every row starts at a document start, filled best-fit from a buffer of documents
(nanochat's BOS-aligned best-fit loader), with the guarantees of ``gpt2.data.TrainLoader``.

Documents. ``prepare_fineweb.py`` writes each document as ``[EOT] + tokens``, so the documents of the train stream
(the train shards concatenated in index order) are its runs from one EOT to the next, or to the end of the stream;
tokens before the stream's first EOT belong to no whole document and are never read. A document belongs to the shard
holding its first token (it may run on into the next shards). A shard's documents are found by scanning it for EOT
when it is first needed (a few shards stay cached), so a 10B-token corpus is never scanned at once.

Order. Documents are drawn one at a time from an endless sequence of epochs. Each epoch permutes the order of the
shards and, within each shard, the order of its documents; each permutation is a pure function of
``(seed, epoch[, shard])``, as for ``TrainLoader``'s windows. Without shuffling, documents come in stream order.

Packing (nanochat's best fit). A row holds ``seq_len + 1`` tokens (``x``, and ``y`` shifted by one). It is filled
from a buffer of ``buffer_docs`` documents, topped up from the sequence before every choice: the longest document
that fits whole in the row's remaining space (the oldest among equals); when none fits, the shortest document (the
oldest among equals) is cropped to fill the row exactly and the rest of it is dropped. There is no padding: every
token of every row is trained on, and the price is the cropped tokens (``cropped_fraction``). Rows start with a
document's EOT, so a model with ``doc_mask`` sees every document from its start and never across a boundary.

Global batches. The packing runs over the global rows in step order, identically on every rank (it needs only
document lengths, not tokens): step ``s`` owns rows ``[s * W, (s + 1) * W)``, ``W = batch_tokens // seq_len``;
rank ``r`` reads the ``r``-th block of ``W / world_size`` of them and its micro-step ``m`` the ``m``-th block of
``micro_batch`` within that, as in ``TrainLoader``. A step's rows therefore depend on the data, the seed,
``seq_len``, ``batch_tokens`` and ``buffer_docs`` only; ranks and micro-batches merely split them.

Resume. Between steps the packer's state (where the document sequence is, the buffered documents, the counters) is
plain ints, the same on every rank: ``state_dict()`` saves it and ``load_state_dict()`` restores it, after which the
batches are bit-identical to those of an uninterrupted run, on any world size and micro-batch size.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np
import torch

from gpt2.data import (
    TokenStream,
    _check_positive,
    _host_buffers,
    _to_device,
    _windows_per_step,
    check_between_steps,
    check_same_run,
    list_shards,
)
from gpt2.errors import UserError
from gpt2.tokenizer import EOT_ID

BUFFER_DOCS = 1000  # nanochat's buffer size
_SHARD_CACHE_SIZE = 4  # shards whose document index (and permutation) stay cached
_SCAN_CHUNK = 1 << 20  # tokens read at a time when looking for the next document start


class DocumentSequence:
    """The endless sequence of documents (see the module docstring); ``cursor`` is where it stands."""

    def __init__(self, stream: TokenStream, eot_id: int, seed: int, shuffle: bool) -> None:
        self.stream, self.eot_id, self.seed, self.shuffle = stream, eot_id, seed, shuffle
        self.n_shards = len(stream.arrays)
        self.cursor = (0, 0, 0)  # (epoch, slot in the epoch's shard order, index in the shard's document order)
        self._docs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._first_start: dict[int, int] = {}
        if self._next_start(0) == stream.n_tokens:
            raise UserError(
                f"the train shards ({stream.paths[0].parent}) hold no document start (token {eot_id}); "
                "document-aligned rows need documents written as [EOT] + tokens (prepare_fineweb.py)"
            )

    def next(self) -> tuple[int, int]:
        """The next document as ``(stream position of its EOT, length in tokens)``; advances the cursor."""
        epoch, slot, offset = self.cursor
        while True:
            if slot == self.n_shards:
                epoch, slot = epoch + 1, 0
            shard = self._shard_order(epoch)[slot]
            starts, lengths = self.documents(shard)
            if offset < len(starts):
                break
            slot, offset = slot + 1, 0
        i = int(self._perm(epoch, shard)[offset]) if self.shuffle else offset
        self.cursor = (epoch, slot, offset + 1)
        return int(starts[i]), int(lengths[i])

    def documents(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """Stream positions and lengths of the documents whose EOT lies in ``shard`` (cached)."""
        if shard not in self._docs:
            if len(self._docs) >= _SHARD_CACHE_SIZE:
                self._docs.pop(next(iter(self._docs)))  # the oldest entry
            first = int(self.stream.offsets[shard])
            starts = np.flatnonzero(self.stream.arrays[shard] == self.eot_id).astype(np.int64) + first
            ends = np.append(starts[1:], self._next_start(shard + 1))
            self._docs[shard] = (starts, ends - starts)
        return self._docs[shard]

    def _next_start(self, shard: int) -> int:
        """The first document start at or after the start of ``shard`` (the stream's end if there is none)."""
        if shard not in self._first_start:
            k, found = shard, self.stream.n_tokens
            while k < self.n_shards and found == self.stream.n_tokens:
                array = self.stream.arrays[k]
                for a in range(0, len(array), _SCAN_CHUNK):
                    hits = np.flatnonzero(array[a : a + _SCAN_CHUNK] == self.eot_id)
                    if len(hits):
                        found = int(self.stream.offsets[k]) + a + int(hits[0])
                        break
                k += 1
            self._first_start[shard] = found
        return self._first_start[shard]

    def _shard_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_shards)
        return np.random.default_rng((self.seed, epoch)).permutation(self.n_shards)

    def _perm(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self._perms:
            if len(self._perms) >= _SHARD_CACHE_SIZE:
                self._perms.pop(next(iter(self._perms)))
            n = len(self.documents(shard)[0])
            self._perms[key] = np.random.default_rng((self.seed, epoch, shard)).permutation(n)
        return self._perms[key]


class BestFitPacker:
    """Rows of ``capacity`` tokens packed best-fit from a buffer of documents (see the module docstring).

    The buffer is kept sorted by ``(length, arrival)``, so "the longest that fits, oldest first" and "the shortest,
    oldest first" are binary searches rather than scans of the whole buffer.
    """

    def __init__(self, documents: DocumentSequence, capacity: int, buffer_docs: int) -> None:
        self.documents, self.capacity, self.buffer_docs = documents, capacity, buffer_docs
        self.buffer: list[tuple[int, int, int]] = []  # (length, arrival, start), sorted
        self.arrivals = 0  # documents drawn so far
        self.rows = 0  # rows packed so far
        self.cropped = 0  # tokens dropped by crops so far

    def row(self) -> list[tuple[int, int]]:
        """The next row, as pieces ``(stream position, tokens)`` that fill exactly ``capacity`` tokens."""
        pieces, remaining = [], self.capacity
        while remaining:
            while len(self.buffer) < self.buffer_docs:
                start, length = self.documents.next()
                bisect.insort(self.buffer, (length, self.arrivals, start))
                self.arrivals += 1
            fits = bisect.bisect_right(self.buffer, (remaining, self.arrivals, 0)) - 1  # the longest that fits
            if fits >= 0:
                length = self.buffer[fits][0]
                length, _, start = self.buffer.pop(bisect.bisect_left(self.buffer, (length, -1, 0)))  # oldest
                pieces.append((start, length))
                remaining -= length
            else:  # nothing fits whole: crop the shortest, drop its rest
                length, _, start = self.buffer.pop(0)
                pieces.append((start, remaining))
                self.cropped += length - remaining
                remaining = 0
        self.rows += 1
        return pieces

    def state_dict(self) -> dict:
        return {
            "cursor": list(self.documents.cursor),
            "buffer": [list(entry) for entry in self.buffer],
            "arrivals": self.arrivals,
            "rows": self.rows,
            "cropped": self.cropped,
        }

    def load_state_dict(self, state: dict) -> None:
        self.documents.cursor = tuple(int(v) for v in state["cursor"])
        self.buffer = [tuple(int(v) for v in entry) for entry in state["buffer"]]
        self.arrivals, self.rows, self.cropped = int(state["arrivals"]), int(state["rows"]), int(state["cropped"])


class DocumentLoader:
    """This rank's micro-batches of document-aligned rows; ``grad_accum_steps`` calls make one global step.

    A drop-in for ``gpt2.data.TrainLoader`` (same constructor arguments and ``next_batch`` / ``grad_accum_steps`` /
    ``state_dict`` / ``load_state_dict``), plus ``eot_id``, ``buffer_docs`` and the ``cropped_fraction`` it reports.
    """

    def __init__(
        self,
        data_dir: str | Path,
        seq_len: int,
        batch_tokens: int,
        micro_batch: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 1337,
        shuffle: bool = True,
        vocab_size: int = 50257,
        device: str = "cpu",
        eot_id: int = EOT_ID,
        buffer_docs: int = BUFFER_DOCS,
    ) -> None:
        _check_positive(seq_len=seq_len, batch_tokens=batch_tokens, micro_batch=micro_batch, world_size=world_size,
                        buffer_docs=buffer_docs)  # fmt: skip
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        if seed < 0:
            raise UserError(f"--seed must be >= 0, got {seed}")
        self.seq_len, self.batch_tokens, self.micro_batch = seq_len, batch_tokens, micro_batch
        self.rank, self.world_size, self.seed, self.shuffle, self.device = rank, world_size, seed, shuffle, device
        self.eot_id, self.buffer_docs = eot_id, buffer_docs
        self.rows_per_step = _windows_per_step(seq_len, batch_tokens, micro_batch, world_size)
        self.grad_accum_steps = self.rows_per_step // (micro_batch * world_size)
        self.stream = TokenStream(list_shards(data_dir, "train"), vocab_size)
        self.packer = BestFitPacker(DocumentSequence(self.stream, eot_id, seed, shuffle), seq_len + 1, buffer_docs)
        self.step = 0  # the global step the next batch belongs to
        self.micro_step = 0  # how many of this step's micro-batches have been handed out
        self._rows: list[list[tuple[int, int]]] = []  # the current step's global rows, once packed

    @property
    def train_tokens(self) -> int:
        return self.stream.n_tokens

    @property
    def epoch(self) -> int:
        """Epochs of the document sequence completed before the next document is drawn."""
        return self.packer.documents.cursor[0]

    @property
    def cropped_fraction(self) -> float:
        """Of the document tokens taken out of the buffer so far, the fraction dropped by crops (0 before any)."""
        used = self.packer.rows * (self.seq_len + 1)
        return self.packer.cropped / (used + self.packer.cropped) if used else 0.0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch: ``x``, ``y`` int64 ``(micro_batch, seq_len)`` on the device."""
        if self.micro_step == 0:
            self._rows = [self.packer.row() for _ in range(self.rows_per_step)]
        first = (self.rank * self.grad_accum_steps + self.micro_step) * self.micro_batch
        x, y = _host_buffers((self.micro_batch, self.seq_len), self.device)
        row = np.empty(self.seq_len + 1, dtype=np.int64)
        for b, pieces in enumerate(self._rows[first : first + self.micro_batch]):
            at = 0
            for start, n in pieces:
                self.stream.read_into(start, row[at : at + n])
                at += n
            self._check_vocab(row, pieces)
            x[b], y[b] = torch.from_numpy(row[:-1]), torch.from_numpy(row[1:])
        self.micro_step += 1
        if self.micro_step == self.grad_accum_steps:
            self.step, self.micro_step, self._rows = self.step + 1, 0, []
        return _to_device(x, y, self.device)

    def _check_vocab(self, row: np.ndarray, pieces: list[tuple[int, int]]) -> None:
        if row.max() < self.stream.vocab_size:
            return
        at = int(np.argmax(row >= self.stream.vocab_size))
        ends = np.cumsum([n for _, n in pieces])
        piece = int(np.searchsorted(ends, at, side="right"))  # the piece holding the row's first bad token
        raise self.stream.vocab_error(pieces[piece][0] + at - (int(ends[piece - 1]) if piece else 0))

    def _identity(self) -> dict:
        """What fixes the meaning of a step: a resume must agree on all of it."""
        return {
            "layout": "documents",
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "batch_tokens": self.batch_tokens,
            "buffer_docs": self.buffer_docs,
            "eot_id": self.eot_id,
            "train_tokens": self.train_tokens,
        }

    def state_dict(self) -> dict:
        """The position (the next global step, the packer's state) and the run's identity: plain ints and lists of
        them, the same on every rank."""
        check_between_steps(self)
        return {"step": self.step, **self._identity(), "packer": self.packer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue with the global step after the saved one; refuse a state that belongs to a different run."""
        check_same_run(state, self._identity(), {"seed": "--seed", "shuffle": "shuffle", "seq_len": "--seq-len",
                                                 "batch_tokens": "--batch-tokens", "buffer_docs": "--buffer-docs",
                                                 "eot_id": "eot_id"})  # fmt: skip
        self.packer.load_state_dict(state["packer"])
        self.step, self.micro_step, self._rows = int(state["step"]), 0, []
