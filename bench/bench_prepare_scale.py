"""Prepare at scale: memory stays bounded and throughput stays constant as the input grows.

FineWeb-Edu sample-10BT is ~10B tokens in ~100 shards; this runs ``gpt2.prepare`` with its defaults (all cores
as workers, 100M-token shards, 1 MB units) on a JSONL of --mb MB (default 1500: ~350M GPT-2 tokens) of varied
real text (``bench/synthetic.py`` from ``../shared/data/corpus``, or ``data/sample`` where that is absent), and
samples every --interval seconds, through /proc (Linux): the RSS of this process (the reader and shard writer)
and of each tokenizer worker, their total PSS (shared pages counted once), and the tokens written so far.

It prints, for each tenth of the tokens, the throughput and the largest RSS/PSS seen, then the first tenth
against the last. The parent's RSS rises while a shard's buffer fills (2 bytes a token: 200 MB at the default
shard size) and falls once the shard is written; it must not grow with the input.

    nice .venv/bin/python bench/bench_prepare_scale.py --mb 1500
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench_prepare import CORPUS, corpus_documents
from synthetic import read_jsonl_texts, write_jsonl

from gpt2.errors import run_cli
from gpt2.prepare import PrepareConfig, Progress, default_workers, prepare

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
MB = 1e6
PARTS = 10  # the run is reported in tenths of its tokens
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def status_kb(pid: int | str, path: str, key: str) -> int:
    """The ``key:`` line (in kB) of /proc/PID/PATH; 0 when the process has gone."""
    try:
        with open(f"/proc/{pid}/{path}") as f:
            return next((int(line.split()[1]) for line in f if line.startswith(key + ":")), 0)
    except OSError:
        return 0


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU time of a process (all its threads) so far; 0 when it has gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15 of stat


def children(pid: int | str = "self") -> list[int]:
    """The child processes of ``pid`` (the tokenizer workers), from every thread's /proc children list."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += map(int, (task / "children").read_text().split())
        except OSError:
            pass
    return found


@dataclass(frozen=True)
class Sample:
    """One look at the process tree."""

    seconds: float
    tokens: int
    parent_rss_mb: float
    workers: int
    workers_rss_mb: float  # summed: pages shared with the parent are counted in each
    pss_mb: float  # parent and workers, shared pages split between them
    cpu_s: float  # CPU time used by the parent and every worker since the start
    load: float  # the machine's 1-minute load average (other work competes for the cores)


