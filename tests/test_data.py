"""The sharded loader: windows tile the stream across shard boundaries, a step's windows do not depend on
the world size or the micro-batch size, state round-trips exactly, validation is the same on any world size,
and bad data gives one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support import tiny_model

from gpt2.data import TrainLoader, ValLoader, list_shards
from gpt2.errors import UserError

SEQ_LEN = 8
# Train shards of uneven lengths (none a multiple of SEQ_LEN, one shorter than a window) so windows span boundaries.
TRAIN_SHARD_TOKENS = (203, 5, 150, 161)
VAL_TOKENS_ON_DISK = 300


def make_data(directory: Path, train_sizes=TRAIN_SHARD_TOKENS, val_tokens=VAL_TOKENS_ON_DISK) -> np.ndarray:
    """Write shards whose token at stream position p is p (unique, so a window reveals where it came from).

    Returns the train stream, the independent reference the loader's windows are compared with.
    """
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "val_000000.npy", (np.arange(val_tokens) + 40000).astype(np.uint16))
    stream = np.arange(sum(train_sizes), dtype=np.int64)
    for index, piece in enumerate(np.split(stream, np.cumsum(train_sizes)[:-1]), start=1):
        np.save(directory / f"train_{index:06d}.npy", piece.astype(np.uint16))
    return stream


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    make_data(tmp_path / "data")
    return tmp_path / "data"


def global_step_batches(data_dir: Path, world_size: int, micro_batch: int, steps: int, **kw) -> list[list[tuple]]:
    """Per global step, the sorted windows (rows of x+last y) that all simulated ranks together read."""
    batch_tokens = kw.pop("batch_tokens", 4 * SEQ_LEN)
    loaders = [
        TrainLoader(data_dir, SEQ_LEN, batch_tokens, micro_batch, rank=r, world_size=world_size, **kw)
        for r in range(world_size)
    ]
    result = []
    for _ in range(steps):
        windows = []
        for loader in loaders:
            for _ in range(loader.grad_accum_steps):
                x, y = loader.next_batch()
                assert x.shape == y.shape == (micro_batch, SEQ_LEN) and x.dtype == y.dtype == torch.int64
                assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
                windows += [tuple(row) for row in torch.cat([x, y[:, -1:]], dim=1).tolist()]
        result.append(sorted(windows))
    return result


def test_list_shards_orders_by_index_and_ignores_other_files(tmp_path: Path) -> None:
    for name in ("train_000010.npy", "train_000002.npy", "val_000000.npy", "train_000003.npy.tmp", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_shards(tmp_path, "train")] == ["train_000002.npy", "train_000010.npy"]
    assert [p.name for p in list_shards(tmp_path, "val")] == ["val_000000.npy"]


def test_windows_tile_the_stream_across_shard_boundaries(data_dir: Path) -> None:
    stream = np.arange(sum(TRAIN_SHARD_TOKENS))
    loader = TrainLoader(data_dir, SEQ_LEN, 4 * SEQ_LEN, 2, shuffle=False)
    assert isinstance(loader.stream.arrays[0], np.memmap)  # memory-mapped, never loaded whole
    n_windows = (len(stream) - 1) // SEQ_LEN
    assert loader.n_windows == n_windows
    seen = []
    while len(seen) < n_windows:
        x, y = loader.next_batch()
        seen += [(x[b].numpy(), y[b].numpy()) for b in range(len(x))]
    # Unshuffled, window i is stream[i*T : i*T + T + 1], including those that straddle a shard (203, 208, 358).
    for i, (x, y) in enumerate(seen[:n_windows]):
        np.testing.assert_array_equal(x, stream[i * SEQ_LEN : (i + 1) * SEQ_LEN])
        np.testing.assert_array_equal(y, stream[i * SEQ_LEN + 1 : (i + 1) * SEQ_LEN + 1])
    # Every token of the stream is an input once per epoch (all but the final remainder < T tokens).
    inputs = np.concatenate([x for x, _ in seen[:n_windows]])
    np.testing.assert_array_equal(np.sort(inputs), stream[: n_windows * SEQ_LEN])
    assert len(stream) - n_windows * SEQ_LEN <= SEQ_LEN


@pytest.mark.parametrize("shuffle", [False, True])
def test_step_windows_identical_for_any_world_size_and_micro_batch(data_dir: Path, shuffle: bool) -> None:
    # 6 windows a step; 13 steps cross the end of the 64-window epoch in the middle of step 10.
    steps, batch_tokens = 13, 6 * SEQ_LEN
    reference = global_step_batches(data_dir, 1, 1, steps, shuffle=shuffle, batch_tokens=batch_tokens)
    for world_size, micro_batch in [(2, 1), (3, 1), (6, 1), (1, 6), (2, 3), (3, 2), (1, 3)]:
        other = global_step_batches(
            data_dir, world_size, micro_batch, steps, shuffle=shuffle, batch_tokens=batch_tokens
        )
        assert other == reference, (world_size, micro_batch)
    # ...and they change with the seed when shuffling (the seed is what the order depends on).
    reseeded = global_step_batches(data_dir, 1, 6, steps, shuffle=shuffle, batch_tokens=batch_tokens, seed=7)
    assert (reseeded == reference) is not shuffle


def test_shuffled_epochs_visit_every_window_once_in_a_new_order(data_dir: Path) -> None:
    loader = TrainLoader(data_dir, SEQ_LEN, 6 * SEQ_LEN, 3, seed=3)
    n = loader.n_windows  # 64, not a multiple of the 6 windows of a step: epochs end mid-step
    starts = []
    while len(starts) < 2 * n:
        x, _ = loader.next_batch()
        starts += (x[:, 0] // SEQ_LEN).tolist()
    epochs = [starts[:n], starts[n : 2 * n]]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))  # each window exactly once per epoch
    assert epochs[0] != list(range(n)) and epochs[1] != epochs[0]  # shuffled, and re-shuffled per epoch
    # Shards are visited one after another: a shard's windows are contiguous in the epoch's order.
    owner = np.searchsorted(np.cumsum(TRAIN_SHARD_TOKENS), np.array(epochs[0]) * SEQ_LEN, side="right")
    assert np.count_nonzero(np.diff(owner)) == len(set(owner.tolist())) - 1


def test_state_round_trip_resumes_at_the_next_window_on_another_world_size(data_dir: Path, tmp_path: Path) -> None:
    batch_tokens = 4 * SEQ_LEN
    first = TrainLoader(data_dir, SEQ_LEN, batch_tokens, 2)
    for _ in range(5 * first.grad_accum_steps):
        first.next_batch()
    torch.save({"loader": first.state_dict()}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)["loader"]
    assert state["step"] == 5

    def step_x(loaders: list[TrainLoader]) -> torch.Tensor:
        """One global step's inputs, rank by rank and micro-step by micro-step (= position order)."""
        return torch.cat([loader.next_batch()[0] for loader in loaders for _ in range(loader.grad_accum_steps)])

    expected = [step_x([first]) for _ in range(14)]  # crosses the epoch end at step 16
    # Resume on 2 ranks with micro-batch 1, and again on 1 rank: both continue with step 5's windows.
    for world_size, micro_batch in [(2, 1), (1, 4)]:
        loaders = [
            TrainLoader(data_dir, SEQ_LEN, batch_tokens, micro_batch, rank=r, world_size=world_size)
            for r in range(world_size)
        ]
        for loader in loaders:
            loader.load_state_dict(state)
        assert [step_x(loaders).tolist() for _ in range(14)] == [e.tolist() for e in expected]


