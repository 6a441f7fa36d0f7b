"""Tokenize FineWeb-Edu (or local parquet/jsonl/txt files) into the uint16 shards that training reads.

Writes --out/val_000000.npy (the validation split), train_000001.npy, ... and manifest.json. Interrupt it at
any moment and run the same command again: finished shards are kept (after a sha256 check) and the result is
byte-identical to an uninterrupted run.

  python prepare_fineweb.py                                    # FineWeb-Edu sample-10BT, streamed from the hub
  python prepare_fineweb.py --input 'data/fineweb/*.parquet'   # local copies of FineWeb's parquet files
  python prepare_fineweb.py --input docs.jsonl.gz --out data/mine --shard-tokens 10000000
"""

from __future__ import annotations

import logging

from tqdm import tqdm

from gpt2.cli import parse
from gpt2.errors import run_cli
from gpt2.prepare import PrepareConfig, Progress, prepare


def main(argv: list[str] | None = None) -> None:
    cfg = parse(PrepareConfig, argv, prog="prepare_fineweb.py", description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tqdm(unit="tok", unit_scale=True, dynamic_ncols=True, disable=None, desc="tokenizing") as bar:

        def show(p: Progress) -> None:
            if p.fraction:
                bar.total = max(int(p.tokens / p.fraction), p.tokens)
            bar.update(p.tokens - bar.n)

        m = prepare(cfg, on_progress=show)
    train = sum(s["tokens"] for s in m["shards"] if s["split"] == "train")
    docs = m["docs_read"] - m["docs_skipped_empty"] - m["docs_skipped_bad"]
    print(
        f"{cfg.out}: {len(m['shards'])} shards, {m['tokens']:,} tokens ({m['shards'][0]['tokens']:,} val, "
        f"{train:,} train) from {docs:,} documents; skipped {m['docs_skipped_empty']:,} empty and "
        f"{m['docs_skipped_bad']:,} bad"
    )


if __name__ == "__main__":
    run_cli(main)
