"""The trainer, under every recipe: DDP equals accumulation, exact resume (also after SIGTERM, and onto another world
size), learning on real text, compile, MFU, checkpoints and logs."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from support import (
    ONE_THREAD,
    ROOT,
    TINY,
    Capture,
    cli_flags,
    losses,
    lr_at,
    read_log,
    tiny,
    worker_pid,
    write_shards,
)

from gpt2.checkpoint import load_checkpoint, load_model
from gpt2.config import SIZE_FIELDS, train_config
from gpt2.data import ValLoader
from gpt2.errors import UserError
from gpt2.metrics import datasheet_peak, device_peak, mfu
from gpt2.rundir import find_checkpoints
from gpt2.runlog import ConsoleReporter, format_duration
from gpt2.tokenizer import EOT_ID, get_encoding
from gpt2.trainer import NonFiniteLoss, StopRequest, train

# Every guarantee of the trainer holds for every recipe: the invariants below run under each. The modern one with
# its optional soft-cap on too, so that every piece of it is on the path.
RECIPES = {"gpt2": {}, "modern": dict(recipe="modern", warmup_steps=1, logit_softcap=15.0, n_layer=4)}
each_recipe = pytest.mark.parametrize("recipe", list(RECIPES))


@pytest.fixture(scope="module", params=list(RECIPES))
def straight(request: pytest.FixtureRequest, synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """``(recipe, log)`` of an uninterrupted 20-step run with validation every 5 steps (the resume reference)."""
    out = tmp_path_factory.mktemp("straight")
    train(tiny(synthetic, out, eval_every=5, **RECIPES[request.param]))
    return request.param, read_log(out)


# ----------------------------------------------------------------------------------------------------------------------
# Pure pieces


def test_mfu_is_flops_per_token_times_throughput_over_peak():
    assert mfu(6e8, 1e5, 1.2e14) == pytest.approx(0.5)
    assert mfu(6e8, 1e5, None) is None
    assert datasheet_peak("cpu") is None
    assert device_peak("cpu", 3e12) == 3e12 and device_peak("cpu", None) is None
    assert train_config(peak_tflops="989").peak_flops() == 989e12
    with pytest.raises(UserError, match="--peak-tflops"):
        train_config(peak_tflops="fast")


# ----------------------------------------------------------------------------------------------------------------------
# The acceptance criteria


@pytest.mark.slow
@each_recipe
def test_ddp_on_two_ranks_equals_gradient_accumulation_in_one_process(synthetic: Path, tmp_path: Path, recipe: str):
    """torchrun with 1 micro-step per rank vs 1 process with 2 micro-steps: the same global batches and losses;
    and the two-rank run's checkpoint (Muon's and AdamW's state included) continues in one process as if it had
    been one all along."""
    run = dict(max_steps=6, eval_every=3, val_tokens=1024, micro_batch=2, batch_tokens=128, save_every=3,
               **RECIPES[recipe])  # fmt: skip
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
         *cli_flags(synthetic, tmp_path / "ddp", **run)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD},
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es) on cpu | 128 tokens/step = 2 x 1 x 2 x 32" in ddp.stdout
    single = Capture()
    train(tiny(synthetic, tmp_path / "single", **run), single)
    assert any("1 process(es) on cpu | 128 tokens/step = 1 x 2 x 2 x 32" in m for m in single.messages)

    ddp_log = read_log(tmp_path / "ddp")
    for kind in ("train", "val"):
        a, b = losses(ddp_log, kind), losses(single.records, kind)
        assert sorted(a) == sorted(b) == ([0, 1, 2, 3, 4, 5] if kind == "train" else [0, 3, 6])
        for step in a:
            assert a[step] == pytest.approx(b[step], rel=1e-5), (kind, step)
    assert losses(ddp_log)[5] < losses(ddp_log)[0]  # and it is actually learning
    # The checkpoint is the same state too (written by rank 0 of the DDP run).
    w_ddp = load_checkpoint(tmp_path / "ddp" / "ckpt_000006.pt")["model"]
    w_one = load_checkpoint(tmp_path / "single" / "ckpt_000006.pt")["model"]
    for name, tensor in w_one.items():
        torch.testing.assert_close(w_ddp[name], tensor, rtol=1e-4, atol=1e-6)

    # A different world size resumes the same run: one process continues the two-rank run from step 3.
    branch = Capture()
    train(tiny(synthetic, tmp_path / "resized", **{**run, "resume": str(tmp_path / "ddp" / "ckpt_000003.pt")}), branch)
    resized, reference = losses(branch.records), losses(single.records)
    assert sorted(resized) == [3, 4, 5]
    assert all(resized[s] == pytest.approx(reference[s], rel=1e-5) for s in resized)


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(synthetic: Path, tmp_path: Path, straight: tuple):
    recipe, straight = straight
    stop = StopRequest()
    first = Capture(stop, stop_after=10)
    result = train(tiny(synthetic, tmp_path, eval_every=5, **RECIPES[recipe]), first, stop)
    assert (result.step, result.stopped_by, result.checkpoint) == (10, "test", tmp_path / "ckpt_000010.pt")
    assert [s for s, _ in find_checkpoints(tmp_path)] == [10]
    ckpt = load_checkpoint(result.checkpoint)  # weights_only=True
    assert ckpt["step"] == 10 and ckpt["loader"]["step"] == 10
    assert ckpt["progress"] == {"step": 10, "val_loss": losses(straight, "val")[10]}
    assert ckpt["train_config"]["max_steps"] == 20 and ckpt["config"]["vocab_size"] == 256
    assert {"model", "optimizer", "loader", "rng", "progress", "train_config"} <= ckpt.keys()

    second = Capture()
    result = train(tiny(synthetic, tmp_path, eval_every=5, **RECIPES[recipe]), second)
    assert result.step == 20 and result.stopped_by is None
    assert any(f"resuming from {tmp_path / 'ckpt_000010.pt'} at step 10" in m for m in second.messages)
    assert min(losses(second.records)) == 10  # nothing before the checkpoint is redone
    resumed_log = read_log(tmp_path)  # the same log, appended to: each step exactly once
    for kind in ("train", "val"):
        assert losses(resumed_log, kind) == losses(straight, kind)  # exact equality, fp32 on CPU
    grad_norms = {r["step"]: r["grad_norm"] for r in resumed_log if r["kind"] == "train"}
    assert grad_norms == {r["step"]: r["grad_norm"] for r in straight if r["kind"] == "train"}


def test_resume_from_a_given_checkpoint_into_a_new_run_directory(synthetic: Path, tmp_path: Path):
    train(tiny(synthetic, tmp_path / "a", max_steps=6, save_every=2))
    branch = Capture()
    train(tiny(synthetic, tmp_path / "b", max_steps=6, resume=str(tmp_path / "a" / "ckpt_000002.pt")), branch)
    assert losses(branch.records) == {s: loss for s, loss in losses(read_log(tmp_path / "a")).items() if s >= 2}


def signal_after_step_2(command: list[str], env: dict, send: Callable[[subprocess.Popen], None]) -> tuple[int, str]:
    """Run ``command``; once it reports step 2, ``send`` it a signal; return its exit code and all its output."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("step      2/"):
                send(proc)
                break
        rest, _ = proc.communicate(timeout=120)
        return proc.returncode, "".join(seen) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_the_same_command_resumes(synthetic: Path, tmp_path: Path):
    """Steps made slower (4 micro-steps) so the signal lands mid-run; the result equals an uninterrupted run."""
    run = dict(max_steps=100, batch_tokens=256, save_every=1000)
    command = [sys.executable, "train.py", *cli_flags(synthetic, tmp_path / "run", **run)]
    env = {**os.environ, **ONE_THREAD}
    returncode, output = signal_after_step_2(command, env, lambda proc: proc.send_signal(signal.SIGTERM))
    assert returncode == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM after step" in output and "run the same command again to resume" in output
    (stopped_at, path), = find_checkpoints(tmp_path / "run")  # fmt: skip
    assert 3 <= stopped_at < 100 and load_checkpoint(path)["step"] == stopped_at
    assert len(losses(read_log(tmp_path / "run"))) == stopped_at

    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {path} at step {stopped_at}" in resumed.stdout
    train(tiny(synthetic, tmp_path / "straight", **run))
    assert losses(read_log(tmp_path / "run")) == losses(read_log(tmp_path / "straight"))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(synthetic: Path, tmp_path: Path):
    run = dict(max_steps=100, batch_tokens=256, save_every=1000)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               *cli_flags(synthetic, tmp_path / "run", **run)]  # fmt: skip
    env = {**os.environ, **ONE_THREAD}
    # Only rank 1 is signalled; rank 0, which logs and saves, hears of it through the ranks' agreement.
    returncode, output = signal_after_step_2(
        command, env, lambda proc: os.kill(worker_pid(proc.pid, rank=1), signal.SIGTERM)
    )
    assert returncode != 0, output  # torchrun passes on its workers' 143
    assert "stopped by SIGTERM after step" in output  # rank 0 adopted rank 1's signal and stopped with it
    (stopped_at, path), = find_checkpoints(tmp_path / "run")  # fmt: skip
    assert 3 <= stopped_at < 100 and len(losses(read_log(tmp_path / "run"))) == stopped_at

    train(tiny(synthetic, tmp_path / "run", **run))  # resumed in one process
    train(tiny(synthetic, tmp_path / "straight", **run))
    resumed, straight = losses(read_log(tmp_path / "run")), losses(read_log(tmp_path / "straight"))
    assert sorted(resumed) == list(range(100))
    assert all(resumed[s] == pytest.approx(straight[s], rel=1e-5) for s in straight)


