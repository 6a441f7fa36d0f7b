"""HellaSwag as build-nanogpt scores it (the task ``hellaswag_nanogpt``) and ``eval_hellaswag.py``, the evaluation
runner with that task: scores equal a direct per-ending computation; batch size, rank count and packing never
change a prediction; run directories are scored incrementally into the run's one scores file (a previous release's
``hellaswag.jsonl`` read, not lost); bad input gives one clear line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from support import ROOT, reference_losses, run_python, tiny_model

from gpt2.checkpoint import model_payload, save_checkpoint
from gpt2.config import MODERN_BLOCK
from gpt2.distributed import DistContext
from gpt2.errors import UserError
from gpt2.evaluate import EvalResult, HellaSwagConfig, is_run_dir, run, watch_run
from gpt2.hellaswag import TASK, VAL_SHA256, Example, HellaSwagResult, ensure_val, evaluate, load_examples, pack_example
from gpt2.rundir import LEGACY_SCORES_FILE, LEGACY_TASK, SCORES_FILE, checkpoint_path, read_scores
from gpt2.scoring import ContinuationScorer, batch_tensors

WORDS = "the a man woman dog ball runs jumps over under quickly slowly red blue house tree water then and it".split()


def make_examples(n: int, seed: int = 0) -> list[Example]:
    """Examples of varied context and ending lengths (one-word endings included) from a fixed vocabulary."""
    g = torch.Generator().manual_seed(seed)
    words = lambda k: " ".join(WORDS[i] for i in torch.randint(len(WORDS), (k,), generator=g).tolist())
    lengths = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))
    return [
        Example(
            ind=i, ctx=words(lengths(1, 30)) + ".", endings=tuple(words(lengths(1, 12)) for _ in range(4)), label=i % 4
        )
        for i in range(n)
    ]


def write_jsonl(path: Path, examples: list[Example]) -> Path:
    path.write_text("".join(json.dumps({**asdict(e), "endings": list(e.endings)}) + "\n" for e in examples))
    return path


def argmin(values: list[float]) -> int:
    return min(range(len(values)), key=values.__getitem__)


def table(result: HellaSwagResult) -> str:
    """What the runner prints for ``result``."""
    return EvalResult({TASK: result.scores()}, {TASK: 0.25}, result.seconds).table()


# GPT-2's block, and the modern one with random weights everywhere and the optional soft-cap on (every piece on path)
BLOCKS = {"gpt2": {}, "modern": {**MODERN_BLOCK, "zero_init": False, "logit_softcap": 15.0}}


@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("block_size", [64, 12])  # 12: most contexts are left-truncated
def test_scores_equal_direct_per_ending_computation(block_size, block):
    model = tiny_model(block_size=block_size, **BLOCKS[block]).eval()
    examples = make_examples(24)
    result = evaluate(model, examples, DistContext(), batch_size=5, dtype="fp32", keep_predictions=True)
    assert result.n == len(examples)  # truncated examples are scored, never dropped
    correct = correct_norm = 0
    for example, pred in zip(examples, result.predictions):
        sums, means = reference_losses(model, example)
        assert pred.ind == example.ind and pred.label == example.label
        assert pred.sum_losses == pytest.approx(sums, rel=1e-5)
        assert pred.mean_losses == pytest.approx(means, rel=1e-5)
        assert (pred.pred, pred.pred_norm) == (argmin(sums), argmin(means))
        correct += argmin(sums) == example.label
        correct_norm += argmin(means) == example.label
    assert (result.correct, result.correct_norm) == (correct, correct_norm)
    assert result.acc == correct / len(examples) and result.acc_norm == correct_norm / len(examples)


def test_batch_size_and_compiled_wrapper_never_change_a_bit():
    model = tiny_model().eval()
    examples = make_examples(40, seed=1)
    runs = [
        evaluate(m, examples, DistContext(), batch_size=bs, dtype="fp32", keep_predictions=True).predictions
        for m, bs in [(model, 1), (model, 7), (model, 64), (torch.compile(model), 16)]
    ]
    assert all(r == runs[0] for r in runs[1:])  # dataclass equality: every float bit-identical


@torch.no_grad()
def test_a_rows_loss_does_not_depend_on_where_the_batch_ends():
    """A batch whose targets leave one row after the last full LM-head chunk (a one-row matmul is a gemv)."""
    model = tiny_model().eval()
    scorer = ContinuationScorer(model)  # head chunks of 64 rows
    rows = [pack_example(e, model.config.block_size) for e in make_examples(200, seed=7)]
    rows = [r for r in rows if r.bucket_len == rows[0].bucket_len]  # one batch: one bucket
    subsets = ([r for i, r in enumerate(rows[:k]) if i != j] for k in range(2, len(rows)) for j in range(k))
    batch = next(b for b in subsets if sum(len(r.targets) for r in b) % 64 == 1)
    batched = scorer(*batch_tensors(batch, "cpu"))[0].split([len(r.targets) for r in batch])
    for row, losses in zip(batch, batched):
        assert torch.equal(losses, scorer(*batch_tensors([row], "cpu"))[0])


@pytest.mark.slow
def test_compiled_scorer_agrees_with_eager():
    """--compile: one dynamic-shape graph serves every bucket length; same predictions, losses to fp32 rounding."""
    model = tiny_model().eval()
    examples = make_examples(12, seed=6)  # rows of 5 different bucket lengths
    eager, compiled = (
        evaluate(model, examples, DistContext(), batch_size=4, dtype="fp32", keep_predictions=True, compile=c)
        for c in (False, True)
    )
    for e, c in zip(eager.predictions, compiled.predictions):
        assert (c.pred, c.pred_norm) == (e.pred, e.pred_norm)
        assert c.sum_losses == pytest.approx(e.sum_losses, rel=1e-6)


def test_ending_longer_than_block_is_an_error():
    model = tiny_model(block_size=8)
    example = Example(ind=7, ctx="A man.", endings=("a b c d e f g h i j",) + ("runs",) * 3, label=0)
    with pytest.raises(UserError, match="example 7: an ending of 10 tokens does not fit the model's block size 8"):
        evaluate(model, [example], DistContext(), dtype="fp32")


def save_tiny_checkpoint(run_dir: Path, step: int, seed: int) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(run_dir, step)
    save_checkpoint(path, model_payload(tiny_model(seed=seed), step))
    return path


# One thread per process: the box is small and shared, and the results do not depend on it.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def torchrun(*args: str | Path) -> subprocess.CompletedProcess:
    return run_python("-m", "torch.distributed.run", "--nproc_per_node=2", *args, env=ONE_THREAD)


def python(*args: str | Path) -> subprocess.CompletedProcess:
    return run_python(*args, env=ONE_THREAD)


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    examples = make_examples(30, seed=2)
    data = write_jsonl(tmp_path / "hs.jsonl", examples)
    ckpt = save_tiny_checkpoint(tmp_path / "run", 100, seed=3)
    out, preds = tmp_path / "results.json", tmp_path / "preds.jsonl"
    proc = torchrun("eval_hellaswag.py", ckpt, "--hellaswag-data", data, "--dtype", "fp32", "--batch-size", "4",
                    "--out", out, "--predictions", preds)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    single = evaluate(tiny_model(seed=3).eval(), examples, DistContext(), dtype="fp32", keep_predictions=True)
    assert proc.stdout.strip() == table(single)
    summary = json.loads(out.read_text())
    assert summary.pop("seconds") > 0
    scores = {"acc": single.acc, "acc_norm": single.acc_norm, "n": 30}
    centered = (single.acc_norm - 0.25) / 0.75
    assert summary == {"target": str(ckpt), "step": 100, "tasks": {TASK: scores}, "centered_mean": centered}
    assert [json.loads(line) for line in preds.read_text().splitlines()] == [asdict(p) for p in single.predictions]


@pytest.mark.slow
def test_shared_val_predictions_identical_batched_unbatched_two_ranks(shared_data, tmp_path):
    """The acceptance check on real validation examples: --predictions files agree byte for byte.

    The first 300 of the 1,000 shared examples keep it fast; bench/bench_hellaswag.py checks all 1,000.
    """
    data = shared_data / "hellaswag" / "hellaswag_val_first1000.jsonl"
    limit = 300
    ckpt = checkpoint_path(tmp_path, 5)
    save_checkpoint(ckpt, model_payload(tiny_model(block_size=128, n_layer=1, n_embd=16, n_head=2), 5))
    texts = []
    for launch, batch_size in [(python, 64), (python, 1), (torchrun, 64)]:
        out = tmp_path / f"{launch.__name__}-{batch_size}.jsonl"
        proc = launch("eval_hellaswag.py", ckpt, "--hellaswag-data", data, "--limit", str(limit), "--dtype", "fp32",
                      "--batch-size", str(batch_size), "--predictions", out)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        texts.append(out.read_text())
    assert texts[0] == texts[1] == texts[2]
    assert [json.loads(line)["ind"] for line in texts[0].splitlines()] == [e.ind for e in load_examples(data, limit)]


def test_run_directory_is_scored_incrementally(tmp_path):
    examples = make_examples(12, seed=4)
    data = write_jsonl(tmp_path / "hs.jsonl", examples)
    run_dir = tmp_path / "run"
    for step in (10, 20):
        save_tiny_checkpoint(run_dir, step, seed=step)
    cfg = HellaSwagConfig(target=str(run_dir), hellaswag_data=data, dtype="fp32", progress=False)
    lines: list[str] = []
    assert len(run(cfg, report=lines.append)) == 2
    records = [json.loads(line) for line in (run_dir / SCORES_FILE).read_text().splitlines()]
    expected = {
        step: evaluate(tiny_model(seed=step).eval(), examples, DistContext(), dtype="fp32") for step in (10, 20)
    }
    assert records == [{"step": step, "task": TASK, **expected[step].scores()} for step in (10, 20)]
    assert lines == [f"step {step}:\n{table(expected[step])}" for step in (10, 20)]
    before = (run_dir / SCORES_FILE).read_bytes()
    assert run(cfg, report=lines.append) == []  # idempotent: nothing new, file untouched
    assert lines[-1] == f"every checkpoint in {run_dir} is already scored on these tasks in {SCORES_FILE}"
    assert (run_dir / SCORES_FILE).read_bytes() == before
    save_tiny_checkpoint(run_dir, 30, seed=30)
    (run_dir / "ckpt_000040.pt.tmp").write_bytes(b"half-written")  # a checkpoint being saved: never read
    assert len(run(cfg, report=lines.append)) == 1
    assert [json.loads(line)["step"] for line in (run_dir / SCORES_FILE).read_text().splitlines()] == [10, 20, 30]
    assert not (run_dir / f"{SCORES_FILE}.tmp").exists() and not (run_dir / LEGACY_SCORES_FILE).exists()


def test_a_previous_releases_scores_are_read_and_kept(tmp_path):
    """A run scored by the previous release has ``hellaswag.jsonl``: its checkpoints count as scored, and its records
    join the scores file when that is next written (the old file is left as it was)."""
    data = write_jsonl(tmp_path / "hs.jsonl", make_examples(6, seed=8))
    run_dir = tmp_path / "run"
    for step in (10, 20):
        save_tiny_checkpoint(run_dir, step, seed=step)
    old = '{"step": 10, "acc": 0.5, "acc_norm": 0.25, "n": 6}\n'
    (run_dir / LEGACY_SCORES_FILE).write_text(old)
    assert read_scores(run_dir) == [{"step": 10, "task": TASK, "acc": 0.5, "acc_norm": 0.25, "n": 6}]
    results = run(HellaSwagConfig(target=str(run_dir), hellaswag_data=data, dtype="fp32", progress=False), print)
    assert len(results) == 1  # step 20 only
    assert [(r["step"], r["task"], r["acc"]) for r in read_scores(run_dir)] == [
        (10, TASK, 0.5),
        (20, TASK, results[0].tasks[TASK]["acc"]),
    ]
    assert (run_dir / LEGACY_SCORES_FILE).read_text() == old
    assert [json.loads(line)["step"] for line in (run_dir / SCORES_FILE).read_text().splitlines()] == [10, 20]
    assert LEGACY_TASK == TASK


def test_which_targets_are_run_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("gpt2").mkdir()  # like this repository's package folder: `eval_hellaswag.py gpt2` means the hub id
    Path("hf").mkdir()
    Path("hf/config.json").write_text("{}")
    Path("new-run").mkdir()
    save_tiny_checkpoint(Path("gpt2-xl"), 1, seed=0)  # a hub id's name, but it holds checkpoints
    assert [is_run_dir(t) for t in ("gpt2", "hf", "new-run", "gpt2-xl", "missing")] == [False, False, True, True, False]


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
def test_watch_scores_new_checkpoints_and_waits_out_unreadable_ones(tmp_path):
    data = write_jsonl(tmp_path / "hs.jsonl", make_examples(6, seed=5))
    run_dir = tmp_path / "run"  # the watch starts before the trainer has made the run directory
    proc = subprocess.Popen(
        [sys.executable, "eval_hellaswag.py", run_dir, "--hellaswag-data", data, "--watch", "--interval", "0.2"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # Ctrl-C works even if ours is ignored
    )  # fmt: skip
    scored = lambda: [r["step"] for r in map(json.loads, (run_dir / SCORES_FILE).read_text().splitlines())]
    try:
        time.sleep(0.5)
        save_tiny_checkpoint(run_dir, 1, seed=1)
        wait_for(lambda: (run_dir / SCORES_FILE).exists())
        good = save_tiny_checkpoint(tmp_path, 2, seed=2).read_bytes()
        (run_dir / "ckpt_000002.pt").write_bytes(good[: len(good) // 2])  # copied in by hand, not yet complete
        time.sleep(1.0)
        assert scored() == [1] and proc.poll() is None  # skipped for now, the watch goes on
        (run_dir / "ckpt_000002.pt").write_bytes(good)
        wait_for(lambda: scored() == [1, 2])
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert stdout.startswith(f"watching {run_dir} for new checkpoints every 0.2s")
    assert [line for line in stdout.splitlines() if line.startswith("step")] == ["step 1:", "step 2:"]
    assert "skipping" in stderr and "ckpt_000002.pt" in stderr


def test_a_ctrl_c_that_a_finalizer_swallowed_still_ends_the_watch():
    class Finalized:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs here and its KeyboardInterrupt is dropped with the finalizer

    passes = []

    def score_pass() -> list:
        passes.append(len(passes))
        assert len(passes) < 5, "the watch went on after Ctrl-C"
        if len(passes) == 2:
            Finalized()  # collected at once, Ctrl-C during its __del__
        return []

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (not a background job)
    try:
        with pytest.raises(KeyboardInterrupt):
            watch_run("run", score_pass, say=lambda _: None, nothing_new="", watch=True, interval=0.01)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the usual handler is back
    finally:
        signal.signal(signal.SIGINT, previous)
    assert passes == [0, 1]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"ind": 1, "ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0', "not valid JSON"),
        ('{"ind": 1, "ctx": "A man", "endings": ["a", "b", "c"], "label": 0}', "expected exactly 4 endings, got 3"),
        ('{"ind": 1, "ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 4}', "label must be an integer 0-3"),
        ('{"ind": 1, "ctx": "A man", "endings": ["a", "b", "c", "d"]}', "label must be an integer 0-3, got None"),
    ],
)
def test_bad_example_is_reported_at_file_and_line(tmp_path, line, message):
    good = '{"ind": 0, "ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 2}'
    path = tmp_path / "hs.jsonl"
    path.write_text(f"{good}\n{line}\n{good}\n")
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}:2: {re.escape(message)}"):
        load_examples(path)
    assert len(load_examples(path, limit=1)) == 1  # the first line alone is fine


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path):
    bad_ckpt = tmp_path / "ckpt_000001.pt"
    bad_ckpt.write_bytes(b"not a checkpoint")
    data = write_jsonl(tmp_path / "hs.jsonl", make_examples(2))
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"ind": 0, "ctx": "x", "endings": [], "label": 0}\n')
    good_ckpt = save_tiny_checkpoint(tmp_path / "run", 1, seed=0)
    cases = [
        ((bad_ckpt, "--hellaswag-data", data), f"error: checkpoint {bad_ckpt} is not a file written by torch.save"),
        ((good_ckpt, "--hellaswag-data", bad_data), f"error: {bad_data}:1: expected exactly 4 endings, got 0"),
    ]
    for args, message in cases:
        proc = python("eval_hellaswag.py", *args)
        assert proc.returncode == 2
        assert proc.stderr.startswith(message) and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / 'missing.jsonl'))} does not exist$"):
        load_examples(tmp_path / "missing.jsonl")


def test_download_is_checked_and_offline_says_to_pass_data(tmp_path):
    impostor = tmp_path / "hellaswag_val.jsonl"
    impostor.write_text('{"ind": 0}\n')
    with pytest.raises(UserError, match=f"has sha256 .*, expected {VAL_SHA256}; not using it"):
        ensure_val(tmp_path / "cache", url=impostor.as_uri())
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-downloaded left behind
    with pytest.raises(UserError, match="cannot download HellaSwag .* pass --hellaswag-data FILE.jsonl"):
        ensure_val(tmp_path / "cache", url="http://127.0.0.1:9/hellaswag_val.jsonl", timeout=5)