def test_state_dict_refuses_mid_step_and_load_refuses_another_run(data_dir: Path, tmp_path: Path) -> None:
    loader = TrainLoader(data_dir, SEQ_LEN, 4 * SEQ_LEN, 2)
    state = loader.state_dict()
    loader.next_batch()
    with pytest.raises(RuntimeError, match="between optimizer steps"):
        loader.state_dict()
    with pytest.raises(UserError, match=r"--seq-len 8 \(now 4\)"):
        TrainLoader(data_dir, 4, 4 * SEQ_LEN, 2).load_state_dict(state)
    with pytest.raises(UserError, match=r"--seed 1337 \(now 1\)"):
        TrainLoader(data_dir, SEQ_LEN, 4 * SEQ_LEN, 2, seed=1).load_state_dict(state)
    with pytest.raises(UserError, match=r"--batch-tokens 32 \(now 64\)"):
        TrainLoader(data_dir, SEQ_LEN, 8 * SEQ_LEN, 2).load_state_dict(state)
    make_data(tmp_path / "other", train_sizes=(203, 5, 150, 170))
    with pytest.raises(UserError, match="same data"):
        TrainLoader(tmp_path / "other", SEQ_LEN, 4 * SEQ_LEN, 2).load_state_dict(state)


def val_windows(data_dir: Path, world_size: int, micro_batch: int, val_tokens: int) -> tuple[list, list]:
    """(real windows of all ranks in rank order, per-rank batch counts) of one validation pass."""
    windows, counts = [], []
    for rank in range(world_size):
        loader = ValLoader(data_dir, SEQ_LEN, val_tokens, micro_batch, rank=rank, world_size=world_size)
        batches = list(loader)
        assert len(batches) == len(loader)
        counts.append(len(batches))
        for x, y in batches:
            assert x.shape == y.shape == (micro_batch, SEQ_LEN)
            real = (y >= 0).all(dim=1)
            assert real[0] and torch.equal(real | (y == -1).all(dim=1), torch.ones_like(real))  # real rows, then pad
            windows += x[real].tolist()
    return windows, counts


