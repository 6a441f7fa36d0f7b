"""The document-aligned loader: rows equal nanochat's best-fit packing written out plainly here, every row starts at
a document start, a step's rows do not depend on the world size or the micro-batch size, state round-trips exactly
(onto another world size too), shuffling visits every document once per epoch, and the cropped fraction is what the
rows say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2.data import TrainLoader
from gpt2.documents import DocumentLoader
from gpt2.errors import UserError

EOT = 50256
SEQ_LEN = 16


def make_documents(directory: Path, n_docs: int = 120, seed: int = 0, shard_tokens: int = 333) -> list[list[int]]:
    """Shards of ``[EOT] + tokens`` documents of varied lengths (some longer than a row), cut every ``shard_tokens``
    tokens regardless of document boundaries (as prepare_fineweb.py does), behind 7 tokens of a document that began
    before the data (which belong to no whole document). Returns the documents, the reference's input."""
    rng = np.random.default_rng(seed)
    docs, counter = [], 0
    for _ in range(n_docs):
        n = int(rng.choice([rng.integers(1, 8), rng.integers(8, 2 * SEQ_LEN), rng.integers(2 * SEQ_LEN, 4 * SEQ_LEN)]))
        docs.append([EOT] + [(counter + i) % 50000 for i in range(n)])
        counter += n
    stream = np.array([1, 2, 3, 4, 5, 6, 7] + [t for doc in docs for t in doc], dtype=np.uint16)
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "val_000000.npy", stream[:100])
    for i, a in enumerate(range(0, len(stream), shard_tokens), start=1):
        np.save(directory / f"train_{i:06d}.npy", stream[a : a + shard_tokens])
    return docs


def nanochat_rows(docs: list[list[int]], n_rows: int, capacity: int, buffer_size: int) -> tuple[list[list[int]], int]:
    """nanochat's best-fit loop (``tokenizing_distributed_data_loader_with_state_bos_bestfit``), documents in stream
    order, endlessly, and the buffer topped up one document at a time: (rows, tokens cropped away)."""
    source = (doc for _ in iter(int, 1) for doc in docs)
    buffer, rows, cropped = [], [], 0
    for _ in range(n_rows):
        row = []
        while len(row) < capacity:
            while len(buffer) < buffer_size:
                buffer.append(next(source))
            remaining = capacity - len(row)
            best, best_len = -1, 0
            for i, doc in enumerate(buffer):
                if best_len < len(doc) <= remaining:
                    best, best_len = i, len(doc)
            if best >= 0:
                row += buffer.pop(best)
            else:
                shortest = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                doc = buffer.pop(shortest)
                row += doc[:remaining]
                cropped += len(doc) - remaining
        rows.append(row)
    return rows, cropped


def step_rows(loaders: list[DocumentLoader]) -> list[list[int]]:
    """One global step's rows (x + last y), rank by rank and micro-step by micro-step (= row order)."""
    rows = []
    for loader in loaders:
        for _ in range(loader.grad_accum_steps):
            x, y = loader.next_batch()
            assert x.dtype == y.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
            rows += torch.cat([x, y[:, -1:]], dim=1).tolist()
    return rows


def loaders(data: Path, world_size: int, micro_batch: int, batch_tokens: int = 6 * SEQ_LEN, **kw):
    return [
        DocumentLoader(data, SEQ_LEN, batch_tokens, micro_batch, rank=r, world_size=world_size, **kw)
        for r in range(world_size)
    ]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    make_documents(tmp_path / "data")
    return tmp_path / "data"


@pytest.mark.parametrize("buffer_docs", [1, 5, 32])
def test_rows_equal_nanochats_best_fit_and_start_at_a_document(tmp_path: Path, buffer_docs: int) -> None:
    docs = make_documents(tmp_path / "data")
    steps, per_step = 30, 6  # 180 rows of 17 tokens: past the end of the first epoch (~2,900 tokens)
    reference, cropped = nanochat_rows(docs, steps * per_step, SEQ_LEN + 1, buffer_docs)
    (loader,) = loaders(tmp_path / "data", 1, 3, shuffle=False, buffer_docs=buffer_docs)
    rows = [row for _ in range(steps) for row in step_rows([loader])]
    assert rows == reference
    assert all(row[0] == EOT for row in rows)
    assert loader.cropped_fraction == cropped / (cropped + len(rows) * (SEQ_LEN + 1))
    assert 0 < loader.cropped_fraction < 1


@pytest.mark.parametrize("shuffle", [False, True])
def test_step_rows_identical_for_any_world_size_and_micro_batch(data: Path, shuffle: bool) -> None:
    def run(world_size: int, micro_batch: int, **kw) -> list[list[list[int]]]:
        ranks = loaders(data, world_size, micro_batch, shuffle=shuffle, **kw)
        return [step_rows(ranks) for _ in range(25)]  # into the second epoch

    reference = run(1, 6)
    for world_size, micro_batch in [(2, 1), (3, 2), (6, 1), (1, 2)]:
        assert run(world_size, micro_batch) == reference, (world_size, micro_batch)
    assert (run(1, 6, seed=7) == reference) is not shuffle  # the seed is what the order depends on


