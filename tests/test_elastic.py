"""Elastic restarts (README, "Restarts after a lost worker"): under ``torchrun --max-restarts 1`` a worker killed
after a checkpoint makes torchrun restart the workers, which resume from the newest checkpoint and finish with the
losses of an uninterrupted run and a log.jsonl holding each step once; a rank that stops answering ends the job at
--collective-timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from support import ONE_THREAD, ROOT, cli_flags, losses, read_log, worker_pid

from gpt2 import distributed
from gpt2.checkpoint import find_checkpoints

NEEDS_PROC = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers in /proc")
# Slow enough steps (8 micro-steps each) that a kill lands mid-run; a checkpoint every 5 steps.
RUN = dict(max_steps=40, batch_tokens=1024, save_every=5, eval_every=10, val_tokens=512)
ENV = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)}


def torchrun(*flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *flags, "train.py"]


@pytest.mark.slow
@NEEDS_PROC
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_killed_worker_restarts_the_job_which_resumes_exactly(synthetic: Path, tmp_path: Path, parallel: str):
    out = tmp_path / "run"
    command = torchrun("--max-restarts", "1") + cli_flags(synthetic, out, parallel=parallel, **RUN)
    job = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while not find_checkpoints(out) and job.poll() is None:
            time.sleep(0.05)
        killed_after = find_checkpoints(out)[-1][0]
        os.kill(worker_pid(job.pid, rank=1), signal.SIGKILL)
        try:
            output, _ = job.communicate(timeout=600)
        except subprocess.TimeoutExpired as e:
            so_far = e.output.decode(errors="replace") if isinstance(e.output, bytes) else e.output or ""
            raise AssertionError(f"the job did not end; its output so far:\n{so_far[-5000:]}") from None
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, output[-5000:]
    assert "resuming from" in output and killed_after < 40, output[-5000:]  # the second attempt resumed

    straight = subprocess.run(torchrun() + cli_flags(synthetic, tmp_path / "straight", parallel=parallel, **RUN),
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]
    restarted, uninterrupted = read_log(out), read_log(tmp_path / "straight")
    for kind in ("train", "val"):  # losses() refuses a step logged twice
        assert losses(restarted, kind) == losses(uninterrupted, kind)
    assert sorted(losses(restarted)) == list(range(40))
    first, second = [r["step"] for r in restarted if r["kind"] == "memory"]
    assert first == 1 and second > killed_after  # each attempt's memory record, once


@pytest.mark.slow
@NEEDS_PROC
def test_a_rank_that_stops_answering_ends_the_job_at_the_collective_timeout(synthetic: Path, tmp_path: Path):
    command = torchrun() + cli_flags(synthetic, tmp_path, **{**RUN, "max_steps": 100_000}) + [
        "--collective-timeout", "5"]  # fmt: skip
    job = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stopped = None
    try:
        seen = []
        for line in job.stdout:
            seen.append(line)
            if line.startswith("step      2/"):
                stopped = worker_pid(job.pid, rank=1)
                os.kill(stopped, signal.SIGSTOP)  # alive, but never answers again
                break
        start = time.monotonic()
        rest, _ = job.communicate(timeout=300)
        ended_after = time.monotonic() - start
    finally:
        if stopped is not None:
            with_stopped_worker_gone(stopped)
        if job.poll() is None:
            job.kill()
            job.wait()
    output = "".join(seen) + rest
    assert job.returncode != 0, output[-3000:]
    assert "Timed out" in output or "timed out" in output, output[-3000:]
    assert ended_after < 120, ended_after  # the 5 s timeout, then torchrun's grace period for the stopped worker


def with_stopped_worker_gone(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_each_attempt_of_the_workers_meets_under_its_own_prefix_of_the_agents_store(monkeypatch):
    """Under torchrun's agent store, the process group starts on ``gpt2/attempt_<TORCHELASTIC_RESTART_COUNT>/`` of
    it, with the collective timeout; elsewhere on the env:// default."""
    import torch.distributed as dist

    stores, groups = [], []

    class FakeTCPStore:
        def __init__(self, host, port, world_size, is_master, timeout):
            stores.append((host, port, world_size, is_master, timeout))

    monkeypatch.setattr(dist, "TCPStore", FakeTCPStore)
    monkeypatch.setattr(dist, "PrefixStore", lambda prefix, store: ("prefix", prefix, store))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: groups.append(kwargs))
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    timeout = timedelta(seconds=42)
    ctx = distributed.init_distributed("cpu", timeout)
    assert (ctx.rank, ctx.world_size) == (1, 2)
    assert stores == [("10.0.0.1", 29400, 2, False, timeout)]  # a client of the agent's store
    (kwargs,) = groups
    assert kwargs["store"][:2] == ("prefix", "gpt2/attempt_2") and (kwargs["rank"], kwargs["world_size"]) == (1, 2)
    assert kwargs["backend"] == "gloo" and kwargs["timeout"] == timeout

    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")  # e.g. TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: plain env://
    distributed.init_distributed("cpu", timeout)
    assert "store" not in groups[-1] and groups[-1]["timeout"] == timeout and len(stores) == 1
