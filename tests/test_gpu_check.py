"""``make gpu-check`` (scripts/gpu_check.sh): its CPU smoke run yields every section with sane numbers, a failing
step stops it loudly, and its report reads the figures a GPU run will log."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import ONE_THREAD, ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def gpu_check(out: Path, **env: str) -> subprocess.CompletedProcess:
    """The script with the CPU smoke test's sizes, this Python, and ``env`` on top."""
    settings = {"PY": sys.executable, "OUT": str(out), "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_TINY": "1", **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env={**os.environ, **ONE_THREAD, **settings},
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def load_report_module():
    spec = importlib.util.spec_from_file_location("gpu_check_report", ROOT / "scripts" / "gpu_check_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_smoke_run_reports_every_section(tmp_path: Path):
    r = gpu_check(tmp_path / "out")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert {"date", "elapsed_s", "host", "settings", "train", "hellaswag", "prepare"} <= result.keys()
    assert result["host"]["torch"] == torch.__version__ and result["host"]["cpu_cores"] >= 1

    runs = [t["run"] for t in result["train"]]
    # Both recipes, then checkpointing, FSDP, both, and --micro-batch auto (the memory section), then every
    # second-generation piece
    assert runs == ["gpt2_mb4", "modern_mb4", "gpt2_mb4_ac", "gpt2_mb4_fsdp", "gpt2_mb4_fsdp_ac", "gpt2_auto",
                    "pieces_mb4"]  # fmt: skip
    assert [t["micro_batch"] for t in result["train"]] == [4, 4, 4, 4, 4, 8, 4]  # auto: the whole share, on a CPU
    assert all(t["planned_gib"] > 0 and t["measured_peak_gib"] > 0 for t in result["train"])
    for t in result["train"]:
        assert t["tok_per_s"] > 0 and t["median_step_s"] > 0 and math.isfinite(t["compile_s"])
        assert t["first_loss"] == pytest.approx(math.log(50257), abs=0.5) and t["final_loss"] < t["first_loss"] + 0.5
        assert t["mfu"] is None or 0 < t["mfu"] < 1
        assert t["peak_memory"] is None or all(v > 0 for v in t["peak_memory"].values())

    pieces = [json.loads(line) for line in (tmp_path / "out" / "train" / "pieces_mb4" / "log.jsonl").open()]
    assert [r["step"] for r in pieces if r["kind"] in ("val", "sample")] == [0, 4, 4]  # val at 0 and 4, one sample

    hellaswag = result["hellaswag"]
    assert hellaswag["n"] == 50 and hellaswag["examples_per_s"] > 0 and 0 <= hellaswag["acc_norm"] <= 1

    assert [(p["workers"], p["tokens"]) for p in result["prepare"]] == [(1, 200_000), (2, 400_000)]
    assert all(p["tok_per_s"] > 0 for p in result["prepare"])

    summary = (tmp_path / "out" / "gpu_check.md").read_text()
    assert all(f"| {run} |" in summary for run in runs) and "examples/s" in summary and "| 2 | 400,000 |" in summary
    assert (tmp_path / "out" / "logs").is_dir() and not (tmp_path / "out" / "work").exists()  # scratch removed


@pytest.mark.slow
def test_a_failing_step_stops_the_check_with_its_error(tmp_path: Path):
    # CUDA asked for with every GPU hidden: the first step that needs one fails, on any machine
    r = gpu_check(tmp_path / "out", GPU_CHECK_DEVICE="cuda", CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 1
    assert "gpu-check: FAILED:" in r.stderr and "no CUDA GPU is available" in r.stderr
    assert not (tmp_path / "out" / "gpu_check.json").exists()


def test_report_reads_compile_time_memory_and_refuses_a_non_finite_loss(tmp_path: Path):
    report = load_report_module()
    log = tmp_path / "log.jsonl"
    records = [{"step": s, "kind": "train", "loss": 5.0 - s, "dt_ms": 30_000.0 if s == 0 else 100.0 + s,
                "tok_per_s": 1e5 * (s + 1), "mfu": 0.4, "cuda_max_mem_gb": 40.0 + s, "rss_mem": None}
               for s in range(4)]  # fmt: skip
    log.write_text("".join(json.dumps(r) + "\n" for r in [*records, {"step": 4, "kind": "val", "loss": 1.0}]))
    run = report.training_run(log, steps=4, wall_s=60.0)
    assert run["compile_s"] == pytest.approx(29.898) and run["median_step_s"] == pytest.approx(0.102)
    assert run["planned_gib"] is None and run["micro_batch"] is None  # a log without a memory record
    assert run["tok_per_s"] == 3e5 and run["mfu"] == 0.4 and run["peak_memory"] == {"cuda_max_mem_gb": 43.0}

    log.write_text("".join(json.dumps({**r, "loss": float("nan")}) + "\n" for r in records))
    with pytest.raises(report.CheckFailed, match="non-finite loss"):
        report.training_run(log, steps=4, wall_s=60.0)
    with pytest.raises(report.CheckFailed, match="expected train steps 0..4"):
        report.training_run(log, steps=5, wall_s=60.0)
