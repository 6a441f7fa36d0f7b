"""The sharded, resumable token loader: memory-mapped uint16 shards in, ``(x, y)`` int64 batches out.

A data directory (written by ``prepare_fineweb.py``) holds ``val_000000.npy``, ``train_000001.npy``,
``train_000002.npy``, ... — each a 1-D uint16 array — and a ``manifest.json``. Shards are opened with
``np.load(mmap_mode="r")``: only the windows of a batch are ever converted to int64.

Training. The train stream is the concatenation of the train shards in index order, cut into windows of
``seq_len`` tokens: window ``i`` covers stream tokens ``[i * seq_len, i * seq_len + seq_len + 1)`` (one extra
token for the targets), so a window may span a shard boundary and no token is skipped; there are
``n_windows = (train_tokens - 1) // seq_len`` of them. A global (optimizer) step consumes
``W = batch_tokens // seq_len`` windows: step ``s`` takes positions ``g = s * W + j`` (``j < W``) of an endless
sequence of epochs, position ``g`` being entry ``g % n_windows`` of epoch ``g // n_windows``'s order. The set of
windows of a step therefore depends only on the step, the seed, ``seq_len`` and ``batch_tokens``; ranks and
micro-steps merely split it (rank ``r`` owns the ``r``-th contiguous block of ``W / world_size`` positions, and
its micro-step ``m`` the ``m``-th block of ``micro_batch`` within that), so a run can move between cluster sizes
and micro-batch sizes and remain the same run.

Shuffling (on for training by default) re-permutes, every epoch, the order of the shards and the order of the
windows owned by each shard (a window belongs to the shard holding its first token). This needs one small
permutation per shard (~100k windows for a 100M-token shard), created on demand and cached, instead of a
permutation of all ~10M windows of a 10B-token corpus; and a rank reads one shard at a time, which keeps the
page cache warm. Each permutation is a pure function of ``(seed, epoch[, shard])``, so any position can be
computed directly: resuming is just setting the step.

Validation. ``ValLoader`` reads the first ``val_tokens`` (+1) tokens of the val split, cut into
``val_tokens // seq_len`` windows, the same on every pass and for every world size; each rank gets a contiguous
share (shares differ by at most one window). Batches always have shape ``(micro_batch, seq_len)``, so a compiled
model sees one shape; a rank's last batch may be partly padding, rows with ``x = 0`` and ``y = -1`` (the model's
ignore_index). Every batch holds at least one real window, so its mean loss is finite: weight it by the count of
``y >= 0`` targets, and all-reduce the sum and the count once after the pass for the exact mean. The number of
batches can differ by one between ranks, so run no collective per batch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gpt2.errors import UserError

SPLITS = ("train", "val")
SHARD_DTYPE = np.uint16
PAD_TARGET = -1  # the model's CrossEntropy ignore_index
_SHARD_NAME = re.compile(r"^(train|val)_(\d{6})\.npy$")
_PERM_CACHE_SIZE = 4  # per-shard permutations kept: the current shard, its neighbour across an epoch end, spare


def list_shards(data_dir: str | Path, split: str) -> list[Path]:
    """The ``split`` ("train" or "val") shards of ``data_dir``, in index order; ``UserError`` if there are none."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} does not exist; run prepare_fineweb.py to create it")
    numbered = []
    for path in data_dir.iterdir():
        match = _SHARD_NAME.match(path.name)
        if match and match.group(1) == split:
            numbered.append((int(match.group(2)), path))
    if not numbered:
        raise UserError(f"no {split} shards ({split}_NNNNNN.npy) in {data_dir}; run prepare_fineweb.py to create them")
    shards = [path for _, path in sorted(numbered)]
    _check_manifest(data_dir, split, shards)
    return shards


def _check_manifest(data_dir: Path, split: str, shards: list[Path]) -> None:
    """Where prepare_fineweb.py left a manifest, the directory must be complete and hold exactly its shards.

    An interrupted preparation, or a shard deleted or added by hand, would silently change the stream.
    """
    path = data_dir / "manifest.json"
    if not path.exists():
        return
    try:
        manifest = json.loads(path.read_text())
        listed = {Path(entry["file"]).name for entry in manifest.get("shards", []) if entry.get("split") == split}
    except (OSError, ValueError, AttributeError, TypeError, KeyError) as e:
        raise UserError(f"cannot read {path}: {e!r}") from e
    if manifest.get("complete") is not True:
        raise UserError(f"{data_dir} is incomplete (manifest.json says complete: false); re-run prepare_fineweb.py")
    found = {shard.name for shard in shards}
    if "shards" in manifest and found != listed:
        missing, extra = sorted(listed - found), sorted(found - listed)
        raise UserError(
            f"the {split} shards in {data_dir} do not match manifest.json (missing: {', '.join(missing) or 'none'}; "
            f"not listed: {', '.join(extra) or 'none'}); re-run prepare_fineweb.py"
        )


