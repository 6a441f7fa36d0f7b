"""The recipe bench's statistics (bench/bench_recipe.py): differences over the seeds two configurations share, the
paired and Welch p-values against scipy's tests written out here, and where a loss falling with the budget
crosses a target."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import statistics
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from scipy.stats import t as student
from support import ROOT, TINY

spec = importlib.util.spec_from_file_location("bench_recipe", ROOT / "bench" / "bench_recipe.py")
bench = sys.modules["bench_recipe"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(bench)


def stats(values: list[float], seeds: list[int]) -> bench.Stats:
    return bench.Stats("x", 0, values, seeds)


def test_differences_and_the_paired_test_use_only_the_seeds_both_ran():
    base = stats([6.0, 6.2, 5.9, 6.4, 6.5], [1, 2, 3, 4, 5])
    piece = stats([5.99, 6.18, 5.89], [1, 2, 3])  # lower by 0.01-0.02 under every seed it ran
    assert bench.gap(piece, base) == pytest.approx(statistics.fmean([-0.01, -0.02, -0.01]))
    assert piece.mean - base.mean < -0.1  # the plain difference of means mostly measures seeds 4 and 5
    diffs = [-0.01, -0.02, -0.01]
    t = statistics.fmean(diffs) / (statistics.stdev(diffs) / math.sqrt(3))
    assert bench.paired(piece, base, "less") == pytest.approx(student.cdf(t, df=2))
    assert bench.paired(piece, base, "less") < 0.05 < bench.welch(piece, base, "less")
    assert math.isnan(bench.paired(stats([1.0, 2.0], [1, 2]), base))  # fewer than 3 shared seeds: no test


def test_welch_is_scipys_unequal_variance_test():
    a, b = stats([1.0, 1.2, 1.1], [1, 2, 3]), stats([1.5, 1.4, 1.9, 1.6], [1, 2, 3, 4])
    va, vb = statistics.variance(a.values) / 3, statistics.variance(b.values) / 4
    t = (a.mean - b.mean) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    assert bench.welch(a, b, "less") == pytest.approx(student.cdf(t, df=df))


def test_crossing_is_linear_between_budgets():
    points = [(0.5, 0.3), (0.75, 0.1), (1.0, -0.1)]
    assert bench.crossing(points, 0.0) == (pytest.approx(0.875), 2)
    assert bench.crossing(points, 0.4) == (0.5, 0)  # below the target already at the smallest budget
    assert bench.crossing(points, -0.2) == (None, None)


# The bench's choices, on made-up losses: seed k moves every configuration alike (seeds 1340 and 1341 by +0.3), a
# configuration's effect is its offset, and each run has a little noise of its own (so paired differences vary).
SEED_SHIFT = {1337: 0.0, 1338: 0.1, 1339: -0.05, 1340: 0.3, 1341: 0.3}


def loss(label: str, effect: float, seed: int) -> float:
    return 6.0 + effect + SEED_SHIFT[seed] + random.Random(f"{label} {seed}").uniform(-0.002, 0.002)


def fake_execute(effects: dict[str, float], full_budget: dict[str, float] | None = None):
    """An executor whose run of a configuration labelled L under seed k ends at ``loss(L, effects[L], k)``, or
    with the effect ``full_budget[L]`` where it runs the full budget (2 steps in ``bench_args``)."""

    def effect(run):
        return (full_budget or {}).get(run.label, effects[run.label]) if run.steps == 2 else effects[run.label]

    def execute(todo):
        return {run.key: {"final_val": loss(run.label, effect(run), run.seed), "diverged": None, "seed": run.seed,
                          "tokens": 0} for run in todo}  # fmt: skip

    return execute


def bench_args():
    scale = bench.Scale(1, 64, 32, 1, 32, 64, 32, 1)
    return SimpleNamespace(bench=scale, fraction=0.5, seeds=3, alpha=0.05, close_seeds=5)


def test_a_combination_worse_than_its_best_piece_under_the_same_seeds_drops_a_piece():
    execute = fake_execute({"modern-v1": 0.0, "modern-v1+polar_express": -0.02, "modern-v1+normuon": -0.01,
                            "modern-v1+normuon+polar_express": -0.015})  # fmt: skip
    five = [1337 + i for i in range(5)]
    base = bench.Stats("modern-v1", 0, [loss("modern-v1", 0.0, k) for k in five], five)
    singles = {name: bench.Stats(f"modern-v1+{name}", 0, [loss(name, e, k) for k in five], five)
               for name, e in (("polar_express", -0.02), ("normuon", -0.01))}  # fmt: skip
    out = []
    # the combination ran 3 seeds (mean 6.00), its best piece 5 (mean 6.11, two bad seeds): only the same seeds
    # show the combination is worse
    assert bench.new_modern_pieces(execute, singles, base, bench_args(), out) == ["polar_express"]
    assert "dropped normuon" in out[-1]


TUNES = {name: (name, {name.split()[0]: float(name.split()[1])}) for name in
         ("lr 0.013", "lr 0.03", "lr 0.045", "cooldown_frac 0.6")}  # fmt: skip


@pytest.mark.parametrize(
    "effects, chosen",
    [
        # lr 0.03 helps most, cooldown_frac 0.6 helps too and helps again on top of it
        ({"lr 0.03": -0.02, "cooldown_frac 0.6": -0.01, "lr 0.013": 0.01, "lr 0.03 cooldown_frac 0.6": -0.03},
         ["lr 0.03", "cooldown_frac 0.6"]),
        # cooldown_frac 0.6 helps alone but not on top of lr 0.03; lr 0.045 helped too but sets the same field
        ({"lr 0.03": -0.02, "cooldown_frac 0.6": -0.01, "lr 0.045": -0.01, "lr 0.03 cooldown_frac 0.6": -0.015},
         ["lr 0.03"]),
        ({"lr 0.03": 0.01, "cooldown_frac 0.6": 0.02, "lr 0.013": 0.001}, []),
        # lr 0.03 helps at half the budget, not at the full one
        ({"lr 0.03": -0.02, "lr 0.013": 0.01, "full lr 0.03": 0.01}, []),
    ],
)  # fmt: skip
def test_tune_takes_the_changes_that_help_greedily_and_at_the_full_budget(effects, chosen, monkeypatch):
    tunes = {name: TUNES[name] for name in effects if name in TUNES}  # the single changes
    monkeypatch.setattr(bench, "TUNES", tunes)
    label, flags = "new", {"recipe": "modern-v1", "lr": 0.02}
    full = {f"{label} {name.removeprefix('full ')}": e for name, e in effects.items() if name.startswith("full ")}
    halves = {f"{label} {name}": e for name, e in effects.items() if not name.startswith("full ")}
    execute = fake_execute({label: 0.0, **halves}, full)
    tuned_label, tuned_flags = bench.tune(execute, label, flags, bench_args(), [])
    assert tuned_label == " ".join([label, *chosen])
    assert tuned_flags == {**flags, **{k: v for name in chosen for k, v in tunes[name][1].items()}}


def test_settle_gives_a_close_comparison_more_seeds_and_its_base_as_many():
    # paired differences from the base: "close" -0.01, -0.001, -0.004 (one-sided p 0.10: within [alpha/5, 4 alpha)),
    # "clear" about -0.05 (p < alpha/5); seeds past the third: the same differences as the first
    offsets = {"base": [0.0] * 3, "close": [-0.01, -0.001, -0.004], "clear": [-0.05, -0.051, -0.049]}

    def execute(todo):
        return {r.key: {"final_val": 6.0 + SEED_SHIFT[r.seed] + offsets[r.label][(r.seed - 1337) % 3],
                        "diverged": None, "seed": r.seed, "tokens": 0} for r in todo}  # fmt: skip

    scale = bench_args().bench
    groups = {name: bench.runs(name, scale, 0.5, 3) for name in ("close", "clear")}
    base_runs, settled = bench.settle(execute, bench.runs("base", scale, 0.5, 3), groups, "less", 0.05, 5)
    assert [len(settled["close"]), len(settled["clear"]), len(base_runs)] == [5, 3, 5]
    assert {r.seed for r in base_runs} == {r.seed for r in settled["close"]}  # every seed of it paired


def test_a_run_stopped_by_the_bench_continues_from_its_checkpoint_to_the_uninterrupted_result(synthetic, tmp_path):
    flags = {**{k: v for k, v in TINY.items() if k != "max_steps"}, "eval_every": 20}  # a run's length is its own
    run = bench.Run("tiny", flags, 60, bench.FIRST_SEED)
    whole = bench.Executor(tmp_path / "whole", synthetic, 1)([run])[run.key]  # a worker process, start to end
    executor = bench.Executor(tmp_path / "cut", synthetic, 1)
    log = executor.work / "runs" / run.key / "train" / "log.jsonl"

    def stop_after_step_3():
        while not (log.exists() and '"step": 3' in log.read_text()):
            time.sleep(0.02)
        executor.stop()  # as on SIGTERM to the bench: its worker finishes the step and writes a checkpoint

    stopper = threading.Thread(target=stop_after_step_3)
    stopper.start()
    with pytest.raises(SystemExit, match="1 runs failed"):  # stopped: no result
        executor([run])
    stopper.join()
    cut = json.loads(log.read_text().splitlines()[-1])["step"]
    assert 3 <= cut < 59 and list(log.parent.glob("*.pt"))
    resumed = bench.Executor(tmp_path / "cut", synthetic, 1)([run])[run.key]  # the bench run again
    assert (whole["attempts"], resumed["attempts"]) == (1, 2)
    assert resumed["curve"] == whole["curve"] and len(whole["curve"]) == 4  # val at the start, after 20, 40, 60
    assert not list(log.parent.glob("*.pt"))  # the checkpoint goes once the result is written