def test_val_windows_are_fixed_and_split_exactly_across_ranks(data_dir: Path) -> None:
    val_tokens = 100  # 12 whole windows: tokens 40000 .. 40096, plus one target
    reference, _ = val_windows(data_dir, 1, 4, val_tokens)
    assert reference == [list(range(40000 + i * SEQ_LEN, 40000 + (i + 1) * SEQ_LEN)) for i in range(12)]
    for world_size, micro_batch in [(2, 4), (5, 2), (12, 1), (3, 5)]:
        windows, counts = val_windows(data_dir, world_size, micro_batch, val_tokens)
        assert windows == reference, (world_size, micro_batch)
        assert max(counts) - min(counts) <= 1  # balanced shares
    again, _ = val_windows(data_dir, 1, 4, val_tokens)
    assert again == reference


def test_val_loss_is_the_same_on_one_rank_and_on_five(data_dir: Path) -> None:
    model = tiny_model(vocab_size=50257, block_size=SEQ_LEN).eval()

    def mean_loss(world_size: int, micro_batch: int) -> float:
        total, count = 0.0, 0
        for rank in range(world_size):
            for x, y in ValLoader(data_dir, SEQ_LEN, 100, micro_batch, rank=rank, world_size=world_size):
                with torch.no_grad():
                    _, loss = model(x, y)
                n = int((y >= 0).sum())
                total, count = total + loss.item() * n, count + n
        return total / count

    assert mean_loss(5, 2) == pytest.approx(mean_loss(1, 12), rel=1e-5)


def write(directory: Path, name: str, array: np.ndarray) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / name, array)
    return directory


