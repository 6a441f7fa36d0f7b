"""Tokenize FineWeb-Edu (or local parquet/jsonl/txt files) into the uint16 shards that training reads.

Writes --out/val_000000.npy (the validation split), train_000001.npy, ... and manifest.json. Interrupt it at
any moment and run the same command again: finished shards are kept (after a sha256 check) and the result is
byte-identical to an uninterrupted run.

  python prepare_fineweb.py                                    # FineWeb-Edu sample-10BT, streamed from the hub
  python prepare_fineweb.py --input 'data/fineweb/*.parquet'   # local copies of FineWeb's parquet files
  python prepare_fineweb.py --input docs.jsonl.gz --out data/mine --shard-tokens 10000000
"""

from __future__ import annotations

import argparse
import logging

from tqdm import tqdm

from gpt2.errors import run_cli
from gpt2.prepare import PrepareConfig, Progress, default_workers, prepare


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = PrepareConfig(workers=1)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("source (default: the Hugging Face dataset, streamed)")
    src.add_argument("--input", nargs="+", metavar="PATH", default=[],
                     help="local files, globs or directories instead of the hub: .parquet, .jsonl, .jsonl.gz, "
                     "or .txt (one document per file); read in the order given, globs and directories sorted "
                     "by name")  # fmt: skip
    src.add_argument("--dataset", default=d.dataset, help=f"hub dataset (default {d.dataset})")
    src.add_argument("--name", default=d.name, help=f"hub dataset config; '' for none (default {d.name})")
    src.add_argument("--split", default=d.split, help=f"hub dataset split (default {d.split})")
    src.add_argument("--text-field", default=d.text_field, help=f"column or JSON field (default {d.text_field})")
    src.add_argument("--max-docs", type=int, help="stop after this many documents (default: all)")
    src.add_argument("--max-tokens", type=int, help="stop after exactly this many tokens (default: all)")
    src.add_argument("--skip-bad", action="store_true",
                     help="skip and count malformed documents (bad JSON, missing/null text, invalid UTF-8) "
                     "instead of stopping at the first one")  # fmt: skip
    out = p.add_argument_group("output")
    out.add_argument("--out", default=str(d.out), help=f"output directory (default {d.out})")
    out.add_argument("--shard-tokens", type=int, default=d.shard_tokens,
                     help=f"tokens per shard; the last one is shorter (default {d.shard_tokens:,})")  # fmt: skip
    out.add_argument("--val-tokens", type=int, help="tokens of the validation shard 0 (default: --shard-tokens)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the shards and manifest in --out, even from another source or settings")  # fmt: skip
    run = p.add_argument_group("speed")
    run.add_argument("--workers", type=int, default=default_workers(),
                     help="tokenizer processes (default: all cores, here %(default)s)")  # fmt: skip
    run.add_argument("--batch-chars", type=int, default=d.batch_chars,
                     help=f"characters (jsonl: bytes) per unit of work (default {d.batch_chars:,})")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = PrepareConfig(
        out=args.out, inputs=args.input, dataset=args.dataset, name=args.name or None, split=args.split,
        text_field=args.text_field, shard_tokens=args.shard_tokens, val_tokens=args.val_tokens, workers=args.workers,
        max_docs=args.max_docs, max_tokens=args.max_tokens, skip_bad=args.skip_bad, overwrite=args.overwrite,
        batch_chars=args.batch_chars,
    )  # fmt: skip
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
