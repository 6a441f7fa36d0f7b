"""Errors: a user's mistake is one line and exit 2 (printed once per torchrun job), never a traceback or torch's
advice; a bug shows its traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import ONE_THREAD, ROOT, SAMPLE_HELLASWAG, run_python


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
