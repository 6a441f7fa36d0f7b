"""Synthetic inputs at scale for the benchmarks and ``make gpu-check``, built from a little real text.

- ``jsonl``: a JSONL corpus of any size whose documents are real text, each one distinct: a source document
  rotated at a random word boundary (the end of the text moved before its beginning), so the tokenizer sees
  natural text but no two documents are byte-identical.
- ``shards``: a training directory in the loader's format: the shards of a prepared directory (its val split
  stays real text) followed by train shards of random GPT-2 token ids, up to a given size.

    python bench/synthetic.py jsonl --source data/sample/c4.jsonl data/sample/wiki.jsonl --mb 1000 --out big.jsonl
    python bench/synthetic.py shards --like data/demo --tokens 20000000 --out data/volume
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gpt2.errors import UserError, run_cli
from gpt2.prepare import MANIFEST, shard_name
from gpt2.tokenizer import N_VOCAB


def read_jsonl_texts(paths: list[Path], text_field: str = "text") -> list[str]:
    """The non-blank ``text_field`` of every line of the given JSONL files, in order."""
    texts = [json.loads(line)[text_field] for path in paths for line in path.open(encoding="utf-8") if line.strip()]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"no documents in {', '.join(map(str, paths))}")
    return texts


def varied_documents(docs: list[str], seed: int = 0) -> Iterator[str]:
    """An endless stream of distinct documents of real text: a random source document, rotated at a random
    word boundary."""
    rng = random.Random(seed)
    while True:
        doc = rng.choice(docs)
        cut = doc.find(" ", rng.randrange(len(doc))) + 1  # 0 (no rotation) when there is no space after
        yield doc[cut:] + " " + doc[:cut] if cut else doc


def write_jsonl(docs: list[str], path: Path, target_bytes: int, seed: int = 0) -> tuple[int, int]:
    """A ``{"text": ...}`` JSONL file of at least ``target_bytes`` from ``varied_documents``; returns
    (documents, bytes) written."""
    count = size = 0
    with path.open("wb") as f:
        for doc in varied_documents(docs, seed):
            if size >= target_bytes:
                break
            line = (json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode()
            f.write(line)
            count, size = count + 1, size + len(line)
    return count, size


def write_volume_shards(like: Path, out: Path, tokens: int, shard_tokens: int, seed: int = 0) -> int:
    """``out``: a copy of the shards of ``like`` (a directory written by prepare_fineweb.py; not its manifest, which
    would no longer describe the directory), then train shards of uniformly random token ids until the train split
    holds ``tokens``; returns the train tokens."""
    try:
        shards = json.loads((like / MANIFEST).read_text())["shards"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{like} is not a directory written by prepare_fineweb.py ({e})") from e
    out.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        shutil.copyfile(like / shard["file"], out / shard["file"])
    total = sum(shard["tokens"] for shard in shards if shard["split"] == "train")
    rng = np.random.default_rng(seed)
    index = len(shards)
    while total < tokens:
        n = min(shard_tokens, tokens - total)
        np.save(out / shard_name(index), rng.integers(0, N_VOCAB, n, dtype=np.uint16))
        total, index = total + n, index + 1
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    jsonl = commands.add_parser("jsonl", help="a large JSONL corpus of varied real text")
    jsonl.add_argument("--source", type=Path, nargs="+", required=True, help="JSONL files of real documents")
    jsonl.add_argument("--mb", type=float, required=True, help="size of the output in MB (10^6 bytes)")
    jsonl.add_argument("--out", type=Path, required=True)
    shards = commands.add_parser("shards", help="a prepared directory's shards plus random-token train shards")
    shards.add_argument("--like", type=Path, required=True, help="a directory written by prepare_fineweb.py")
    shards.add_argument("--tokens", type=int, required=True, help="train tokens wanted in all")
    shards.add_argument("--shard-tokens", type=int, default=100_000_000)
    shards.add_argument("--out", type=Path, required=True)
    for command in (jsonl, shards):
        command.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "jsonl":
        count, size = write_jsonl(read_jsonl_texts(args.source), args.out, int(args.mb * 1e6), args.seed)
        print(f"{args.out}: {count:,} documents, {size / 1e6:,.0f} MB")
    else:
        total = write_volume_shards(args.like, args.out, args.tokens, args.shard_tokens, args.seed)
        print(f"{args.out}: {total:,} train tokens")


if __name__ == "__main__":
    run_cli(main)
