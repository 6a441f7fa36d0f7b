"""Document-aligned rows on a real corpus: the fraction of tokens cropped away, how many documents a row holds,
and the loader's speed, per sequence length and buffer size.

Tokenizes ``--input`` (default: the shared OpenStax textbooks, ~7.3M tokens) into shards with ``gpt2.prepare`` once
(cached in ``--work``), then draws ``--rows`` rows with ``gpt2.documents.DocumentLoader`` for each setting. The
cropped fraction is what ``DocumentLoader.cropped_fraction`` reports: of the document tokens taken out of the
buffer, the share dropped because a document was cut to fill a row.

    .venv/bin/python bench/bench_documents.py --seq-len 256 512 1024 --buffer-docs 1000 100
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from gpt2.data import list_shards
from gpt2.documents import DocumentLoader
from gpt2.errors import run_cli
from gpt2.prepare import PrepareConfig, prepare
from gpt2.tokenizer import EOT_ID


def prepare_data(input_path: Path, work: Path) -> Path:
    data = work / "data"
    if not (data / "manifest.json").exists():
        prepare(PrepareConfig(out=data, input=[str(input_path)], shard_tokens=1 << 22, val_shard_tokens=1 << 18))
    return data


def document_lengths(data: Path) -> np.ndarray:
    stream = np.concatenate([np.load(p, mmap_mode="r") for p in list_shards(data, "train")])
    starts = np.flatnonzero(stream == EOT_ID)
    return np.diff(np.append(starts, len(stream)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, default=Path("../shared/data/corpus/openstax_textbooks_75pct.jsonl"))
    p.add_argument("--work", type=Path, default=Path("runs/bench_documents"))
    p.add_argument("--seq-len", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--buffer-docs", type=int, nargs="+", default=[1000, 100])
    p.add_argument("--rows", type=int, default=4096, help="rows drawn per setting")
    p.add_argument("--micro-batch", type=int, default=16)
    args = p.parse_args(argv)
    data = prepare_data(args.input, args.work)
    lengths = document_lengths(data)
    print(
        f"{args.input.name}: {lengths.sum():,} train tokens in {len(lengths):,} documents; length median "
        f"{int(np.median(lengths))}, mean {lengths.mean():.0f}, p90 {int(np.percentile(lengths, 90))}"
    )
    print(f"{'seq_len':>8} {'buffer':>7} {'cropped':>8} {'docs/row':>9} {'epochs':>7} {'rows/s':>9}")
    for seq_len in args.seq_len:
        share = float((lengths > seq_len + 1).mean())
        for buffer_docs in args.buffer_docs:
            loader = DocumentLoader(data, seq_len, seq_len * args.micro_batch, args.micro_batch,
                                    buffer_docs=buffer_docs)  # fmt: skip
            times, docs_per_row = [], []
            for _ in range(args.rows // args.micro_batch):
                start = time.perf_counter()
                x, _ = loader.next_batch()
                times.append(time.perf_counter() - start)
                docs_per_row += (x == EOT_ID).sum(dim=1).tolist()
            rate = args.micro_batch / statistics.median(times)
            print(
                f"{seq_len:>8} {buffer_docs:>7} {loader.cropped_fraction:>8.1%} {statistics.mean(docs_per_row):>9.2f} "
                f"{loader.epoch:>7} {rate:>9.0f}   ({share:.0%} of documents are longer than a row)"
            )


if __name__ == "__main__":
    run_cli(main)
