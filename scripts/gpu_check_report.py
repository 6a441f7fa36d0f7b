"""The results of ``scripts/gpu_check.sh``, checked and summarised into OUT/gpu_check.json and OUT/gpu_check.md.

Reads what the script left in OUT: ``timings.tsv`` (section, name, start, end: wall-clock seconds of each
command), ``train/<run>/log.jsonl`` (the train records of each training run), ``hellaswag.json``
(``eval_hellaswag.py --out``) and, for each prepare run, the manifest in ``WORK/prepare_<workers>``.
Any result that is missing, incomplete or not a finite positive number is an error: exit status 1.

    python scripts/gpu_check_report.py OUT --work WORK --started T0 --setting steps=30 ...
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

from gpt2.prepare import default_workers


class CheckFailed(Exception):
    """A result of the GPU check is missing or not sane."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def read_timings(out: Path) -> dict[tuple[str, str], float]:
    """(section, name) -> wall-clock seconds, from the lines the script appended to ``timings.tsv``."""
    timings = {}
    for line in (out / "timings.tsv").read_text().splitlines():
        section, name, start, end = line.split("\t")
        timings[section, name] = float(end) - float(start)
    return timings


def training_run(log: Path, steps: int, wall_s: float) -> dict[str, Any]:
    """Throughput, MFU, peak memory and compile time of one run, from its ``log.jsonl``.

    Step 0 includes compilation: the compile time is its duration less the median of the other steps.
    Memory: the largest value of each train-record key containing "mem" (as logged), where there are numbers;
    and from the memory record (where the trainer writes one) the micro-batch, the planned total per process and
    the measured peak.
    """
    records = [json.loads(line) for line in log.read_text().splitlines()]
    plans = [r for r in records if r["kind"] == "memory"]
    train = sorted((r for r in records if r["kind"] == "train"), key=lambda r: r["step"])
    require([r["step"] for r in train] == list(range(steps)), f"{log}: expected train steps 0..{steps - 1}")
    require(all(math.isfinite(r["loss"]) for r in train), f"{log}: a non-finite loss")
    rest = train[1:] or train
    median_step_ms = statistics.median(r["dt_ms"] for r in rest)
    mfus = [r["mfu"] for r in rest if r.get("mfu") is not None]
    memory_keys = sorted({k for r in train for k, v in r.items() if "mem" in k and positive(v)})
    run = {
        "tok_per_s": statistics.median(r["tok_per_s"] for r in rest),
        "mfu": statistics.median(mfus) if mfus else None,
        "peak_memory": {k: max(r[k] for r in train if positive(r.get(k))) for k in memory_keys} or None,
        "compile_s": (train[0]["dt_ms"] - median_step_ms) / 1e3,
        "first_step_s": train[0]["dt_ms"] / 1e3,
        "median_step_s": median_step_ms / 1e3,
        "first_loss": train[0]["loss"],
        "final_loss": train[-1]["loss"],
        "wall_s": wall_s,
        "micro_batch": plans[0]["micro_batch"] if plans else None,
        "planned_gib": plans[0]["total_gib"] if plans else None,
        "measured_peak_gib": plans[0]["measured_peak_gib"] if plans else None,
    }
    require(positive(run["tok_per_s"]) and positive(run["median_step_s"]), f"{log}: no positive throughput")
    return run


def hellaswag(out: Path, wall_s: float) -> dict[str, Any]:
    summary = json.loads((out / "hellaswag.json").read_text())
    result = {**summary["tasks"]["hellaswag_nanogpt"], "seconds": summary["seconds"]}
    require(result["n"] > 0 and positive(result["seconds"]), f"{out / 'hellaswag.json'}: nothing was scored")
    require(0 <= result["acc_norm"] <= 1 and 0 <= result["acc"] <= 1, f"{out / 'hellaswag.json'}: bad accuracy")
    return {**result, "examples_per_s": result["n"] / result["seconds"], "wall_s": wall_s}