def truncate(path: Path) -> Path:
    """A shard cut short, as by a copy or download that died half-way."""
    path.write_bytes(path.read_bytes()[:1000])
    return path.parent


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda d: d / "missing", "does not exist; run prepare_fineweb.py"),
        (lambda d: write(d, "val_000000.npy", np.zeros(9, np.uint16)), r"no train shards .* run prepare_fineweb.py"),
        (lambda d: write(d, "train_000001.npy", np.zeros(99, np.int32)), "int32 .* expected a 1-D uint16"),
        (lambda d: write(d, "train_000001.npy", np.zeros((9, 9), np.uint16)), r"\(9, 9\); expected a 1-D uint16"),
        (lambda d: write(d, "train_000001.npy", np.zeros(32, np.uint16)), "too few for one global batch"),
        (lambda d: write(d, "train_000001.npy", np.full(99, 50257, np.uint16)), "token id 50257 at offset"),
        (
            lambda d: truncate(write(d, "train_000001.npy", np.zeros(999, np.uint16)) / "train_000001.npy"),
            "cannot read",
        ),
    ],
)
def test_bad_train_data_is_one_clear_error(tmp_path: Path, build, match: str) -> None:
    data_dir = build(tmp_path)
    with pytest.raises(UserError, match=match):
        TrainLoader(data_dir, SEQ_LEN, 4 * SEQ_LEN, 2).next_batch()


def test_out_of_vocab_token_names_the_shard_and_offset(data_dir: Path) -> None:
    tokens = np.load(data_dir / "train_000003.npy")
    tokens[17] = 60000
    np.save(data_dir / "train_000003.npy", tokens)
    loader = TrainLoader(data_dir, SEQ_LEN, 4 * SEQ_LEN, 4, shuffle=False)
    with pytest.raises(UserError, match=r"train_000003.npy holds token id 60000 at offset 17"):
        for _ in range(loader.n_windows):
            loader.next_batch()


def test_other_bad_inputs_are_one_clear_error(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "train_000001.npy").write_text("not numpy")
    with pytest.raises(UserError, match="cannot read shard"):
        TrainLoader(tmp_path / "garbage", SEQ_LEN, 4 * SEQ_LEN, 2)
    with pytest.raises(UserError, match=r"--batch-tokens 40 must be a multiple of --seq-len 8 x --micro-batch 2"):
        TrainLoader(data_dir, SEQ_LEN, 5 * SEQ_LEN, 2)
    with pytest.raises(UserError, match=r"--batch-tokens 32 must be a multiple .* 3 rank\(s\)"):
        TrainLoader(data_dir, SEQ_LEN, 4 * SEQ_LEN, 1, world_size=3)
    with pytest.raises(UserError, match=r"val split .* has 300 tokens, fewer than --val-tokens 304"):
        ValLoader(data_dir, SEQ_LEN, 304, 2)
    with pytest.raises(UserError, match="less than one sequence"):
        ValLoader(data_dir, SEQ_LEN, SEQ_LEN - 1, 2)
    with pytest.raises(UserError, match="--micro-batch must be positive"):
        ValLoader(data_dir, SEQ_LEN, 64, 0)


def test_manifest_must_be_complete_and_match_the_shards(data_dir: Path) -> None:
    entries = [
        {"file": f"train_{i:06d}.npy", "split": "train", "tokens": n} for i, n in enumerate(TRAIN_SHARD_TOKENS, 1)
    ]
    entries.append({"file": "val_000000.npy", "split": "val", "tokens": VAL_TOKENS_ON_DISK})
    manifest = data_dir / "manifest.json"
    manifest.write_text(json.dumps({"complete": True, "shards": entries}))
    assert len(list_shards(data_dir, "train")) == 4 and len(list_shards(data_dir, "val")) == 1
    manifest.write_text(json.dumps({"complete": False, "shards": entries}))
    with pytest.raises(UserError, match="incomplete .* re-run prepare_fineweb.py"):
        TrainLoader(data_dir, SEQ_LEN, 4 * SEQ_LEN, 2)
    manifest.write_text(json.dumps({"complete": True, "shards": entries}))
    (data_dir / "train_000003.npy").unlink()
    np.save(data_dir / "train_000009.npy", np.zeros(9, np.uint16))
    with pytest.raises(UserError, match="missing: train_000003.npy; not listed: train_000009.npy"):
        list_shards(data_dir, "train")
    manifest.write_text("{not json")
    with pytest.raises(UserError, match="cannot read .*manifest.json"):
        list_shards(data_dir, "val")
