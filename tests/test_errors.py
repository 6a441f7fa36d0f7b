"""Errors: a user's mistake is one line and exit 2 (printed once per torchrun job), never a traceback or torch's
advice, and nothing is written; a diverged run exits 3; a bug shows its traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import ONE_THREAD, ROOT, SAMPLE_HELLASWAG, cli_flags, losses, modern_model, read_log, run_python, tiny

from gpt2.checkpoint import model_payload, save_checkpoint
from gpt2.config import GPTConfig, train_config
from gpt2.errors import UserError
from gpt2.hf import export_hf
from gpt2.rundir import find_checkpoints
from gpt2.trainer import train


@pytest.mark.slow
def test_usage_errors_are_one_line_and_gpt2_traceback_shows_the_traceback(tmp_path):
    bad = run_python("train.py", "--dtype", "fp8")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "invalid choice: 'fp8'" in bad.stderr
    missing = run_python("train.py", "--data", tmp_path / "nowhere", "--device", "cpu")
    assert missing.returncode == 2 and missing.stderr.startswith("error: data directory")
    traced = run_python("train.py", "--data", tmp_path / "nowhere", "--device", "cpu", env={"GPT2_TRACEBACK": "1"})
    assert traced.returncode != 0 and "Traceback (most recent call last)" in traced.stderr


def test_an_internal_error_shows_its_traceback():
    code = "from gpt2.errors import run_cli\ndef main():\n    raise ValueError('a bug')\nrun_cli(main)"
    proc = run_python("-c", code)
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.rstrip().endswith("ValueError: a bug")


@pytest.mark.slow
def test_under_torchrun_a_user_error_is_printed_once(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--data",
         str(tmp_path / "missing"), "--device", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.count(f"error: data directory {tmp_path / 'missing'} does not exist") == 1, proc.stderr


@pytest.mark.slow
def test_a_file_that_is_not_a_checkpoint_is_one_line_without_torchs_advice(tmp_path: Path):
    (tmp_path / "random.bin").write_bytes(bytes(range(1, 256)) * 16)
    torch.save({"model": {}, "args": argparse_namespace()}, tmp_path / "pickled.pt")
    for name, says in (("random.bin", "is not a file written by torch.save"),
                       ("pickled.pt", "holds pickled Python objects (argparse.Namespace)")):  # fmt: skip
        proc = run_python("eval_hellaswag.py", tmp_path / name, "--hellaswag-data", SAMPLE_HELLASWAG)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and says in lines[0], proc.stderr
        assert "weights_only" not in proc.stderr
    assert "python -m gpt2.convert" in proc.stderr  # what to do with a pickled (nanoGPT-style) checkpoint


def argparse_namespace():
    import argparse

    return argparse.Namespace(n_layer=2)


def strip_flags(args: list[str], names: list[str]) -> list[str]:
    """``args`` without the given flags and their values."""
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in names:
            skip = True
        else:
            kept.append(a)
    return kept


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.slow
def test_unknown_recipe_odd_rotary_head_and_exporting_a_modern_model_are_clear_errors(tmp_path: Path):
    bad = run_python("train.py", "--recipe", "llama")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "invalid choice: 'llama'" in bad.stderr
    with pytest.raises(UserError, match="unknown --recipe 'llama'"):
        train_config(recipe="llama")
    with pytest.raises(UserError, match="rotary embeddings need an even head dimension, got 9"):
        train_config(recipe="modern", n_embd=18, n_head=2).model_config()
    with pytest.raises(UserError, match=r"value_embeds=2 tables serve the first and the last 2 layers: at most"):
        train_config(recipe="modern", n_layer=3).model_config()  # the recipe's two tables need four layers
    with pytest.raises(ValueError, match="even head dimension"):
        GPTConfig(n_embd=18, n_head=2, rope_theta=10000.0)
    with pytest.raises(UserError, match=r"GPT2LMHeadModel cannot hold this architecture \(rope_theta=10000.0, "):
        export_hf(modern_model(), tmp_path / "hf")
    save_checkpoint(tmp_path / "ckpt_000001.pt", model_payload(modern_model(), 1))
    proc = run_python("-m", "gpt2.export", tmp_path / "ckpt_000001.pt", tmp_path / "hf")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "norm='rmsnorm'" in proc.stderr
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_a_diverged_run_exits_3_a_usage_error_2(synthetic: Path, tmp_path: Path):
    diverged = run_python("train.py", *cli_flags(synthetic, tmp_path, max_steps=4, lr=1e30, min_lr=1e30),
                          env=ONE_THREAD)  # fmt: skip
    assert diverged.returncode == 3 and diverged.stderr.startswith("error: non-finite"), diverged.stderr
    usage = run_python("train.py", *cli_flags(synthetic, tmp_path / "u", max_steps=4, lr=-1.0))
    assert usage.returncode == 2, usage.stderr


@pytest.mark.slow
def test_missing_data_directory_is_one_line_pointing_at_prepare_fineweb(tmp_path: Path):
    proc = run_python("train.py", *cli_flags(tmp_path / "nowhere", tmp_path / "out"), env=ONE_THREAD)
    assert_one_line_error(proc, "nowhere", "does not exist", "prepare_fineweb.py")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_init_from_gpt2_offline_is_one_line(synthetic: Path, tmp_path: Path):
    arch = ["--n-layer", "--n-head", "--n-embd", "--block-size", "--vocab-size"]  # --init-from brings its own
    flags = strip_flags(cli_flags(synthetic, tmp_path / "out", max_steps=1, warmup_steps=1), arch)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), **ONE_THREAD}
    proc = run_python("train.py", *flags, "--init-from", "gpt2", env=env)
    assert_one_line_error(proc, "cannot download 'gpt2'")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(seq_len=128), "--seq-len 128 exceeds the model's block size 64"),
        (dict(batch_tokens=100), "--batch-tokens 100 must be a multiple of --seq-len 32 x --micro-batch 2"),
        (dict(micro_batch=3), "--batch-tokens 128 must be a multiple of --seq-len 32 x --micro-batch 3"),
        (dict(warmup_steps=30), "--warmup-steps 30 exceeds --max-steps 20"),
        (dict(n_embd=33), "invalid architecture: n_embd (33) must be divisible by n_head (2)"),
        (dict(resume="never_written.pt"), "never_written.pt does not exist"),
        (dict(sample_every=5), "--sample-prompt \"Hello, I'm a language model,\" has token ids outside the model's"),
        (dict(sample_every=5, sample_prompt="a", max_new_tokens=64), "--max-new-tokens 64 exceeds the model's block"),
    ],
)
def test_bad_settings_are_clear_errors(synthetic: Path, tmp_path: Path, overrides: dict, message: str):
    with pytest.raises(UserError, match=re.escape(message)):
        train(tiny(synthetic, tmp_path / "out", **overrides))
    assert find_checkpoints(tmp_path / "out") == []


def test_empty_data_directory_is_a_clear_error(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"no train shards .* run prepare_fineweb.py"):
        train(tiny(tmp_path / "empty", tmp_path / "out"))


def test_out_of_another_architecture_is_refused(synthetic: Path, tmp_path: Path):
    train(tiny(synthetic, tmp_path, max_steps=2))
    with pytest.raises(
        UserError, match=r"ckpt_000002.pt is a checkpoint of a different architecture \(n_embd 32 vs 64"
    ):
        train(tiny(synthetic, tmp_path, max_steps=4, n_embd=64))
    assert [s for s, _ in find_checkpoints(tmp_path)] == [2]


def test_resume_never_refuses_a_non_empty_out(synthetic: Path, tmp_path: Path):
    train(tiny(synthetic, tmp_path, max_steps=2))
    with pytest.raises(UserError, match="is not empty and --resume is never"):
        train(tiny(synthetic, tmp_path, max_steps=4, resume="never"))
    assert len(losses(read_log(tmp_path))) == 2