def test_shuffled_epochs_draw_every_document_once_in_a_new_order(tmp_path: Path) -> None:
    docs = make_documents(tmp_path / "data")
    (loader,) = loaders(tmp_path / "data", 1, 6, shuffle=True, seed=3)
    sequence = loader.packer.documents
    stream = np.concatenate([np.load(p) for p in sorted((tmp_path / "data").glob("train_*.npy"))]).astype(np.int64)
    epochs = [[sequence.next() for _ in docs] for _ in range(2)]
    for epoch in epochs:
        assert sorted(stream[s : s + n].tolist() for s, n in epoch) == sorted(docs)  # each document exactly once
    assert [s for s, _ in epochs[0]] != sorted(s for s, _ in epochs[0]) and epochs[0] != epochs[1]


def test_state_round_trip_resumes_bit_identically_on_another_world_size(data: Path, tmp_path: Path) -> None:
    (first,) = loaders(data, 1, 2, buffer_docs=8)
    for _ in range(7):
        step_rows([first])
    torch.save({"loader": first.state_dict()}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)["loader"]
    assert state["step"] == 7
    fraction = first.cropped_fraction
    expected = [step_rows([first]) for _ in range(30)]  # well into the second epoch
    for world_size, micro_batch in [(2, 1), (3, 2), (1, 6)]:
        ranks = loaders(data, world_size, micro_batch, buffer_docs=8)
        for loader in ranks:
            loader.load_state_dict(state)
        assert ranks[0].cropped_fraction == fraction
        assert [step_rows(ranks) for _ in range(30)] == expected, (world_size, micro_batch)


def test_state_dict_refuses_mid_step_and_load_refuses_another_run_or_layout(data: Path, tmp_path: Path) -> None:
    (loader,) = loaders(data, 1, 2)
    state = loader.state_dict()
    loader.next_batch()
    with pytest.raises(RuntimeError, match="between optimizer steps"):
        loader.state_dict()
    (other_seed,) = loaders(data, 1, 2, seed=1)
    with pytest.raises(UserError, match=r"--seed 1337 \(now 1\)"):
        other_seed.load_state_dict(state)
    (other_buffer,) = loaders(data, 1, 2, buffer_docs=10)
    with pytest.raises(UserError, match=r"--buffer-docs 1000 \(now 10\)"):
        other_buffer.load_state_dict(state)
    windows = TrainLoader(data, SEQ_LEN, 6 * SEQ_LEN, 2)
    with pytest.raises(UserError, match="--data-layout"):
        windows.load_state_dict(state)
    with pytest.raises(UserError, match="--data-layout"):
        loader.load_state_dict(windows.state_dict())
    make_documents(tmp_path / "more", n_docs=130)
    (more,) = loaders(tmp_path / "more", 1, 2)
    with pytest.raises(UserError, match="same data"):
        more.load_state_dict(state)


def test_data_without_documents_or_with_foreign_tokens_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "none").mkdir()
    np.save(tmp_path / "none" / "val_000000.npy", np.arange(50, dtype=np.uint16))
    np.save(tmp_path / "none" / "train_000001.npy", np.arange(500, dtype=np.uint16))
    with pytest.raises(UserError, match="no document start"):
        DocumentLoader(tmp_path / "none", SEQ_LEN, 2 * SEQ_LEN, 2)
    make_documents(tmp_path / "data")
    (loader,) = loaders(tmp_path / "data", 1, 6, vocab_size=1000)
    with pytest.raises(UserError, match=r"train_0000\d\d\.npy holds token id \d+ at offset \d+"):
        loader.next_batch()


def test_the_trainer_resumes_a_document_aligned_run_bit_identically(tmp_path: Path) -> None:
    """Through the trainer and its checkpoints (--data-layout documents): a run stopped after step 4 and resumed
    logs the losses of an uninterrupted run, and each train record says how much the packing cropped."""
    from support import Capture, losses, read_log, tiny

    from gpt2.trainer import StopRequest, train

    make_documents(tmp_path / "data", n_docs=400)
    run = dict(vocab_size=50257, seq_len=SEQ_LEN, batch_tokens=4 * SEQ_LEN, max_steps=9, eval_every=3,
               val_tokens=4 * SEQ_LEN, save_every=2, data_layout="documents", buffer_docs=16)  # fmt: skip
    train(tiny(tmp_path / "data", tmp_path / "straight", **run))
    stop = StopRequest()
    train(tiny(tmp_path / "data", tmp_path / "resumed", **run), Capture(stop, stop_after=4), stop)
    train(tiny(tmp_path / "data", tmp_path / "resumed", **run))
    assert all(0 < r["cropped"] < 1 for r in read_log(tmp_path / "straight") if r["kind"] == "train")
    for kind in ("train", "val"):
        assert losses(read_log(tmp_path / "resumed"), kind) == losses(read_log(tmp_path / "straight"), kind)