class TokenStream:
    """The concatenation of some shards, memory-mapped, readable at any offset; reads return int64 copies."""

    def __init__(self, paths: list[Path], vocab_size: int) -> None:
        self.paths = paths
        self.vocab_size = vocab_size
        self.arrays = [_open_shard(path) for path in paths]
        # offsets[k] is the stream position of shard k's first token; offsets[-1] the total.
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays], dtype=np.int64)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def shard_of(self, position: int) -> int:
        """Index of the shard holding stream token ``position``."""
        return int(np.searchsorted(self.offsets, position, side="right")) - 1

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Copy stream tokens ``[start, start + len(out))`` into ``out``, crossing shard boundaries as needed."""
        k, done = self.shard_of(start), 0
        while done < len(out):
            local = start + done - int(self.offsets[k])
            chunk = self.arrays[k][local : local + len(out) - done]
            out[done : done + len(chunk)] = chunk
            done += len(chunk)
            k += 1

    def read_windows(self, starts: list[int], seq_len: int, x: np.ndarray, y: np.ndarray) -> None:
        """Fill row ``b`` of ``x``/``y`` (int64, ``(len(starts), seq_len)``) with the window at ``starts[b]``."""
        window = np.empty(seq_len + 1, dtype=np.int64)
        for b, start in enumerate(starts):
            self.read_into(start, window)
            x[b] = window[:-1]
            y[b] = window[1:]
        self._check_vocab(starts, x, y)

    def _check_vocab(self, starts: list[int], x: np.ndarray, y: np.ndarray) -> None:
        # A vectorised max over the batch is cheap; checking whole shards up front would read the corpus.
        if len(starts) == 0 or max(x.max(), y[:, -1].max()) < self.vocab_size:
            return
        rows, cols = np.nonzero(np.concatenate([x, y[:, -1:]], axis=1) >= self.vocab_size)
        raise self.vocab_error(starts[rows[0]] + int(cols[0]))

    def vocab_error(self, position: int) -> UserError:
        """The error for stream token ``position``, an id the model's vocabulary does not have."""
        k = self.shard_of(position)
        offset = position - int(self.offsets[k])
        return UserError(
            f"{self.paths[k]} holds token id {int(self.arrays[k][offset])} at offset {offset}, but the vocabulary "
            f"has only {self.vocab_size} ids; the shards were made with a different tokenizer"
        )


def _open_shard(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"cannot read shard {path}: {e}") from e
    if array.dtype != SHARD_DTYPE or array.ndim != 1:
        raise UserError(
            f"shard {path} is {array.dtype} with shape {array.shape}; expected a 1-D uint16 array "
            f"(re-create it with prepare_fineweb.py)"
        )
    return array


