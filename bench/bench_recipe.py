"""The recipes side by side at CPU scale, with statistics: which of the speedrun's second-generation pieces help
modern-v1, and how many tokens does the resulting modern recipe need to reach modern-v1's final val loss (and the
gpt2 recipe's)?

What it measures (issue 19). Every configuration is trained with several seeds (a seed changes the initialisation
and the data order) and reported as n, mean ± sd of its final val loss; every comparison carries a Welch t-test
p-value (``scipy.stats.ttest_ind(equal_var=False)``) and a seed-paired t-test p-value (``scipy.stats.ttest_rel``
over the seeds both configurations ran), one-sided where the question is one-sided (the tables say which way).

The decision is the paired test's. The design is paired: seed k gives both configurations the same data order and
the same draws for the weights they share, and at this scale the seed moves the final loss by ~0.1 (sd), ten times
the effects in question, while the difference between two configurations under one seed varies by ~0.002. Welch's
test treats that shared spread as noise and, with 3 to 5 seeds, cannot see a 0.01 effect; the paired test removes
it. Welch's p stays in every table so the reader can apply the stricter rule.

In order of priority:

1. gpt2: the gpt2 recipe's sweep of ``--gpt2-lrs`` (one seed), then ``--seeds`` seeds at the best rate; full budget
   (warmup 715/19073 of the run, cosine to lr/10, as in the full recipe).
2. modern-v1 at the full budget and at ``--fraction`` of it (``--base-seeds`` seeds: both are compared many times).
3. pieces: modern-v1 with one second-generation piece added, at ``--fraction``. A piece helps only if it lowers the
   mean final val loss with one-sided paired p < ``--alpha``. A comparison whose p-value lands close to its threshold
   (alpha/5 <= p < 4 alpha: pieces, tune variants, ablations, and the new modern past its crossing) gets
   ``--close-seeds`` seeds before it is decided, and its reference as many.
4. new modern: modern-v1 + every piece that helps. If that combination is worse (a higher loss over the seeds
   both ran) than its best single piece, pieces are dropped greedily (each step drops the piece whose removal gives
   the lowest loss) until it is not. tune: that combination with one more change (``TUNES``,
   against itself at ``--fraction``), greedily: the change that helps most joins it, then those that helped too
   and change other fields are tried on top, until none helps; kept only if it helps at the full budget too. Then
   the new modern at each of ``--budgets`` (each a complete run: its schedule ends within its own budget), and
   where it crosses modern-v1's full-budget loss and the gpt2 recipe's best (where its mean difference from
   them over the seeds both ran reaches 0, linear between budgets), with the one-sided p-value of the budget just
   past the crossing against that target.
5. ablation: modern-v1 with one of its pieces switched back, at ``--fraction`` (one-sided: does switching it back
   raise the loss?).
6. confirm: one seed each of gpt2, modern-v1 and the new modern at ``--confirm-width`` and ``--confirm-tokens``.

How. Every run is ``gpt2.trainer.train`` (the pipeline itself), validating on the same fixed tokens (the first
``--val-tokens`` of the val shard) every ``--eval-every`` steps, in its own worker process (``--jobs`` at a time,
one thread each: ``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)``). Each run's result is its own JSON file in
``<work>/results/``, written atomically when the run ends, so parallel workers never write the same file and an
interrupted bench resumes where it stopped: finished runs are read back, and a run cut short continues from its
newest checkpoint (written when the bench is stopped, and every ``--save-every`` steps; the pipeline's resume is
exact), so the long runs of ``confirm`` can span several sittings. A run whose loss diverges is recorded as
diverged and counted apart.
The report (markdown tables) goes to stdout and ``<work>/report.md``; the curves (val loss against tokens, mean
over seeds with a ±sd band) to ``<work>/recipes.png`` and ``<work>/recipes_wide.png``.

``--timing`` instead measures seconds per token of gpt2, modern-v1 and the new modern (the flags the bench chose,
``<work>/new_modern.json``), eager and compiled, and of modern-v1 with each piece, eager: short runs in this process
with all its threads, the median step after the first two, the median of ``--timing-repeats`` alternating rounds.
Run it on an otherwise idle machine.

  python bench/bench_recipe.py --jobs 2
  python bench/bench_recipe.py --timing
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt2.config import train_config
from gpt2.files import atomic_write_text
from gpt2.prepare import PrepareConfig, prepare
from gpt2.rundir import JsonlLog
from gpt2.trainer import NonFiniteLoss, StopRequest, train

FIRST_SEED = 1337  # seeds are FIRST_SEED, FIRST_SEED + 1, ...
GPT2_WARMUP = 715 / 19073  # the gpt2 recipe's warmup as a fraction of its run

# modern-v1 with one second-generation piece added: name -> (what it is, its flags)
PIECES: dict[str, tuple[str, dict[str, Any]]] = {
    "split_qkv": ("Muon on q, k, v as three matrices", dict(split_qkv=True)),
    "doc_mask": ("document-masked attention (rows: windows of the stream)", dict(doc_mask=True)),
    "documents": ("document-aligned rows, best-fit packed, with document masks", dict(data_layout="documents",
                                                                                       doc_mask=True)),
    "windows": ("short/long windows SL (short: 128 keys)", dict(window_pattern="SL", short_window=128)),
    "value_embeds": ("one value-embedding table (first and last layer)", dict(value_embeds=1)),
    "unet_skips": ("U-net skips", dict(unet_skips=True)),
    "polar_express": ("Polar Express coefficients in Muon", dict(muon_polar_express=True)),
    "normuon": ("NorMuon, beta2 0.95", dict(normuon_beta2=0.95)),
}  # fmt: skip

# the new modern with one more change (a setting modern-v1 chose without the new pieces or at another width, or a
# piece taken up since): name -> (what it is, its flags). Only changes whose effect need not grow or shrink with the
# run's length are tuned at part of the budget: a higher Muon rate (0.03) and a shorter cooldown (25%) each lowered
# the loss at 50% of it (paired p 0.0034 and 0.0048) and together raised it at 100% (+0.011; README "Recipes").
TUNES: dict[str, tuple[str, dict[str, Any]]] = {
    "lr_width 768": ("embedding and head rates scaled from width 768 (x1.73 at 256)", dict(lr_width=768)),
    "value_embeds 2": ("two value-embedding tables: every layer of four (one)", dict(value_embeds=2)),
    "softcap 15": ("logits soft-capped at 15 (off)", dict(logit_softcap=15.0)),
    "x0_mix": ("x0 mix: block i's input a_i x + b_i x0, learned (nanochat)", dict(x0_mix=True)),
    "smear": ("smear: a gated share of the previous token's embedding (nanochat)", dict(smear=True)),
}

# modern-v1 with one of its pieces switched back to GPT-2's: name -> (what it is, its flags)
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("Muon → AdamW at 1e-3", dict(optimizer="adamw", lr=1e-3)),
    "cosine": ("WSD → cosine", dict(schedule="cosine")),
    "tied": ("untied → tied head (embedding at the head's 0.006)", dict(tie_embeddings=True, embed_lr=0.006)),
    "learned_pos": ("rotary → learned positions", dict(rope_theta=0.0)),
    "no_qk_norm": ("no QK-norm", dict(qk_norm=False)),
    "gelu": ("ReLU² → GELU", dict(mlp="gelu")),
}


# ----------------------------------------------------------------------------------------------------------------------
# Runs: one training each, identified by its label, its length and its seed


@dataclass(frozen=True)
class Scale:
    """The model and the token budget runs are measured at."""

    n_layer: int
    n_embd: int
    seq_len: int
    micro_batch: int
    batch_tokens: int
    budget_tokens: int  # the gpt2 recipe's training tokens: 100% of the budget
    val_tokens: int
    eval_every: int

    def flags(self) -> dict[str, Any]:
        return dict(n_layer=self.n_layer, n_head=self.n_embd // 64, n_embd=self.n_embd, block_size=self.seq_len,
                    seq_len=self.seq_len, micro_batch=self.micro_batch, batch_tokens=self.batch_tokens,
                    val_tokens=self.val_tokens, eval_every=self.eval_every, sample_every=0, save_every=0,
                    device="cpu", dtype="bf16", peak_tflops="none")  # fmt: skip

    def steps(self, fraction: float) -> int:
        return max(1, round(fraction * self.budget_tokens / self.batch_tokens))


@dataclass(frozen=True)
class Run:
    """One training run: ``train_config(**flags, max_steps=steps, seed=seed)``. ``label`` names the configuration
    (the same for every length and seed of it)."""

    label: str
    flags: dict[str, Any]
    steps: int
    seed: int

    @property
    def key(self) -> str:
        return f"{re.sub(r'[^A-Za-z0-9.]+', '_', self.label).strip('_')}-{self.steps}st-s{self.seed}"


def runs(label: str, scale: Scale, fraction: float, seeds: int, **flags: Any) -> list[Run]:
    """``seeds`` runs of one configuration at ``fraction`` of the budget; the gpt2 recipe warms up for 715/19073
    of its length."""
    steps = scale.steps(fraction)
    flags = {**scale.flags(), **flags}
    if flags.get("recipe") == "gpt2":
        flags.setdefault("warmup_steps", max(1, round(steps * GPT2_WARMUP)))
    return [Run(label, flags, steps, FIRST_SEED + i) for i in range(seeds)]


def modern(pieces: list[str] | tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """The label and flags of modern-v1 with ``pieces`` (names in ``PIECES``) added."""
    flags: dict[str, Any] = {"recipe": "modern-v1"}
    for name in pieces:
        flags.update(PIECES[name][1])
    return "+".join(["modern-v1", *sorted(pieces)]), flags


def modern_runs(pieces: list[str], scale: Scale, fraction: float, seeds: int) -> list[Run]:
    """``runs`` of modern-v1 with ``pieces`` added."""
    label, flags = modern(pieces)
    return runs(label, scale, fraction, seeds, **flags)


def reseed(todo: list[Run], seeds: int) -> list[Run]:
    """The same configuration with ``seeds`` seeds (the first ones are those of ``todo``)."""
    return [Run(todo[0].label, todo[0].flags, todo[0].steps, FIRST_SEED + i) for i in range(seeds)]


# ----------------------------------------------------------------------------------------------------------------------
# Executing runs: each in a worker process, its result in its own file


class Executor:
    """Trains runs in worker processes, ``jobs`` at a time, and reads their stored results back."""

    def __init__(self, work: Path, data: Path, jobs: int, save_every: int = 0) -> None:
        self.work, self.data, self.jobs, self.save_every = work, data, jobs, save_every
        self.live: set[subprocess.Popen] = set()
        self.stopping = False
        self.lock = threading.Lock()

    def result_path(self, run: Run) -> Path:
        return self.work / "results" / f"{run.key}.json"

    def stored(self, run: Run) -> dict[str, Any] | None:
        path = self.result_path(run)
        if not path.exists():
            return None
        result = json.loads(path.read_text())
        if result["flags"] != run.flags:
            raise SystemExit(f"{path} was measured with other flags ({result['flags']}); move it away to rerun it")
        return result

    def __call__(self, todo: list[Run]) -> dict[str, dict[str, Any]]:
        """The results of ``todo`` by key: stored ones read back, the others trained in the order given. A run that
        fails is reported and the others go on; the bench stops after them."""
        missing = list({run.key: run for run in todo if self.stored(run) is None}.values())
        if not missing:
            return {run.key: self.stored(run) for run in todo}
        print(f"{len(missing)} runs to train ({len(todo) - len(missing)} stored), {self.jobs} at a time", flush=True)
        t0, failed = time.perf_counter(), []
        pool = ThreadPoolExecutor(self.jobs)
        try:
            futures = {pool.submit(self.train, run): run for run in missing}
            for done, future in enumerate(as_completed(futures), 1):
                run = futures[future]
                try:
                    result = future.result()
                except RuntimeError as e:
                    failed.append(run.key)
                    print(f"  {e}", flush=True)
                    continue
                final = "diverged" if result["diverged"] else f"{result['final_val']:.4f}"
                print(f"  [{done}/{len(missing)} {time.perf_counter() - t0:6.0f} s] {run.key:<58} val {final}  "
                      f"{result['seconds']:5.0f} s", flush=True)  # fmt: skip
        finally:
            pool.shutdown(cancel_futures=True)  # when interrupted: no queued run starts
        if failed:
            raise SystemExit(f"{len(failed)} runs failed: {', '.join(failed)}")
        return {run.key: self.stored(run) for run in todo}

    def prepare(self, run: Run) -> Path:
        """The folder of ``run``'s attempts, with its spec: the one an earlier attempt at it left (its checkpoint
        and log in ``train/``), or a new one."""
        folder = self.work / "runs" / run.key
        spec = folder / "spec.json"
        wanted = {"run": vars(run), "data": str(self.data), "result": str(self.result_path(run))}
        if not spec.exists() or json.loads(spec.read_text()) != wanted:
            shutil.rmtree(folder, ignore_errors=True)  # what an attempt at another run left
            folder.mkdir(parents=True)
            atomic_write_text(spec, json.dumps(wanted))
        return spec

    def train(self, run: Run) -> dict[str, Any]:
        """Train ``run`` in a worker process (one thread) and return its result. An attempt at the same run that was
        interrupted continues from its newest checkpoint (the pipeline's resume is exact)."""
        spec = self.prepare(run)
        folder = spec.parent
        settings = {"save_every": self.save_every}  # how to run it: not part of the run, so not in its spec
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        command = [sys.executable, os.path.abspath(__file__), "--worker", str(spec), json.dumps(settings)]
        with open(folder / "output.txt", "w") as output:
            # its own session: a Ctrl-C of the bench reaches the workers through stop(), not twice
            with self.lock:
                if self.stopping:
                    raise RuntimeError(f"run {run.key} not started: the bench is stopping")
                process = subprocess.Popen(
                    command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
                )
                self.live.add(process)
            code = process.wait()
            with self.lock:
                self.live.discard(process)
        result = self.stored(run)
        if code or result is None:
            raise RuntimeError(f"run {run.key} failed (exit code {code}); see {folder / 'output.txt'}")
        return result

    def stop(self) -> None:
        """Stop every worker: each finishes its step, writes a checkpoint and exits without a result (its run
        continues from there next time)."""
        with self.lock:
            self.stopping = True
            for process in self.live:
                process.send_signal(signal.SIGTERM)


def run_config(run: Run, data: str, out: Path, save_every: int) -> Any:
    """The training configuration of ``run``: its flags, length and seed, in ``out``, continuing from the newest
    checkpoint there, writing one every ``save_every`` steps (0: only when stopped), keeping only the newest."""
    flags = {**run.flags, "save_every": save_every, "keep_last": 1}
    return train_config(data=data, out=str(out), max_steps=run.steps, seed=run.seed, resume="auto", **flags)


def worker(spec_path: Path, settings: dict[str, Any]) -> None:
    """The worker process: train one run (one thread), from where an earlier attempt stopped, and write its result
    atomically."""
    torch.set_num_threads(1)
    spec = json.loads(spec_path.read_text())
    run = Run(**spec["run"])
    out = spec_path.parent / "train"
    cfg = run_config(run, spec["data"], out, settings["save_every"])
    t0 = time.perf_counter()
    diverged = None
    stop = StopRequest()
    try:
        with stop.catch_signals():  # SIGTERM (the bench stopping): finish the step, write a checkpoint, exit
            if train(cfg, stop=stop).stopped_by:
                sys.exit(1)  # stopped early: no result
    except NonFiniteLoss as e:
        diverged = str(e)
    records = JsonlLog(out / "log.jsonl").read()
    trains = [r for r in records if r["kind"] == "train"]
    curve = [(r["step"] * cfg.batch_tokens, r["loss"]) for r in records if r["kind"] == "val"]
    result = {
        **vars(run), "tokens": run.steps * cfg.batch_tokens, "diverged": diverged,
        "final_val": None if diverged else curve[-1][1], "curve": curve, "seconds": time.perf_counter() - t0,
        "attempts": sum(r["kind"] == "memory" for r in records),  # "seconds" are the last attempt's
        "us_per_token": 1e6 * statistics.median(r["dt_ms"] / 1000 / cfg.batch_tokens for r in trains[1:] or trains),
        "cropped": trains[-1].get("cropped") if trains else None,
    }  # fmt: skip
    for checkpoint in out.glob("*.pt"):  # hundreds of MB each; the log stays
        checkpoint.unlink()
    atomic_write_text(spec["result"], json.dumps(result) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class Stats:
    """The final val losses of one configuration's seeds (diverged runs counted apart)."""

    label: str
    tokens: int
    values: list[float]
    seeds: list[int]  # the seed of each value
    diverged: int = 0

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else math.nan

    def text(self) -> str:
        return f"{self.mean:.4f} ± {self.sd:.4f}"


def stats(results: dict[str, dict[str, Any]], todo: list[Run]) -> Stats:
    """The statistics of one configuration's runs."""
    rows = [results[run.key] for run in todo]
    kept = [r for r in rows if not r["diverged"]]
    return Stats(todo[0].label, rows[0]["tokens"], [r["final_val"] for r in kept], [r["seed"] for r in kept],
                 len(rows) - len(kept))  # fmt: skip


def welch(a: Stats, b: Stats, alternative: str = "two-sided") -> float:
    """Welch's t-test p-value of mean(a) vs mean(b); ``alternative`` "less": H1 is mean(a) < mean(b)."""
    from scipy.stats import ttest_ind

    if a.n < 2 or b.n < 2:
        return math.nan
    return float(ttest_ind(a.values, b.values, equal_var=False, alternative=alternative).pvalue)


def shared_seeds(a: Stats, b: Stats) -> tuple[list[float], list[float]]:
    """The values of ``a`` and of ``b`` under the seeds both ran, in seed order (pairs)."""
    common = sorted(set(a.seeds) & set(b.seeds))
    return [a.values[a.seeds.index(k)] for k in common], [b.values[b.seeds.index(k)] for k in common]


def paired(a: Stats, b: Stats, alternative: str = "two-sided") -> float:
    """The paired t-test p-value of a vs b over the seeds they share (a seed fixes the data order of the windows
    layout, so pairing takes the data's share of the spread out): the bench's decision rule (module docstring)."""
    from scipy.stats import ttest_rel

    a_values, b_values = shared_seeds(a, b)
    if len(a_values) < 3:
        return math.nan
    return float(ttest_rel(a_values, b_values, alternative=alternative).pvalue)


def gap(a: Stats, b: Stats) -> float:
    """mean(a) - mean(b) over the seeds both ran (the seed moves the loss ten times more than the effects
    measured, so means over different seeds are not comparable); over all of each where they share none."""
    a_values, b_values = shared_seeds(a, b)
    if not a_values:
        return a.mean - b.mean
    return statistics.fmean(x - y for x, y in zip(a_values, b_values))


def crossing(points: list[tuple[float, float]], target: float) -> tuple[float | None, int | None]:
    """Where a loss falling with the budget (``(fraction, mean loss)``, linear between them) first reaches
    ``target``: ``(fraction, index of the first point at or below it)``; ``(None, None)`` if it never does."""
    points = sorted(points)
    if points[0][1] <= target:
        return points[0][0], 0
    for i, ((f0, l0), (f1, l1)) in enumerate(zip(points, points[1:]), 1):
        if l1 <= target:
            return f0 + (f1 - f0) * (l0 - target) / (l0 - l1), i
    return None, None


# ----------------------------------------------------------------------------------------------------------------------
# Report


def p_text(p: float) -> str:
    return "—" if math.isnan(p) else f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def comparison_table(base: Stats, rows: list[tuple[str, Stats]], alternative: str, header: str) -> list[str]:
    """Markdown rows: each configuration against ``base``: the difference over the seeds both ran, the paired p
    one-sided (the decision), and Welch's p one-sided and two-sided."""
    lines = [f"| {header} | n | final val (mean ± sd) | Δ vs base, same seeds | paired p one-sided | "
             "Welch p one-sided | "
             "Welch two-sided |",
             "|---|---|---|---|---|---|---|",
             f"| base: {base.label} | {base.n} | {base.text()} | | | | |"]  # fmt: skip
    for name, s in rows:
        diverged = f" ({s.diverged} diverged)" if s.diverged else ""
        lines.append(f"| {name} | {s.n}{diverged} | {s.text()} | {gap(s, base):+.4f} | "
                     f"{p_text(paired(s, base, alternative))} | {p_text(welch(s, base, alternative))} | "
                     f"{p_text(welch(s, base))} |")  # fmt: skip
    return lines


def plot(path: Path, curves: dict[str, list[dict[str, Any]]], title: str, target: float | None = None) -> None:
    """Val loss against tokens: each configuration's mean over its seeds, with a ±sd band where there are several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    top = 0.0
    for label, rows in curves.items():
        tokens = [t / 1e6 for t, _ in rows[0]["curve"]]
        losses = [[loss for _, loss in r["curve"]] for r in rows if not r["diverged"]]
        mean = [statistics.fmean(v) for v in zip(*losses)]
        line = ax.plot(tokens, mean, ".-", ms=4, label=f"{label} (n={len(losses)})")[0]
        if len(losses) > 1:
            sd = [statistics.stdev(v) for v in zip(*losses)]
            ax.fill_between(tokens, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)],
                            color=line.get_color(), alpha=0.2)  # fmt: skip
        top = max(top, mean[min(2, len(mean) - 1)])
    if target is not None:
        ax.axhline(target, color="gray", ls="--", lw=0.8, label=f"modern-v1's full-budget mean {target:.4f}")
    ax.set(xlabel="training tokens (M)", ylabel="val loss", title=title, ylim=(None, top))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# The bench


def settle(
    execute: Callable[[list[Run]], dict[str, dict[str, Any]]],
    base_runs: list[Run],
    groups: dict[Any, list[Run]],
    alternative: str,
    alpha: float,
    seeds: int,
) -> tuple[list[Run], dict[Any, list[Run]]]:
    """``base_runs`` and ``groups`` (configurations compared with the base), those whose p-value is close to
    ``alpha`` (within [alpha / 5, 4 alpha)) with ``seeds`` seeds instead and the base with as many seeds as the
    largest group, so that every seed is paired; every run of them trained."""
    results = execute([*base_runs, *(r for todo in groups.values() for r in todo)])
    base = stats(results, base_runs)
    close = [
        k for k, todo in groups.items() if alpha / 5 <= paired(stats(results, todo), base, alternative) < 4 * alpha
    ]
    groups = {k: reseed(todo, max(seeds, len(todo))) if k in close else todo for k, todo in groups.items()}
    base_runs = reseed(base_runs, max([len(base_runs), *(len(todo) for todo in groups.values())]))
    execute([*base_runs, *(r for todo in groups.values() for r in todo)])
    return base_runs, groups


def lower_than(
    execute: Callable[[list[Run]], dict[str, dict[str, Any]]],
    base_runs: list[Run],
    groups: dict[Any, list[Run]],
    args: Any,
) -> tuple[Stats, dict[Any, Stats]]:
    """``groups`` settled against ``base_runs`` (one-sided: lower than it); the statistics of the base and of each
    group."""
    base_runs, groups = settle(execute, base_runs, groups, "less", args.alpha, args.close_seeds)
    results = execute([*base_runs, *(r for todo in groups.values() for r in todo)])
    return stats(results, base_runs), {key: stats(results, todo) for key, todo in groups.items()}


def new_modern_pieces(
    execute: Callable[[list[Run]], dict[str, dict[str, Any]]],
    singles: dict[str, Stats],
    base: Stats,
    args: Any,
    out: list[str],
) -> list[str]:
    """Every piece that helps; while their combination is worse than its best single piece, drop greedily."""
    helpful = [name for name, s in singles.items() if s.mean < base.mean and paired(s, base, "less") < args.alpha]
    out.append(f"Pieces that help (one-sided paired p < {args.alpha}): {', '.join(helpful) or 'none'}.")
    if len(helpful) <= 1:
        return helpful

    def measure(pieces: list[str]) -> Stats:
        todo = modern_runs(pieces, args.bench, args.fraction, args.seeds)
        return stats(execute(todo), todo)

    chosen = helpful
    best = singles[min(helpful, key=lambda name: gap(singles[name], base))]
    while len(chosen) > 1 and (worse := gap(combination := measure(chosen), best)) > 0:
        out.append(f"{combination.label}: {worse:+.4f} above its best single piece ({best.label}) over the seeds "
                   "both ran: dropping one piece.")  # fmt: skip
        without = {name: measure([p for p in chosen if p != name]) for name in chosen}
        dropped = min(without, key=lambda name: gap(without[name], base))
        out.append("  without each, Δ vs modern-v1: " + ", ".join(f"{n} {gap(s, base):+.4f}" for n, s in
                   without.items()) + f"; dropped {dropped}")  # fmt: skip
        chosen = [p for p in chosen if p != dropped]
    return chosen


def tune(
    execute: Callable[[list[Run]], dict[str, dict[str, Any]]],
    label: str,
    flags: dict[str, Any],
    args: Any,
    out: list[str],
) -> tuple[str, dict[str, Any]]:
    """The new modern tuned greedily: in each round, variants (``TUNES``) against the new modern so far at
    ``--fraction``; the one that lowers its loss most, if any does at one-sided paired p < ``--alpha``, joins it.
    The first round tries every variant, the next ones those that helped in the round before and change other
    fields. A schedule and a rate chosen at part of the budget need not suit the whole of it, so the tuned new
    modern is kept only if it is also lower at the full budget (one-sided paired p < ``--alpha``). Returns the
    label and flags of the new modern, tuned or not."""
    b, fraction, candidates, untuned = args.bench, args.fraction, list(TUNES), (label, flags)
    while candidates:
        variants = {name: runs(f"{label} {name}", b, fraction, args.seeds, **{**flags, **TUNES[name][1]})
                    for name in candidates}  # fmt: skip
        base, tuned = lower_than(execute, runs(label, b, fraction, args.seeds, **flags), variants, args)
        out += ["", f"### Tuning the new modern at {fraction:.0%} of the budget: {label} with one change", "",
                "One-sided p: H1 the change lowers the mean final val loss.", ""]  # fmt: skip
        out += comparison_table(base, [(f"{name}: {TUNES[name][0]}", s) for name, s in tuned.items()], "less",
                                "change")  # fmt: skip
        helpful = [name for name, s in tuned.items() if gap(s, base) < 0 and paired(s, base, "less") < args.alpha]
        if not helpful:
            out.append("\nNo change helps: the tuning stops here.")
            break
        best = min(helpful, key=lambda name: gap(tuned[name], base))
        out.append(f"\nThe new modern takes {best} (of those that help: {', '.join(helpful)}).")
        label, flags = f"{label} {best}", {**flags, **TUNES[best][1]}
        candidates = [name for name in helpful if TUNES[name][1].keys().isdisjoint(TUNES[best][1])]
    if label == untuned[0]:
        return untuned
    base, full = lower_than(execute, runs(untuned[0], b, 1.0, args.seeds, **untuned[1]),
                            {label: runs(label, b, 1.0, args.seeds, **flags)}, args)  # fmt: skip
    tuned = full[label]
    out += ["", "The tuned new modern at the full budget, against the untuned one:", ""]
    out += comparison_table(base, [(label, tuned)], "less", "configuration")
    if gap(tuned, base) < 0 and paired(tuned, base, "less") < args.alpha:
        return label, flags
    out.append("\nThe tuning does not hold at the full budget: the new modern stays untuned.")
    return untuned


def bench(args: argparse.Namespace, execute: Executor) -> list[str]:
    """Train (or read back) every run the bench needs, in order of priority; return the report's lines."""
    b, fraction = args.bench, args.fraction
    # 1-3: the gpt2 sweep, modern-v1, and each piece alone
    sweep = {lr: runs(f"gpt2 lr {lr:g}", b, 1.0, 1, recipe="gpt2", lr=lr, min_lr=lr / 10) for lr in args.gpt2_lrs}
    v1_full = runs("modern-v1", b, 1.0, args.base_seeds, recipe="modern-v1")
    v1_part = runs("modern-v1", b, fraction, args.base_seeds, recipe="modern-v1")
    singles = {name: modern_runs([name], b, fraction, args.seeds) for name in args.pieces}
    results = execute([r for todo in (*sweep.values(), v1_full, v1_part, *singles.values()) for r in todo])
    sweep_losses = {lr: results[todo[0].key]["final_val"] for lr, todo in sweep.items()}
    best_lr = min(args.gpt2_lrs, key=lambda lr: sweep_losses[lr])
    gpt2 = runs(f"gpt2 lr {best_lr:g}", b, 1.0, args.seeds, recipe="gpt2", lr=best_lr, min_lr=best_lr / 10)
    results.update(execute(gpt2))
    v1_part, singles = settle(execute, v1_part, singles, "less", args.alpha, args.close_seeds)
    results.update(execute([*v1_part, *(r for todo in singles.values() for r in todo)]))
    gpt2_stats, v1_stats, base = stats(results, gpt2), stats(results, v1_full), stats(results, v1_part)
    single_stats = {name: stats(results, todo) for name, todo in singles.items()}
    out = [f"## Bench: {b.n_layer} layers × {b.n_embd}, seq {b.seq_len}, budget {b.budget_tokens:,} tokens "
           f"({b.steps(1.0)} steps of {b.batch_tokens:,})"]  # fmt: skip
    out += report_full_budget(sweep_losses, gpt2_stats, v1_stats)
    out += report_pieces(base, single_stats, [results[r.key] for r in singles.get("documents", [])], fraction)

    # 4: the new modern and its budgets
    out += ["", "### The new modern", ""]
    pieces = new_modern_pieces(execute, single_stats, base, args, out)
    label, flags = modern(pieces)
    if "tune" in args.sections:
        label, flags = tune(execute, label, flags, args, out)
    atomic_write_text(args.work / "new_modern.json", json.dumps({"pieces": pieces, "flags": flags}, indent=1) + "\n")
    fractions = sorted({*args.budgets, *args.plot_budgets, fraction, 1.0})
    budgets = {f: runs(label, b, f, args.seeds, **flags) for f in fractions}
    results.update(execute([r for todo in budgets.values() for r in todo]))
    _, past = crossing([(f, gap(stats(results, todo), v1_stats)) for f, todo in budgets.items()], 0.0)
    if past is not None and label != v1_full[0].label:  # the budget past the crossing: p < 0.01 is the target
        f = sorted(budgets)[past]
        v1_full, settled = settle(execute, v1_full, {f: budgets[f]}, "less", args.target_p, args.close_seeds)
        budgets.update(settled)
        results.update(execute([*v1_full, *budgets[f]]))
        v1_stats = stats(results, v1_full)
    budget_stats = {todo[0].steps / b.steps(1.0): stats(results, todo) for todo in budgets.values()}
    out.append(f"New modern: {label}; flags {json.dumps(flags)}.\n")
    out += comparison_table(base, [(f"new modern at {fraction:.0%}", stats(results, budgets[fraction]))], "less",
                            "configuration")  # fmt: skip
    out += report_budgets(budget_stats, v1_stats, gpt2_stats)

    # 5: the ablation
    if "ablation" in args.sections:
        ablations = {name: runs(f"modern-v1-{name}", b, fraction, args.seeds, recipe="modern-v1",
                                **ABLATIONS[name][1]) for name in ABLATIONS}  # fmt: skip
        v1_part, ablations = settle(execute, v1_part, ablations, "greater", args.alpha, args.close_seeds)
        results.update(execute([*v1_part, *(r for todo in ablations.values() for r in todo)]))
        base = stats(results, v1_part)
        out += ["", f"### Ablation: modern-v1 with one piece switched back, at {fraction:.0%} of the budget", "",
                "One-sided p: H1 switching the piece back raises the mean final val loss.", ""]  # fmt: skip
        out += comparison_table(base, [(ABLATIONS[n][0], stats(results, todo)) for n, todo in ablations.items()],
                                "greater", "change")  # fmt: skip

    # The main comparison's curves
    curves = {f"gpt2 lr {best_lr:g} (100%)": gpt2, "modern-v1 (100%)": v1_full}
    for f in (*args.plot_budgets, 1.0):
        if budgets[f][0].key not in {todo[0].key for todo in curves.values()}:  # a new modern that is modern-v1
            curves[f"new modern ({f:.0%})"] = budgets[f]
    plot(args.work / "recipes.png", {k: [results[r.key] for r in todo] for k, todo in curves.items()},
         f"{b.n_layer} layers × {b.n_embd}, seq {b.seq_len}: mean ± sd over seeds", v1_stats.mean)  # fmt: skip

    # 6: the confirmation at a larger scale
    if "confirm" in args.sections:
        out += confirm(args, execute, best_lr, label, flags)
    return out


def report_full_budget(sweep: dict[float, float], gpt2: Stats, v1: Stats) -> list[str]:
    """The gpt2 recipe's sweep, and both recipes at the full budget."""
    out = ["", f"### gpt2 recipe: sweep of --lr (seed {FIRST_SEED}, full budget)", "",
           "| --lr | " + " | ".join(f"{lr:g}" for lr in sweep) + " |", "|---|" + "---|" * len(sweep),
           "| final val | " + " | ".join(f"{loss:.4f}" for loss in sweep.values()) + " |", "",
           "### Full budget", "", "| recipe | n | final val (mean ± sd) | each seed |",
           "|---|---|---|---|"]  # fmt: skip
    for s in (gpt2, v1):
        out.append(f"| {s.label} | {s.n} | {s.text()} | {', '.join(f'{v:.4f}' for v in s.values)} |")
    out.append(
        f"\nmodern-v1 vs gpt2, one-sided (H1: modern-v1 lower): paired p = {p_text(paired(v1, gpt2, 'less'))}, "
        f"Welch p = {p_text(welch(v1, gpt2, 'less'))}"
    )
    return out


def report_pieces(base: Stats, singles: dict[str, Stats], documents: list[dict[str, Any]], fraction: float
                  ) -> list[str]:  # fmt: skip
    """Each piece added alone, against modern-v1 at the same budget."""
    out = ["", f"### Each piece added to modern-v1 alone, at {fraction:.0%} of the budget", "",
           "One-sided p: H1 the piece lowers the mean final val loss.", ""]  # fmt: skip
    out += comparison_table(base, [(f"+ {name}: {PIECES[name][0]}", s) for name, s in singles.items()], "less",
                            "configuration")  # fmt: skip
    if documents:
        cropped = ", ".join(f"{r['cropped']:.1%}" for r in documents)
        out.append(f"\nDocument-aligned rows: the packing cropped {cropped} of the tokens it read (by seed).")
    return out


def report_budgets(budgets: dict[float, Stats], v1: Stats, gpt2: Stats) -> list[str]:
    """The new modern by budget, and where it crosses modern-v1's full-budget loss and the gpt2 recipe's (where
    its mean difference from them over the seeds both ran reaches 0, linear between budgets)."""
    out = ["", "By budget (Δ over the seeds both ran; one-sided p: H1 the new modern at this budget is below the "
           "reference):", "",
           "| budget | tokens | n | final val (mean ± sd) | vs modern-v1 100%: Δ, paired p, Welch p | "
           "vs gpt2 best: Δ, paired p, Welch p |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for f, s in sorted(budgets.items()):
        out.append(
            f"| {f:.3f} | {s.tokens:,} | {s.n} | {s.text()} | {gap(s, v1):+.4f}, "
            f"{p_text(paired(s, v1, 'less'))}, {p_text(welch(s, v1, 'less'))} | {gap(s, gpt2):+.4f}, "
            f"{p_text(paired(s, gpt2, 'less'))}, {p_text(welch(s, gpt2, 'less'))} |"
        )
    for name, target in (("modern-v1's full-budget loss", v1), ("the gpt2 recipe's best", gpt2)):
        where, index = crossing([(f, gap(s, target)) for f, s in budgets.items()], 0.0)
        if where is None:
            out.append(f"\nThe new modern never reaches {name} within the budgets measured.")
            continue
        f, s = sorted(budgets.items())[index]
        evidence = (f"Δ {gap(s, target):+.4f}, one-sided paired p = {p_text(paired(s, target, 'less'))}, "
                    f"Welch p = {p_text(welch(s, target, 'less'))}.")  # fmt: skip
        if index == 0:
            out.append(f"\n**The new modern is below {name} already at the smallest budget measured ({f:.3f})**: "
                       + evidence)  # fmt: skip
            continue
        out.append(f"\n**The new modern reaches {name} at {where:.3f} of the budget** (its mean difference over "
                   f"the seeds both ran, linear between budgets); at the budget past the crossing ({f:.3f}): "
                   + evidence)  # fmt: skip
    return out


def confirm(args: argparse.Namespace, execute: Executor, lr: float, label: str, flags: dict[str, Any]) -> list[str]:
    """One seed each of gpt2, modern-v1 and the new modern at the confirmation scale; a table and the curves."""
    w = args.wide
    todo = {f"gpt2 lr {lr:g} (100%)": runs(f"wide gpt2 lr {lr:g}", w, 1.0, 1, recipe="gpt2", lr=lr, min_lr=lr / 10),
            "modern-v1 (100%)": runs("wide modern-v1", w, 1.0, 1, recipe="modern-v1")}  # fmt: skip
    todo.update({f"new modern ({f:.0%})": runs(f"wide {label}", w, f, 1, **flags) for f in args.confirm_budgets})
    results = execute([r for rs in todo.values() for r in rs])
    out = ["", f"## Confirmation: {w.n_layer} layers × {w.n_embd} ({w.n_embd // 64} heads), seq {w.seq_len}, "
           f"budget {w.budget_tokens:,} tokens (one seed, {FIRST_SEED})", "",
           "| run | tokens | final val | µs/token (noisy) |", "|---|---|---|---|"]  # fmt: skip
    for name, (run,) in todo.items():
        r = results[run.key]
        final = "diverged" if r["diverged"] else f"{r['final_val']:.4f}"
        out.append(f"| {name} | {r['tokens']:,} | {final} | {r['us_per_token']:.0f} |")
    plot(args.work / "recipes_wide.png", {k: [results[r.key] for r in rs] for k, rs in todo.items()},
         f"{w.n_layer} layers × {w.n_embd}, seq {w.seq_len}, one seed")  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Timing


def us_per_token(args: argparse.Namespace, data: Path, out: Path, compile: bool, flags: dict[str, Any]) -> float:
    """Microseconds per token of a ``--timing-steps`` run: its median step after the first two."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = train_config(data=str(data), out=str(out), max_steps=args.timing_steps, resume="never", compile=compile,
                       **{**args.bench.flags(), "eval_every": 0, **flags})  # fmt: skip
    train(cfg)
    dts = [r["dt_ms"] for r in JsonlLog(out / "log.jsonl").read() if r["kind"] == "train" and r["step"] >= 2]
    shutil.rmtree(out)
    return 1e3 * statistics.median(dts) / cfg.batch_tokens


def timing(args: argparse.Namespace, data: Path) -> None:
    """Seconds per token of gpt2, modern-v1 and the new modern, eager and compiled, and of modern-v1 with each piece
    added, eager: the median step after two of each run, and the median over ``--timing-repeats`` rounds that
    alternate the configurations (a shared machine drifts: a ratio is fair only between runs interleaved)."""
    chosen = args.work / "new_modern.json"
    new_flags = json.loads(chosen.read_text())["flags"] if chosen.exists() else {"recipe": "modern"}
    print(f"new modern: {json.dumps(new_flags)}")
    recipes = {"modern-v1": {"recipe": "modern-v1"}, "gpt2": {"recipe": "gpt2", "warmup_steps": 1},
               "new modern": new_flags}  # fmt: skip
    pieces = {f"+{name}": modern([name])[1] for name in args.pieces}
    print(f"{'recipe':<15} {'mode':<9} {'us/token (each round)':>30} {'median':>8} {'vs modern-v1':>13}")
    for compile in (False, True):
        mode = "compiled" if compile else "eager"
        configs = recipes if compile else {**recipes, **pieces}
        per_token: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.timing_repeats):
            for name, flags in configs.items():
                out = args.work / "timing" / f"{name.replace(' ', '_')}_{mode}"
                per_token[name].append(us_per_token(args, data, out, compile, flags))
        base = statistics.median(per_token["modern-v1"])
        for name, values in per_token.items():
            rounds = ", ".join(f"{v:.1f}" for v in values)
            median = statistics.median(values)
            print(f"{name:<15} {mode:<9} {rounds:>30} {median:>8.1f} {median / base:>12.2f}x", flush=True)


# ----------------------------------------------------------------------------------------------------------------------


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, default=Path("../shared/data/corpus/openstax_textbooks_75pct.jsonl"))
    p.add_argument("--work", type=Path, default=Path("runs/bench_recipe"), help="shards, runs, results, report")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at a time (one thread each)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of each configuration")
    p.add_argument("--base-seeds", type=int, default=5, help="seeds of modern-v1, which every comparison uses")
    p.add_argument("--alpha", type=float, default=0.05, help="a piece helps if its one-sided paired p is below this")
    p.add_argument("--target-p", type=float, default=0.01, help="the new modern's p at the crossing budget")
    p.add_argument(
        "--close-seeds",
        type=int,
        default=5,
        help="seeds of a configuration whose p-value is close to the threshold (alpha/5 <= p < 4 alpha)",
    )
    p.add_argument("--budget-tokens", type=int, default=786_432, help="the gpt2 recipe's training tokens")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256, help="width (heads of 64)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--val-tokens", type=int, default=32768)
    p.add_argument("--eval-every", type=int, default=12)
    p.add_argument("--gpt2-lrs", type=floats, default=floats("6e-4,1.8e-3,3.6e-3"), help="the gpt2 recipe's sweep")
    p.add_argument("--fraction", type=float, default=0.5, help="budget fraction of the pieces and the ablation")
    p.add_argument("--pieces", default=",".join(PIECES), help="pieces to measure (comma-separated)")
    p.add_argument("--budgets", type=floats, default=floats("0.15,0.2,0.3,0.4,0.5,0.6,0.75,1"),
                   help="budget fractions of the new modern")  # fmt: skip
    p.add_argument("--plot-budgets", type=floats, default=floats("0.6,0.75"), help="new-modern budgets plotted")
    p.add_argument("--sections", default="tune,ablation,confirm", help="optional parts: tune, ablation, confirm")
    p.add_argument("--confirm-width", type=int, default=512)
    p.add_argument("--confirm-tokens", type=int, default=3_145_728, help="the gpt2 recipe's tokens at that width")
    p.add_argument("--confirm-eval-every", type=int, default=24)
    p.add_argument("--confirm-budgets", type=floats, default=floats("1"), help="budget fractions of the new modern")
    p.add_argument("--timing", action="store_true", help="only measure seconds per token (idle machine)")
    p.add_argument("--timing-steps", type=int, default=10)
    p.add_argument("--timing-repeats", type=int, default=3, help="alternating rounds of --timing; medians reported")
    p.add_argument("--save-every", type=int, default=0,
                   help="each run writes a checkpoint every N steps (0: only when stopped); an interrupted bench "
                   "continues each run from its newest checkpoint")  # fmt: skip
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # internal: train the run of this spec, these settings
    args = p.parse_args()
    args.pieces = [name for name in args.pieces.split(",") if name]
    unknown = set(args.pieces) - set(PIECES)
    if unknown:
        p.error(f"unknown pieces {', '.join(sorted(unknown))}; choose from {', '.join(PIECES)}")
    args.sections = set(args.sections.split(","))
    args.bench = Scale(args.n_layer, args.n_embd, args.seq_len, args.micro_batch, args.batch_tokens,
                       args.budget_tokens, args.val_tokens, args.eval_every)  # fmt: skip
    args.wide = Scale(args.n_layer, args.confirm_width, args.seq_len, args.micro_batch, args.batch_tokens,
                      args.confirm_tokens, args.val_tokens, args.confirm_eval_every)  # fmt: skip
    return args


def prepare_data(args: argparse.Namespace) -> Path:
    """The corpus as shards in ``<work>/shards`` (once): 4M-token train shards; the first 256K tokens are val."""
    data = args.work / "shards"
    prepare(PrepareConfig(out=data, input=[str(args.input)], shard_tokens=1 << 22, val_shard_tokens=1 << 18))
    return data


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(Path(args.worker[0]), json.loads(args.worker[1]))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args)
    if args.timing:
        timing(args, data)
        return
    execute = Executor(args.work, data, args.jobs, args.save_every)

    def terminate(signum: int, frame: Any) -> None:
        execute.stop()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        lines = bench(args, execute)
    except KeyboardInterrupt:
        execute.stop()
        raise
    report = "\n".join(lines) + "\n"
    atomic_write_text(args.work / "report.md", report)
    print("\n" + report)


if __name__ == "__main__":
    main()