class Sampler:
    """Samples the process tree every ``interval`` seconds in a thread, and the tokens written at each unit."""

    def __init__(self, interval: float) -> None:
        self.interval, self.tokens, self.samples = interval, 0, []
        self.progress: list[tuple[float, int]] = []  # (seconds, tokens) after each unit
        self.start = time.perf_counter()
        self.cpu = {"self": cpu_seconds("self")}  # per process: the most CPU time seen (workers that exit keep theirs)
        self.cpu_start = self.cpu["self"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def on_progress(self, p: Progress) -> None:
        self.tokens = p.tokens
        self.progress.append((time.perf_counter() - self.start, p.tokens))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            workers = children()
            for pid in ["self", *workers]:
                self.cpu[pid] = max(self.cpu.get(pid, 0.0), cpu_seconds(pid))
            self.samples.append(
                Sample(
                    seconds=time.perf_counter() - self.start,
                    tokens=self.tokens,
                    parent_rss_mb=status_kb("self", "status", "VmRSS") / 1e3,
                    workers=len(workers),
                    workers_rss_mb=sum(status_kb(w, "status", "VmRSS") for w in workers) / 1e3,
                    pss_mb=sum(status_kb(p, "smaps_rollup", "Pss") for p in ["self", *workers]) / 1e3,
                    cpu_s=sum(self.cpu.values()) - self.cpu_start,
                    load=os.getloadavg()[0],
                )
            )


@dataclass(frozen=True)
class Part:
    """One tenth of the run: its throughput and the largest memory figures sampled during it."""

    tokens: tuple[int, int]
    tok_per_s: float
    tok_per_cpu_s: float  # per CPU-second of the parent and workers: not affected by other work on the cores
    load: float
    parent_rss_mb: float
    workers_rss_mb: float
    pss_mb: float


def parts(sampler: Sampler, total: int) -> list[Part]:
    """The run cut into PARTS spans of equal tokens, each timed from the unit that ended the previous one."""
    result, previous, cpu_before = [], (0.0, 0), 0.0
    for i in range(1, PARTS + 1):
        end = next(p for p in sampler.progress if p[1] >= total * i // PARTS)
        during = [s for s in sampler.samples if previous[0] <= s.seconds <= end[0]] or [sampler.samples[-1]]
        tokens, cpu = end[1] - previous[1], during[-1].cpu_s - cpu_before  # no new sample (short runs): nan
        result.append(
            Part(
                tokens=(previous[1], end[1]),
                tok_per_s=tokens / (end[0] - previous[0]),
                tok_per_cpu_s=tokens / cpu if cpu > 0 else math.nan,
                load=max(s.load for s in during),
                parent_rss_mb=max(s.parent_rss_mb for s in during),
                workers_rss_mb=max(s.workers_rss_mb for s in during),
                pss_mb=max(s.pss_mb for s in during),
            )
        )
        previous, cpu_before = end, during[-1].cpu_s
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=1500, help="size of the generated JSONL input in MB")
    parser.add_argument("--shard-tokens", type=int, default=PrepareConfig().shard_tokens, help="tokens per shard")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the input and shards (temp)")
    args = parser.parse_args()

    docs = corpus_documents(CORPUS) if CORPUS.is_dir() else read_jsonl_texts(sorted(SAMPLE.glob("[!h]*.jsonl")))
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="prepare_scale_") as tmp:
        source = Path(tmp) / "input.jsonl"
        count, size = write_jsonl(docs, source, int(args.mb * MB))
        print(f"input: {count:,} documents, {size / MB:,.0f} MB (from {len(docs):,} real documents)")
        cfg = PrepareConfig(input=[str(source)], out=Path(tmp) / "shards", shard_tokens=args.shard_tokens)
        print(f"prepare: {cfg.workers} workers ({default_workers()} cores), {cfg.shard_tokens:,}-token shards")
        with Sampler(args.interval) as sampler:
            manifest = prepare(cfg, on_progress=sampler.on_progress)
        seconds = sampler.progress[-1][0]
    total = manifest["tokens"]
    print(f"{total:,} tokens in {len(manifest['shards'])} shards, {seconds:.0f} s: {total / seconds:,.0f} tokens/s")
    print(f"workers seen: {max(s.workers for s in sampler.samples)}")
    print("| tokens (M) | tokens/s | tokens/CPU-s | load | parent RSS MB | workers RSS MB (sum) | PSS MB (all) |")
    print("|---|---|---|---|---|---|---|")
    table = parts(sampler, total)
    for p in table:
        print(f"| {p.tokens[0] / 1e6:.0f}-{p.tokens[1] / 1e6:.0f} | {p.tok_per_s:,.0f} | {p.tok_per_cpu_s:,.0f} | "
              f"{p.load:.1f} | {p.parent_rss_mb:.0f} | "
              f"{p.workers_rss_mb:.0f} | {p.pss_mb:.0f} |")  # fmt: skip
    first, last = table[0], table[-1]
    for name in ("tok_per_s", "tok_per_cpu_s"):
        print(f"{name}: first tenth {getattr(first, name):,.0f}, last tenth {getattr(last, name):,.0f} "
              f"(ratio {getattr(last, name) / getattr(first, name):.2f}), median of tenths "
              f"{statistics.median(getattr(p, name) for p in table):,.0f}")  # fmt: skip
    for name in ("parent_rss_mb", "workers_rss_mb", "pss_mb"):
        print(f"{name}: first tenth {getattr(first, name):.0f}, last tenth {getattr(last, name):.0f}, "
              f"peak {max(getattr(s, name) for s in sampler.samples):.0f}")  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