REAL_VOCAB = 1024


@pytest.fixture(scope="module")
def real_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded C4 sample tokenized as prepare_fineweb.py does ([EOT] + GPT-2 tokens per document), with ids
    renumbered by frequency into a 1024-token vocabulary (the rarest share the last id) so that a tiny model's
    output layer is cheap: the text and its tokenization stay real."""
    enc = get_encoding()
    docs = [json.loads(line)["text"] for line in (ROOT / "data" / "sample" / "c4.jsonl").read_text().splitlines()]
    tokens = np.concatenate([np.array([EOT_ID, *enc.encode_ordinary(doc)]) for doc in docs])
    ids, counts = np.unique(tokens, return_counts=True)
    by_frequency = ids[np.argsort(-counts, kind="stable")][: REAL_VOCAB - 1]
    renumber = np.full(enc.n_vocab, REAL_VOCAB - 1)
    renumber[by_frequency] = np.arange(len(by_frequency))
    tokens = renumber[tokens]
    return write_shards(tmp_path_factory.mktemp("c4"), tokens[:4096], [tokens[4096:]])


def test_loss_on_real_text_falls_well_below_its_start(real_text: Path, tmp_path: Path):
    cap = Capture()
    cfg = tiny(real_text, tmp_path, vocab_size=REAL_VOCAB, n_embd=64, micro_batch=8, batch_tokens=256,
               max_steps=200, warmup_steps=10, lr=3e-3, min_lr=3e-4, eval_every=100, val_tokens=4000)  # fmt: skip
    train(cfg, cap)
    val = losses(cap.records, "val")
    assert val[0] == pytest.approx(math.log(REAL_VOCAB), abs=0.1)  # a fresh model is close to uniform
    assert val[200] < val[0] - 1.5, val  # held-out text: 6.9 -> about 4.9
    train_losses = list(losses(cap.records).values())
    assert np.mean(train_losses[-20:]) < np.mean(train_losses[:5]) - 1.5


@pytest.mark.slow
@each_recipe
def test_compiled_run_trains_evaluates_and_samples(synthetic: Path, tmp_path: Path, recipe: str):
    """torch.compile on: training, validation through the compiled model, sampling through the plain one."""
    cap = Capture()
    cfg = tiny(synthetic, tmp_path, compile=True, max_steps=3, eval_every=3, val_tokens=256, sample_every=3,
               sample_prompt="a", num_samples=2, max_new_tokens=4, **RECIPES[recipe])  # fmt: skip
    train(cfg, cap)
    assert sorted(losses(cap.records)) == [0, 1, 2] and sorted(losses(cap.records, "val")) == [0, 3]
    assert any("compile on" in m for m in cap.messages)
    (sample,) = [r for r in cap.records if r["kind"] == "sample"]
    assert sample["step"] == 3 and len(sample["text"]) == 2
    assert all(t.startswith("a") and len(t) > 1 for t in sample["text"])
    eager = Capture()
    train(tiny(synthetic, tmp_path / "eager", max_steps=3, eval_every=3, val_tokens=256, **RECIPES[recipe]),
          eager)  # fmt: skip
    for step, loss in losses(eager.records).items():
        assert losses(cap.records)[step] == pytest.approx(loss, rel=1e-4)
    assert losses(cap.records, "val")[3] == pytest.approx(losses(eager.records, "val")[3], rel=1e-4)


def test_hellaswag_in_the_loop_matches_the_evaluator_on_the_checkpoint(synthetic: Path, tmp_path: Path):
    """The trainer's ``hellaswag`` record of a step holds what the evaluation runner's scores record of that step's
    checkpoint holds (the plot shows both in one panel)."""
    from gpt2.distributed import DistContext
    from gpt2.evaluate import HellaSwagConfig, run
    from gpt2.hellaswag import TASK, evaluate, load_examples
    from gpt2.rundir import read_scores

    data = ROOT / "data" / "sample" / "hellaswag_val_200.jsonl"
    cap = Capture()
    cfg = tiny(synthetic, tmp_path, vocab_size=50257, max_steps=2, hellaswag_every=2, hellaswag_data=str(data),
               hellaswag_limit=12)  # fmt: skip
    train(cfg, cap)
    records = [r for r in cap.records if r["kind"] == "hellaswag"]
    assert [(r["step"], r["n"]) for r in records] == [(0, 12), (2, 12)]
    model, _ = load_model(tmp_path / "ckpt_000002.pt")
    expected = evaluate(model, load_examples(data, limit=12), DistContext(), dtype="fp32")
    assert (records[1]["acc"], records[1]["acc_norm"]) == (expected.acc, expected.acc_norm)
    run(HellaSwagConfig(target=str(tmp_path), hellaswag_data=data, limit=12, dtype="fp32", progress=False), print)
    assert read_scores(tmp_path) == [{"step": 2, "task": TASK, **{k: v for k, v in records[1].items() if k != "kind"}}]


def test_init_from_a_hugging_face_directory_starts_from_its_weights(synthetic: Path, tmp_path: Path):
    """--init-from DIR: the pretrained weights, vocabulary padded to a multiple of 64, scored unchanged at step 0."""
    from gpt2.config import GPTConfig
    from gpt2.distributed import DistContext
    from gpt2.hf import export_hf
    from gpt2.model import GPT
    from gpt2.trainer import evaluate_loss

    torch.manual_seed(1)
    pretrained = GPT(GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=2, n_embd=32))
    export_hf(pretrained, tmp_path / "hf")
    cap = Capture()
    run = {k: v for k, v in TINY.items() if k not in SIZE_FIELDS}  # the architecture is the pretrained model's
    run.update(init_from=str(tmp_path / "hf"), max_steps=1, warmup_steps=1, eval_every=1)
    train(train_config(data=str(synthetic), out=str(tmp_path / "run"), **run), cap)
    expected = evaluate_loss(pretrained, ValLoader(synthetic, 32, 1024, 2, vocab_size=300), DistContext(), "fp32")
    assert losses(cap.records, "val")[0] == pytest.approx(expected, rel=1e-6)
    config = load_checkpoint(tmp_path / "run" / "ckpt_000001.pt")["config"]
    assert (config["vocab_size"], config["vocab_multiple"], config["n_embd"]) == (300, 64, 32)


# ----------------------------------------------------------------------------------------------------------------------
# Logs and checkpoints


def test_log_records_and_checkpoints_keep_last(synthetic: Path, tmp_path: Path):
    cap = Capture()
    train(tiny(synthetic, tmp_path, max_steps=6, save_every=2, keep_last=2, eval_every=3, val_tokens=256), cap)
    assert [s for s, _ in find_checkpoints(tmp_path)] == [4, 6]
    log = read_log(tmp_path)
    assert log == cap.records
    train_rec = [r for r in log if r["kind"] == "train"]
    assert [r["step"] for r in train_rec] == list(range(6))
    assert set(train_rec[0]) == {"step", "kind", "loss", "lr", "grad_norm", "tokens", "dt_ms", "tok_per_s", "mfu"}
    assert [r["tokens"] for r in train_rec] == [128 * (s + 1) for s in range(6)]
    assert [r["lr"] for r in train_rec] == [
        lr_at(s, lr=6e-4, min_lr=6e-5, warmup_steps=2, max_steps=6) for s in range(6)
    ]
    assert all(r["tok_per_s"] == pytest.approx(128 / (r["dt_ms"] / 1000)) and r["mfu"] is None for r in train_rec)
    assert [(r["step"], set(r)) for r in log if r["kind"] == "val"] == [
        (s, {"step", "kind", "loss"}) for s in (0, 3, 6)
    ]

    # A measured (here: given) peak turns into MFU = flops/token x tokens/s / peak.
    cap = Capture()
    train(tiny(synthetic, tmp_path / "mfu", max_steps=1, warmup_steps=1, peak_tflops="0.001"), cap)
    (rec,) = [r for r in cap.records if r["kind"] == "train"]
    from gpt2.model import GPT

    flops = GPT(tiny(synthetic, tmp_path).model_config()).flops_per_token(32)
    assert rec["mfu"] == pytest.approx(flops * rec["tok_per_s"] / 1e9)


def test_console_shows_one_line_per_step_with_an_eta_that_ignores_the_compile_step():
    stream = io.StringIO()
    console = ConsoleReporter(max_steps=100, stream=stream)
    rec = dict(kind="train", loss=5.0, lr=6e-4, grad_norm=0.5, tokens=0, tok_per_s=1e4, mfu=0.4)
    console.record({**rec, "step": 0, "dt_ms": 60_000.0})  # compilation
    console.record({**rec, "step": 1, "dt_ms": 100.0})
    console.record({"step": 2, "kind": "val", "loss": 4.25})
    first, second, val = stream.getvalue().splitlines()
    assert first.startswith("step      0/100 | loss 5.000000") and "mfu 40.0%" in first and "eta 1h39m" in first
    assert second.endswith("eta 10s")  # 98 steps x 100 ms
    assert val == "step      2 | val loss 4.2500"
    assert format_duration(3725) == "1h02m" and format_duration(75) == "1m15s"


def test_a_log_line_cut_short_by_a_crash_is_dropped_on_resume(synthetic: Path, tmp_path: Path):
    train(tiny(synthetic, tmp_path, max_steps=2, save_every=2))
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 2, "kind": "tra')
    train(tiny(synthetic, tmp_path, max_steps=4, save_every=2))
    assert sorted(losses(read_log(tmp_path))) == [0, 1, 2, 3]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(synthetic: Path, tmp_path: Path):
    train(tiny(synthetic, tmp_path, max_steps=4, save_every=2))
    newest = tmp_path / "ckpt_000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a torn write from a crashed copy
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 4, "kind": "tra')  # and a log line the crash cut short
    cap = Capture()
    result = train(tiny(synthetic, tmp_path, max_steps=6, save_every=2), cap)
    assert any("ckpt_000004.pt cannot be loaded" in m and "falling back" in m for m in cap.messages)
    assert any("resuming from" in m and "ckpt_000002.pt at step 2" in m for m in cap.messages)
    assert any("dropped 2 records after step 2" in m for m in cap.messages)  # steps 2 and 3; the torn line is no record
    assert result.step == 6 and load_checkpoint(newest)["step"] == 4  # rewritten, whole
    assert sorted(losses(read_log(tmp_path))) == list(range(6))


@pytest.mark.parametrize(
    "lr, save_every, eval_every, message",
    [
        (1e30, 2, 0, r"non-finite loss nan, gradient norm nan at step 5"),  # huge weights: the forward overflows
        (1e39, 1, 0, r"non-finite weights after step 5"),  # beyond float32: the update overflows the weights
        (1e39, 0, 5, r"non-finite validation loss nan at step 5"),  # evaluated before anything is saved
    ],
)
def test_non_finite_training_stops_naming_the_step_and_keeps_the_last_checkpoint(
    synthetic: Path, tmp_path: Path, lr: float, save_every: int, eval_every: int, message: str
):
    train(tiny(synthetic, tmp_path, max_steps=4, save_every=2))
    before = (tmp_path / "ckpt_000004.pt").read_bytes()
    # An absurd learning rate from step 4 on blows the model up.
    expected = message + r"; stopping \(the last good checkpoint .*ckpt_000004.pt is untouched\)"
    with pytest.raises(NonFiniteLoss, match=expected):
        train(tiny(synthetic, tmp_path, max_steps=8, save_every=save_every, eval_every=eval_every, lr=lr, min_lr=lr))
    assert [s for s, _ in find_checkpoints(tmp_path)] == [2, 4]
    assert (tmp_path / "ckpt_000004.pt").read_bytes() == before


# ----------------------------------------------------------------------------------------------------------------------
# One-line errors


@pytest.mark.slow
def test_kill_9_while_checkpoints_are_written_loses_nothing(synthetic: Path, tmp_path: Path):
    """A checkpoint every step, so SIGKILL lands during or between checkpoint writes; whatever it hits, every
    checkpoint on disk loads, and relaunching the same command ends with the uninterrupted run's losses."""
    run = dict(max_steps=60, save_every=1, keep_last=2)
    command = [sys.executable, "train.py", *cli_flags(synthetic, tmp_path / "run", **run)]
    env = {**os.environ, **ONE_THREAD}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (tmp_path / "run" / "ckpt_000005.pt").exists() and proc.poll() is None:
            pass  # spin: the kill should land at an arbitrary moment, often inside a write
        proc.kill()
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for _, path in find_checkpoints(tmp_path / "run"):
        load_checkpoint(path)  # no torn file ever carries a checkpoint's name
    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    train(tiny(synthetic, tmp_path / "straight", **run))
    assert losses(read_log(tmp_path / "run")) == losses(read_log(tmp_path / "straight"))