class EpochOrder:
    """Which window comes at each position of an endless sequence of epochs (see the module docstring)."""

    def __init__(self, window_starts: np.ndarray, n_windows: int, seed: int, shuffle: bool) -> None:
        # window_starts[k] = first window owned by shard k (the first whose start token lies in shard k).
        self.first = window_starts
        self.counts = np.diff(np.append(window_starts, n_windows))
        self.n_windows = n_windows
        self.seed = seed
        self.shuffle = shuffle
        self._epoch_plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def window(self, position: int) -> int:
        """The window index at global position ``position`` (``epoch = position // n_windows``)."""
        epoch, p = divmod(position, self.n_windows)
        if not self.shuffle:
            return p
        shard_order, ends = self._epoch_plan(epoch)
        slot = int(np.searchsorted(ends, p, side="right"))  # the slot-th shard of this epoch holds position p
        shard = int(shard_order[slot])
        offset = p - (int(ends[slot - 1]) if slot else 0)
        return int(self.first[shard]) + int(self._shard_perm(epoch, shard)[offset])

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._epoch_plans:
            shard_order = np.random.default_rng((self.seed, epoch)).permutation(len(self.counts))
            self._epoch_plans = {epoch: (shard_order, np.cumsum(self.counts[shard_order]))}
        return self._epoch_plans[epoch]

    def _shard_perm(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self._perms:
            if len(self._perms) >= _PERM_CACHE_SIZE:
                self._perms.pop(next(iter(self._perms)))  # the oldest entry
            self._perms[key] = np.random.default_rng((self.seed, epoch, shard)).permutation(int(self.counts[shard]))
        return self._perms[key]


def _host_buffers(shape: tuple[int, int], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh int64 host tensors for x and y: pinned when bound for CUDA, so the copy can be asynchronous.

    Fresh rather than reused: the caching host allocator only hands a pinned block out again once the
    asynchronous copy that read it has finished, so a batch still in flight is never overwritten.
    """
    pin = torch.device(device).type == "cuda"
    return tuple(torch.empty(shape, dtype=torch.int64, pin_memory=pin) for _ in range(2))


def _to_device(x: torch.Tensor, y: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.device(device).type == "cpu":
        return x, y
    non_blocking = x.is_pinned()
    return x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)


class TrainLoader:
    """This rank's micro-batches of the training stream; ``grad_accum_steps`` calls make one global step."""

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
    ) -> None:
        _check_positive(seq_len=seq_len, batch_tokens=batch_tokens, micro_batch=micro_batch, world_size=world_size)
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        if seed < 0:
            raise UserError(f"--seed must be >= 0, got {seed}")
        self.seq_len, self.batch_tokens, self.micro_batch = seq_len, batch_tokens, micro_batch
        self.rank, self.world_size, self.seed, self.shuffle, self.device = rank, world_size, seed, shuffle, device
        self.windows_per_step = _windows_per_step(seq_len, batch_tokens, micro_batch, world_size)
        self.grad_accum_steps = self.windows_per_step // (micro_batch * world_size)

        self.stream = TokenStream(list_shards(data_dir, "train"), vocab_size)
        self.n_windows = max(self.stream.n_tokens - 1, 0) // seq_len
        if self.n_windows < self.windows_per_step:
            raise UserError(
                f"the train split of {data_dir} has {self.stream.n_tokens:,} tokens, too few for one global batch "
                f"of --batch-tokens {batch_tokens:,} (+1 for the targets); lower --batch-tokens or add data"
            )
        # Shard k owns windows ceil(offsets[k] / seq_len) onwards (those whose first token lies in shard k).
        window_starts = np.minimum(-(-self.stream.offsets[:-1] // seq_len), self.n_windows)
        self.order = EpochOrder(window_starts, self.n_windows, seed, shuffle)
        self.step = 0  # the global step the next batch belongs to
        self.micro_step = 0  # how many of this step's micro-batches have been handed out

    @property
    def train_tokens(self) -> int:
        return self.stream.n_tokens

    @property
    def epoch(self) -> float:
        """Epochs completed before the next batch, as a fraction (for logging)."""
        return self.step * self.windows_per_step / self.n_windows

    def batch_windows(self, step: int, micro_step: int) -> list[int]:
        """The window indices of this rank's micro-batch ``micro_step`` of global step ``step``."""
        # The step owns positions [step * W, (step + 1) * W); rank r the r-th block of W / world_size of them.
        first = step * self.windows_per_step + (self.rank * self.grad_accum_steps + micro_step) * self.micro_batch
        return [self.order.window(g) for g in range(first, first + self.micro_batch)]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next micro-batch: ``x``, ``y`` int64 ``(micro_batch, seq_len)`` on the device."""
        starts = [w * self.seq_len for w in self.batch_windows(self.step, self.micro_step)]
        x, y = _host_buffers((self.micro_batch, self.seq_len), self.device)
        self.stream.read_windows(starts, self.seq_len, x.numpy(), y.numpy())
        self.micro_step += 1
        if self.micro_step == self.grad_accum_steps:
            self.step, self.micro_step = self.step + 1, 0
        return _to_device(x, y, self.device)

    def _identity(self) -> dict:
        """What fixes the meaning of a step: a resume must agree on all of it."""
        return {
            "layout": "windows",
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "batch_tokens": self.batch_tokens,
            "n_windows": self.n_windows,
            "train_tokens": self.train_tokens,
        }

    def state_dict(self) -> dict:
        """The position (the next global step) and the run's identity: plain ints, the same on every rank."""
        check_between_steps(self)
        return {"step": self.step, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        """Continue with the global step after the saved one; refuse a state that belongs to a different run."""
        check_same_run(state, self._identity(), {"seed": "--seed", "shuffle": "shuffle", "seq_len": "--seq-len",
                                                 "batch_tokens": "--batch-tokens"})  # fmt: skip
        self.step, self.micro_step = int(state["step"]), 0


LAYOUTS = {"windows": "windows of the token stream", "documents": "document-aligned rows"}


def check_between_steps(loader: TrainLoader) -> None:
    """A loader's state is a step boundary's: refuse to save one in the middle of a step's micro-batches."""
    if loader.micro_step != 0:
        raise RuntimeError(
            f"{type(loader).__name__}.state_dict() called after {loader.micro_step} of {loader.grad_accum_steps} "
            f"micro-batches of step {loader.step}; save only between optimizer steps"
        )


def check_same_run(state: dict, identity: dict, flags: dict[str, str]) -> None:
    """Refuse a loader ``state`` saved by a different run: another data layout, any of ``flags`` (state key ->
    the flag that sets it) different from this run's ``identity``, or other train data. States saved before
    layouts existed are windows'."""
    saved_layout, layout = state.get("layout", "windows"), identity["layout"]
    if saved_layout != layout:
        raise UserError(
            f"cannot resume the data order: the checkpoint was trained on {LAYOUTS.get(saved_layout, saved_layout)}, "
            f"this run on {LAYOUTS[layout]}; resume with the checkpoint's --data-layout"
        )
    mismatches = [f"{flag} {state.get(key)} (now {identity[key]})" for key, flag in flags.items()
                  if state.get(key) != identity[key]]  # fmt: skip
    if mismatches:
        raise UserError(
            f"cannot resume the data order: the checkpoint was made with {', '.join(mismatches)}; "
            f"resume with the checkpoint's settings"
        )
    if state.get("train_tokens") != identity["train_tokens"]:
        raise UserError(
            f"cannot resume the data order: the checkpoint was trained on {state.get('train_tokens')} train "
            f"tokens but the data directory now has {identity['train_tokens']}; point --data at the same data"
        )


class ValLoader:
    """This rank's share of the fixed validation windows; iterate once per evaluation (see module docstring)."""

    def __init__(
        self,
        data_dir: str | Path,
        seq_len: int,
        val_tokens: int,
        micro_batch: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int = 50257,
        device: str = "cpu",
    ) -> None:
        _check_positive(seq_len=seq_len, val_tokens=val_tokens, micro_batch=micro_batch, world_size=world_size)
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        if val_tokens < seq_len:
            raise UserError(f"--val-tokens {val_tokens:,} is less than one sequence (--seq-len {seq_len})")
        self.seq_len, self.micro_batch, self.device = seq_len, micro_batch, device
        self.stream = TokenStream(list_shards(data_dir, "val"), vocab_size)
        self.n_windows = val_tokens // seq_len
        if self.stream.n_tokens < self.n_windows * seq_len + 1:
            raise UserError(
                f"the val split of {data_dir} has {self.stream.n_tokens:,} tokens, fewer than --val-tokens "
                f"{val_tokens:,} (+1 for the targets); lower --val-tokens"
            )
        # Contiguous, balanced shares: rank r evaluates windows [first, last).
        self.first = rank * self.n_windows // world_size
        self.last = (rank + 1) * self.n_windows // world_size

    @property
    def tokens(self) -> int:
        """Target tokens evaluated over all ranks: ``val_tokens`` rounded down to whole windows."""
        return self.n_windows * self.seq_len

    def __len__(self) -> int:
        """This rank's number of batches (zero when there are more ranks than windows)."""
        return -(-(self.last - self.first) // self.micro_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``len(self)`` batches ``(x, y)`` of shape ``(micro_batch, seq_len)``; padding rows have y = -1."""
        for first in range(self.first, self.last, self.micro_batch):
            windows = range(first, min(first + self.micro_batch, self.last))
            x, y = _host_buffers((self.micro_batch, self.seq_len), self.device)
            x_np, y_np = x.numpy(), y.numpy()
            n = len(windows)
            self.stream.read_windows([w * self.seq_len for w in windows], self.seq_len, x_np[:n], y_np[:n])
            x_np[n:], y_np[n:] = 0, PAD_TARGET
            yield _to_device(x, y, self.device)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _windows_per_step(seq_len: int, batch_tokens: int, micro_batch: int, world_size: int) -> int:
    """Windows in one global step; the batch must split evenly into ranks x micro-steps x micro-batches."""
    per_pass = micro_batch * world_size
    if batch_tokens % seq_len or (batch_tokens // seq_len) % per_pass:
        raise UserError(
            f"--batch-tokens {batch_tokens:,} must be a multiple of --seq-len {seq_len} x --micro-batch "
            f"{micro_batch} x {world_size} rank(s) = {seq_len * per_pass:,} tokens"
        )
    return batch_tokens // seq_len
