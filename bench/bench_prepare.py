"""Shard preparation throughput: ``gpt2.prepare`` end to end vs. tiktoken's raw ``encode_ordinary_batch``.

The input is real text from ``../shared/data/corpus`` (FineWeb-Edu, Common Crawl, C4 and Wikipedia samples;
this script reads that folder, which only development checkouts have), replicated into one jsonl (or, with
--format parquet, parquet) file of about --mb MB. For each worker count N in --workers, one run measures
side by side, --repeats times:

- reference: ``encode_ordinary_batch(texts, num_threads=N)`` on the texts already in memory (tokenizing only);
- ours: ``prepare()`` with ``workers=N`` from the input file to finished shards on disk (reading, parsing,
  tokenizing, copying, writing with fsync, sha256 and manifest all included).

Prints median tokens/s of each and the ratio ours/reference (target >= 1.0), and how ours scales with N.

    .venv/bin/python bench/bench_prepare.py --mb 40 --workers 1 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from gpt2.errors import UserError, run_cli
from gpt2.prepare import PrepareConfig, prepare
from gpt2.tokenizer import get_encoding

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"


def corpus_documents(corpus: Path) -> list[str]:
    """The real documents of the shared corpus folder, in a fixed order."""
    if not corpus.is_dir():
        raise UserError(f"{corpus} is not there: this benchmark needs the shared development data")
    docs = []
    for name in ("fineweb_edu_sample10BT_150docs.jsonl", "dolma_ccnet_cc_en_head-0091.jsonl",
                 "dolma_ccnet_cc_en_head-0174.jsonl"):  # fmt: skip
        docs += [json.loads(line)["text"] for line in open(corpus / name, encoding="utf-8")]
    docs += (corpus / "exllamav2_cal_c4.utf8").read_text(encoding="utf-8").splitlines()
    docs += (corpus / "exllamav2_cal_wiki.utf8").read_text(encoding="utf-8").split("</doc>")
    return [d for d in docs if d.strip()]


def write_input(docs: list[str], path: Path, mb: float) -> list[str]:
    """Repeat ``docs`` into a .jsonl or .parquet file of about ``mb`` MB; returns the texts written, in order."""
    texts: list[str] = []
    size = 0
    with open(path.with_suffix(".jsonl"), "w", encoding="utf-8") as f:
        while size < mb * 1e6:
            for doc in docs:
                line = json.dumps({"text": doc}) + "\n"
                f.write(line)
                texts.append(doc)
                size += len(line)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts}), path, row_group_size=10_000)
    return texts


def time_reference(texts: list[str], threads: int) -> tuple[float, int]:
    enc = get_encoding()
    start = time.perf_counter()
    tokens = sum(len(t) + 1 for t in enc.encode_ordinary_batch(texts, num_threads=threads))  # + EOT per document
    return time.perf_counter() - start, tokens


def time_ours(path: Path, out: Path, workers: int, shard_tokens: int) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    manifest = prepare(PrepareConfig(out=out, input=[str(path)], shard_tokens=shard_tokens, workers=workers))
    return time.perf_counter() - start, manifest["tokens"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, default=CORPUS, help="folder of real text (default ../shared/data/corpus)")
    p.add_argument("--mb", type=float, default=40, help="size of the jsonl input in MB (default 40)")
    p.add_argument("--workers", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}),
                   help="worker processes for ours = threads for the reference (default: 1 and all cores)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="runs of each, medians reported (default 3)")
    p.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl", help="input format (default jsonl)")
    p.add_argument("--shard-tokens", type=int, help="shard size of ours (default: an eighth of the input)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        path = Path(tmp) / f"input.{args.format}"
        texts = write_input(corpus_documents(args.corpus), path, args.mb)
        text_mb = sum(len(t.encode()) for t in texts) / 1e6
        print(f"input: {path.name}, {text_mb:.1f} MB of text in {len(texts):,} documents; cores: {os.cpu_count()}")
        ours_by_n = {}
        for n in args.workers:
            ref_s, ours_s = [], []
            for _ in range(args.repeats):  # interleaved, so that load from other processes hits both alike
                seconds, ref_tokens = time_reference(texts, n)
                ref_s.append(seconds)
                shard_tokens = args.shard_tokens or ref_tokens // 8
                seconds, tokens = time_ours(path, Path(tmp) / "out", n, shard_tokens)
                ours_s.append(seconds)
                assert tokens == ref_tokens, (tokens, ref_tokens)
            ref_rate, ours_rate = tokens / statistics.median(ref_s), tokens / statistics.median(ours_s)
            ours_by_n[n] = ours_rate
            print(
                f"N={n}: encode_ordinary_batch(num_threads={n}) {ref_rate / 1e6:.2f} M tok/s | "
                f"prepare(workers={n}) end to end {ours_rate / 1e6:.2f} M tok/s | ratio {ours_rate / ref_rate:.2f}"
            )
        first = min(ours_by_n)
        for n in sorted(ours_by_n)[1:]:
            print(f"scaling of ours: workers={n} / workers={first} = {ours_by_n[n] / ours_by_n[first]:.2f}x")


if __name__ == "__main__":
    run_cli(main)
