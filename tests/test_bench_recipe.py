"""The recipe bench's statistics (bench/bench_recipe.py): differences over the seeds two configurations share, the
paired and Welch p-values against scipy's tests written out here, and where a loss falling with the budget
crosses a target."""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys

import pytest
from scipy.stats import t as student
from support import ROOT

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