def prepare_run(work: Path, name: str, seconds: float) -> dict[str, Any]:
    """One prepare_fineweb.py run: its tokens (from the manifest) over its wall-clock time, start-up included."""
    manifest = json.loads((work / f"prepare_{name}" / "manifest.json").read_text())
    require(manifest["complete"] and manifest["tokens"] > 0, f"prepare with --workers {name} did not complete")
    workers = default_workers() if name == "all" else int(name)
    return {"workers": workers, "label": name, "tokens": manifest["tokens"], "seconds": seconds,
            "tok_per_s": manifest["tokens"] / seconds}  # fmt: skip


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo, as lscpu shows it)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def host() -> dict[str, Any]:
    """The machine and software the figures were measured on."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "gpus": torch.cuda.device_count(), "cpu": cpu_model(), "cpu_cores": default_workers(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}  # fmt: skip


def report(out: Path, work: Path, started: float, settings: dict[str, str]) -> dict[str, Any]:
    """Every section's results, checked; raises ``CheckFailed`` on the first that is missing or wrong."""
    timings = read_timings(out)
    steps = int(settings["steps"])
    runs = [
        {"run": name, **training_run(out / "train" / name / "log.jsonl", steps, seconds)}
        for (section, name), seconds in timings.items()
        if section == "train"
    ]
    require(bool(runs), "no training run")
    eval_seconds = [s for (section, _), s in timings.items() if section == "hellaswag"]
    require(len(eval_seconds) == 1, "no HellaSwag run")
    prepare = [prepare_run(work, name, s) for (section, name), s in timings.items() if section == "prepare"]
    require(bool(prepare), "no prepare run")
    now = datetime.datetime.now(datetime.timezone.utc)
    return {"date": now.isoformat(timespec="seconds"), "elapsed_s": now.timestamp() - started, "host": host(),
            "settings": settings, "train": runs, "hellaswag": hellaswag(out, eval_seconds[0]),
            "prepare": prepare}  # fmt: skip


def markdown(r: dict[str, Any]) -> str:
    """The summary to paste into bench/RESULTS.md."""
    h, s = r["host"], r["settings"]
    device = h["gpu"] or f"CPU ({h['cpu']})"
    lines = [
        f"### GPU check, {r['date'][:10]}: {device}",
        "",
        f"torch {h['torch']} (CUDA {h['cuda'] or 'none'}), Python {h['python']}, {h['cpu_cores']} CPU cores "
        f"({h['cpu']}); `make gpu-check` took {r['elapsed_s']:.0f} s in all.",
        "",
        f"**Training** (`torchrun --nproc_per_node=1 train.py {s['model_flags']}`, {s['dtype']}, "
        f"{s['compile']}, {s['steps']} steps of {int(s['batch_tokens']):,} tokens; medians of steps 1 on; "
        f"compile = step 0 less the median step)",
        "",
        "| run | micro-batch | tok/s | MFU | peak memory | planned GiB | compile s | step s | loss first → last "
        "| wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in r["train"]:
        memory = ", ".join(f"{k} {v:,.4g}" for k, v in t["peak_memory"].items()) if t["peak_memory"] else "n/a"
        mfu = "n/a" if t["mfu"] is None else f"{100 * t['mfu']:.1f}%"
        planned = "n/a" if t["planned_gib"] is None else f"{t['planned_gib']:.2f}"
        lines.append(
            f"| {t['run']} | {t['micro_batch'] or 'n/a'} | {t['tok_per_s']:,.0f} | {mfu} | {memory} | {planned} | "
            f"{t['compile_s']:.1f} | {t['median_step_s']:.3f} | {t['first_loss']:.3f} → {t['final_loss']:.3f} | "
            f"{t['wall_s']:.0f} |"
        )
    e = r["hellaswag"]
    lines += [
        "",
        f"**HellaSwag** (`eval_hellaswag.py` on the trained checkpoint, {e['n']} sample examples): "
        f"{e['examples_per_s']:,.1f} examples/s ({e['seconds']:.1f} s scoring, {e['wall_s']:.0f} s with start-up); "
        f"acc_norm {e['acc_norm']:.3f}.",
        "",
        f"**prepare_fineweb.py** on a {s['jsonl_mb']} MB JSONL of varied real text (`bench/synthetic.py`), "
        f"{s['prepare_tokens_per_worker']} tokens per worker; wall-clock time, start-up included",
        "",
        "| workers | tokens | seconds | tokens/s | tokens/s per worker |",
        "|---|---|---|---|---|",
    ]
    for p in r["prepare"]:
        label = f"{p['workers']} (all)" if p["label"] == "all" else str(p["workers"])
        lines.append(
            f"| {label} | {p['tokens']:,} | {p['seconds']:.1f} | {p['tok_per_s']:,.0f} | "
            f"{p['tok_per_s'] / p['workers']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--work", type=Path, required=True, help="the script's scratch directory")
    parser.add_argument("--started", type=float, required=True, help="when the check started (epoch seconds)")
    parser.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE", help="recorded as is")
    args = parser.parse_args()
    settings = dict(s.split("=", 1) for s in args.setting)
    try:
        result = report(args.out, args.work, args.started, settings)
    except (CheckFailed, OSError, KeyError, ValueError) as e:
        sys.exit(f"gpu-check: FAILED: {e}")
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
