"""Experiment tracking (gpt2/tracking.py): TensorBoard and W&B (offline) hold what log.jsonl holds, step for step,
across interruptions and resumes; a failing backend warns once; a missing extra is a one-line UserError.

The runs are simulated: the records a tiny trainer would write, in the trainer's order (a step's evaluations, then
its training step), fed to ``log.jsonl`` and the trackers exactly as the trainer does. Everything is read back with
the tools' own readers: TensorBoard's ``EventAccumulator``s and ``wandb leet inspect`` (W&B's transaction-log reader).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import write_shards

from gpt2.config import TrainConfig, train_config
from gpt2.errors import UserError
from gpt2.rundir import TRACKING_FILE, JsonlLog
from gpt2.tracking import (
    INSTALL_HINT,
    Trackers,
    check_available,
    history_at,
    open_run_trackers,
    open_trackers,
    record_values,
)
from gpt2.trainer import StopRequest, train

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIX = "/text_summary"  # SummaryWriter.add_text's tag is the name given plus this
CONFIG_TAG = "config" + TEXT_SUFFIX
CONFIG = {"model": "tiny", "max_steps": 12, "lr": 6e-4, "out": Path("runs/x")}


@pytest.fixture(scope="module", autouse=True)
def wandb_offline(tmp_path_factory: pytest.TempPathFactory):
    """W&B offline, quiet and confined to a temporary directory, for this module's in-process runs."""
    home = tmp_path_factory.mktemp("wandb_home")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_CONFIG_DIR": str(home),
           "WANDB_CACHE_DIR": str(home), "WANDB_DATA_DIR": str(home), "WANDB_DISABLE_GIT": "true"}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("WANDB_API_KEY", raising=False)
        yield env


# ----------------------------------------------------------------------------------------------------------------------
# Simulated runs


def run_records(max_steps: int = 12, attempt: int = 0) -> list[dict[str, Any]]:
    """Every record of a run to ``max_steps`` in the trainer's order. ``attempt`` shifts the values, as a
    resumed run on a GPU need not repeat the interrupted attempt's numbers bit for bit."""
    a = 0.001 * attempt
    records = []
    for s in range(max_steps + 1):
        if s % 2 == 0 or s == max_steps:
            records.append({"step": s, "kind": "val", "loss": 5.0 - 0.1 * s + a})
            if s % 4 == 0:
                records.append({"step": s, "kind": "hellaswag", "acc": 0.25 + a, "acc_norm": 0.26 + 0.01 * s, "n": 8})
                records.append({"step": s, "kind": "sample", "text": [f"step {s} <b>&{a}", "two\nlines"]})
        if s < max_steps:
            records.append({
                "step": s, "kind": "train", "loss": 6.0 - 0.2 * s + a, "lr": 6e-4 * (s + 1) / 13, "grad_norm": 1.5 + a,
                "tokens": 1024 * (s + 1), "dt_ms": 12.5 + a, "tok_per_s": 81920.0, "mfu": None if s == 0 else 0.01 * s,
            })  # fmt: skip
    return records


def launch(out: Path, start: int, stop_after: int | None, attempt: int, **flags: Any) -> list[str]:
    """One launch of the trainer in ``out``, resuming from a checkpoint at ``start`` (0: afresh) and killed once
    it has logged step ``stop_after`` (None: runs to the end). Returns the warnings the trackers gave."""
    warnings: list[str] = []
    log = JsonlLog(out / "log.jsonl")
    logged = log.read()  # before truncation: what earlier attempts may have sent to the trackers
    log.truncate_to(start)
    trackers = open_trackers(out, resume_step=start, logged=logged, warn=warnings.append, **flags)
    trackers.log_config(CONFIG)
    for rec in run_records(attempt=attempt):
        if start > 0 and not (rec["step"] > start or (rec["step"] == start and rec["kind"] == "train")):
            continue  # a resumed run starts by training step `start`; that step's evaluations precede the checkpoint
        if stop_after is not None and rec["step"] > stop_after:
            break
        log.append(rec)
        trackers.log_record(rec)
    trackers.close()
    return warnings


def interrupted_run(out: Path, **flags: Any) -> None:
    """Interrupted at step 7 with a checkpoint at step 5, resumed, interrupted at step 9 with a checkpoint at
    step 8, resumed again, finished."""
    assert launch(out, 0, 7, attempt=0, **flags) == []
    assert launch(out, 5, 9, attempt=1, **flags) == []
    assert launch(out, 8, None, attempt=2, **flags) == []


def python(script: str, wandb_defaults: bool = False, **env: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh Python, with its own W&B service (a child would otherwise share this one's),
    and W&B's default settings if asked (else this module's offline ones)."""
    drop = "WANDB_" if wandb_defaults else "WANDB_SERVICE"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    full_env.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=full_env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Reading back


def expected_scalars(records: list[dict[str, Any]], prefix: str = "") -> dict[tuple[str, int], float]:
    out = {}
    for rec in records:
        for name, value in record_values(rec, prefix)[0].items():
            assert (name, rec["step"]) not in out
            out[name, rec["step"]] = float(np.float32(value))  # TensorBoard stores float32
    return out


def tb_scalars(log_dir: Path) -> dict[tuple[str, int], float]:
    """Scalars through TensorBoard's classic EventAccumulator; a step seen twice fails."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[tuple[str, int], float] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            assert (tag, event.step) not in out, f"{tag} at step {event.step} twice"
            out[tag, event.step] = event.value
    return out


def tb_tensors(log_dir: Path) -> tuple[dict[tuple[str, int], float], dict[tuple[str, int], str]]:
    """Scalars and texts through the plugin EventAccumulator (TensorBoard's Python loader)."""
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util

    acc = pea.EventAccumulator(str(log_dir), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    scalars: dict[tuple[str, int], float] = {}
    texts: dict[tuple[str, int], str] = {}
    for tag in acc.Tags()["tensors"]:
        plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
        for event in acc.Tensors(tag):
            value = tensor_util.make_ndarray(event.tensor_proto)
            into = texts if plugin == "text" else scalars
            assert (tag, event.step) not in into, f"{tag} at step {event.step} twice"
            into[tag, event.step] = value.item().decode() if plugin == "text" else float(value)
    return scalars, texts


def expected_texts(records: list[dict[str, Any]]) -> dict[tuple[str, int], str]:
    """Texts as TensorBoard shows them: each string an indented (verbatim) markdown block, under SummaryWriter's
    tag for a text (``sample/text/text_summary``)."""
    out = {}
    for rec in records:
        for name, texts in record_values(rec)[1].items():
            blocks = ("\n".join("    " + line for line in text.split("\n")) for text in texts)
            out[name + TEXT_SUFFIX, rec["step"]] = "\n\n".join(blocks)
    return out


def wandb_segments(out: Path) -> list[tuple[dict[str, Any], list[tuple[str, int, Any]]]]:
    """Each offline segment of ``<out>/wandb`` in upload order (``wandb sync`` goes by start time): its run
    record and its history as (name, step, value), read with ``wandb leet inspect``."""
    segments = []
    for path in (out / "wandb").glob("*/run-*.wandb"):
        if path.parent.is_symlink():  # latest-run
            continue
        cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 and "No such command" in proc.stderr:
            pytest.skip("this wandb has no `wandb leet` to read runs back with")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        run = next(r["run"] for r in records if r["type"] == "run")
        history = []
        for item in (r["history"]["item"] for r in records if r["type"] == "history"):
            for name, value in item.items():
                if name.endswith("._type"):  # a media file: its fields are flattened into NAME._type, NAME.path, ...
                    assert value == "html-file"
                    name = name.removesuffix("._type")
                    value = (path.parent / "files" / item[name + ".path"]).read_text(encoding="utf-8")
                elif name.startswith("_") or name == "step" or "." in name:
                    continue
                history.append((name, item["step"], value))
        segments.append((run, history))
    return sorted(segments, key=lambda segment: segment[0]["start_time"])


def wandb_values(out: Path) -> dict[tuple[str, int], Any]:
    """The run's history over all segments; a (name, step) seen twice fails."""
    values: dict[tuple[str, int], Any] = {}
    for _, history in wandb_segments(out):
        for name, step, value in history:
            assert (name, step) not in values, f"{name} at step {step} twice"
            values[name, step] = value
    return values


def expected_wandb(records: list[dict[str, Any]], prefix: str = "") -> dict[tuple[str, int], Any]:
    out: dict[tuple[str, int], Any] = {}
    for rec in records:
        scalars, texts = record_values(rec, prefix)
        out.update({(name, rec["step"]): value for name, value in scalars.items()})
        html = {name: "".join(f"<pre>{escape_html(t)}</pre>" for t in lines) for name, lines in texts.items()}
        out.update({(name, rec["step"]): value for name, value in html.items()})
    return out


def escape_html(text: str) -> str:
    from html import escape

    return escape(text)


def assert_same(got: dict, want: dict) -> None:
    """Equal keys, and values equal (numbers to within float64 rounding of W&B's JSON)."""
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key] == (value if isinstance(value, str) else pytest.approx(value, rel=1e-12)), key


# ----------------------------------------------------------------------------------------------------------------------
# Names and history


def test_record_names() -> None:
    train = [r for r in run_records() if r["kind"] == "train"][-1]
    scalars, texts = record_values(train)
    assert set(scalars) == {f"train/{k}" for k in ("loss", "lr", "grad_norm", "tokens", "dt_ms", "tok_per_s", "mfu")}
    assert "train/mfu" not in record_values({**train, "mfu": None})[0]  # None values are skipped
    scalars, texts = record_values({"step": 4, "kind": "sample", "text": ["a", "b"]})
    assert scalars == {} and texts == {"sample/text": ["a", "b"]}
    downstream = {"step": 3, "kind": "downstream", "task": "arc_easy", "acc": 0.5, "acc_norm": 0.6, "n": 100}
    assert record_values(downstream)[0] == {"downstream/arc_easy/acc": 0.5, "downstream/arc_easy/acc_norm": 0.6,
                                            "downstream/arc_easy/n": 100.0}  # fmt: skip
    hellaswag = {"step": 3, "kind": "hellaswag", "acc": 0.3, "acc_norm": 0.31, "n": 10}
    assert set(record_values(hellaswag, prefix="eval")[0]) == {"eval/hellaswag/acc", "eval/hellaswag/acc_norm",
                                                               "eval/hellaswag/n"}  # fmt: skip


@pytest.mark.parametrize("step", [0, 1, 4, 5, 8, 12])
def test_history_at_is_jsonl_truncation(tmp_path: Path, step: int) -> None:
    """Trackers cut history back by the same rule as log.jsonl."""
    log = JsonlLog(tmp_path / "log.jsonl")
    for rec in run_records():
        log.append(rec)
    log.truncate_to(step)
    assert history_at(run_records(), step) == log.read()


# ----------------------------------------------------------------------------------------------------------------------
# TensorBoard


def test_tensorboard_mirrors_log(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    launch(tmp_path, 0, None, attempt=0, tensorboard_dir=tmp_path / "tb")
    final = JsonlLog(tmp_path / "log.jsonl").read()
    assert final == run_records()
    assert tb_scalars(tmp_path / "tb") == expected_scalars(final)
    scalars, texts = tb_tensors(tmp_path / "tb")
    assert scalars == expected_scalars(final)
    assert {k: v for k, v in texts.items() if k[0] != CONFIG_TAG} == expected_texts(final)
    assert json.loads("\n".join(line[4:] for line in texts[CONFIG_TAG, 0].split("\n")))["lr"] == 6e-4
    assert json.loads((tmp_path / TRACKING_FILE).read_text()) == {"tensorboard": {"dir": "tb"}}


def test_tensorboard_resume_drops_the_steps_after_the_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    interrupted_run(tmp_path, tensorboard_dir=tmp_path / "tb")
    final = JsonlLog(tmp_path / "log.jsonl").read()
    assert [r["step"] for r in final if r["kind"] == "train"] == list(range(12))
    want = expected_scalars(final)  # the resumed attempts' values where they redid a step
    assert want["train/loss", 6] == pytest.approx(6.0 - 1.2 + 0.001, abs=1e-6)
    assert tb_scalars(tmp_path / "tb") == want
    scalars, texts = tb_tensors(tmp_path / "tb")
    assert scalars == want
    assert {k: v for k, v in texts.items() if k[0] != CONFIG_TAG} == expected_texts(final)
    assert sorted(step for tag, step in texts if tag == CONFIG_TAG) == [0, 5, 8]  # each launch's configuration
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 3


def test_tensorboard_added_when_resuming_gets_the_history(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    launch(tmp_path, 0, 7, attempt=0)
    launch(tmp_path, 5, None, attempt=1, tensorboard_dir=tmp_path / "tb")
    assert tb_scalars(tmp_path / "tb") == expected_scalars(JsonlLog(tmp_path / "log.jsonl").read())


def test_tensorboard_keeps_what_was_logged_when_the_run_is_killed(tmp_path: Path) -> None:
    """Each record is in the event file when ``log_record`` returns: SIGKILL leaves no writer a chance to flush."""
    pytest.importorskip("tensorboard")
    records = run_records()
    script = f"""
        import json, os, signal
        from gpt2.tracking import open_trackers
        trackers = open_trackers({str(tmp_path)!r}, tensorboard_dir={str(tmp_path / "tb")!r})
        for rec in json.loads({json.dumps(records)!r}):
            trackers.log_record(rec)
        os.kill(os.getpid(), signal.SIGKILL)
    """
    assert python(script).returncode == -9
    assert tb_scalars(tmp_path / "tb") == expected_scalars(records)


# ----------------------------------------------------------------------------------------------------------------------
# Weights & Biases (offline)


@pytest.mark.slow
def test_wandb_offline_mirrors_log(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    launch(tmp_path, 0, None, attempt=0, wandb_project="gpt2-test", wandb_run="tiny")
    final = JsonlLog(tmp_path / "log.jsonl").read()
    assert_same(wandb_values(tmp_path), expected_wandb(final))
    [(run, _)] = wandb_segments(tmp_path)
    state = json.loads((tmp_path / TRACKING_FILE).read_text())
    assert run["run_id"] == state["wandb"]["id"] and run["project"] == "gpt2-test" and run["display_name"] == "tiny"


@pytest.mark.slow
def test_wandb_offline_resume_continues_the_run_without_duplicates(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    interrupted_run(tmp_path, wandb_project="gpt2-test")
    segments = wandb_segments(tmp_path)
    run_id = json.loads((tmp_path / TRACKING_FILE).read_text())["wandb"]["id"]
    assert [run["run_id"] for run, _ in segments] == [run_id] * 3
    assert all(run.get("resume") for run, _ in segments)
    # W&B keeps the first value sent for each record: attempt 0's up to step 7, attempt 1's for 8 and 9, then 2's.
    first_sent = [r for r in run_records(attempt=0) if r["step"] <= 7]
    first_sent += [r for r in run_records(attempt=1) if 7 < r["step"] <= 9]
    first_sent += [r for r in run_records(attempt=2) if r["step"] > 9]
    final = JsonlLog(tmp_path / "log.jsonl").read()
    values = wandb_values(tmp_path)
    assert values.keys() == expected_wandb(final).keys()  # every record of log.jsonl once
    assert_same(values, expected_wandb(first_sent))


@pytest.mark.slow
def test_wandb_added_when_resuming_gets_the_history(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    launch(tmp_path, 0, 7, attempt=0)
    launch(tmp_path, 5, None, attempt=1, wandb_project="gpt2-test")
    assert_same(wandb_values(tmp_path), expected_wandb(JsonlLog(tmp_path / "log.jsonl").read()))


@pytest.mark.slow
@pytest.mark.parametrize("api_key", [None, "local-" + "0" * 40], ids=["no-api-key", "no-server"])
def test_wandb_unreachable_falls_back_to_offline(tmp_path: Path, api_key: str | None) -> None:
    """Online mode without an API key, or with one but no server to reach: one warning, then an offline run
    under the same id; no prompt, no hang (the init timeout is cut to 2 s here)."""
    pytest.importorskip("wandb")
    script = f"""
        import gpt2.tracking
        gpt2.tracking.WANDB_INIT_TIMEOUT_S = 2.0
        trackers = gpt2.tracking.open_trackers({str(tmp_path)!r}, wandb_project="p", warn=lambda m: print("WARN", m))
        trackers.log_record({{"step": 0, "kind": "val", "loss": 1.5}})
        print(trackers.notes)
        trackers.close()
    """
    home = str(tmp_path / "home")  # no API key there
    env = dict(HOME=home, WANDB_CONFIG_DIR=home, WANDB_BASE_URL="http://127.0.0.1:9", WANDB_SILENT="true")
    proc = python(script, wandb_defaults=True, **env, **({"WANDB_API_KEY": api_key} if api_key else {}))
    assert proc.returncode == 0, proc.stderr
    warns = [line for line in proc.stdout.splitlines() if line.startswith("WARN")]
    assert len(warns) == 1 and "W&B cannot go online" in warns[0] and "wandb sync" in warns[0], proc.stdout
    assert "offline run" in proc.stdout
    assert_same(wandb_values(tmp_path), {("val/loss", 0): 1.5})


# ----------------------------------------------------------------------------------------------------------------------
# The evaluator


@pytest.mark.slow
def test_evaluator_logs_into_the_tracked_run(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    launch(tmp_path, 0, None, attempt=0, wandb_project="gpt2-test", tensorboard_dir=tmp_path / "tb")
    scores = [{"step": 12, "kind": "hellaswag", "acc": 0.3, "acc_norm": 0.31, "n": 10},
              {"step": 4, "kind": "hellaswag", "acc": 0.27, "acc_norm": 0.28, "n": 10}]  # fmt: skip
    warnings: list[str] = []
    with open_run_trackers(tmp_path, warn=warnings.append) as trackers:
        assert set(trackers.backends) == {"TensorBoard", "W&B"}
        for score in scores:
            trackers.log_record(score)
    assert warnings == []
    final = JsonlLog(tmp_path / "log.jsonl").read()
    assert tb_scalars(tmp_path / "tb" / "eval") == expected_scalars(scores, prefix="eval")
    assert tb_scalars(tmp_path / "tb") == expected_scalars(final)  # the trainer's run is untouched
    want = {**expected_wandb(final), **expected_wandb(scores, prefix="eval")}
    assert_same(wandb_values(tmp_path), want)
    run_id = json.loads((tmp_path / TRACKING_FILE).read_text())["wandb"]["id"]
    assert {run["run_id"] for run, _ in wandb_segments(tmp_path)} == {run_id}


@pytest.mark.slow
def test_evaluator_beside_a_live_trainer_writes_an_offline_segment(tmp_path: Path) -> None:
    """The evaluator (another process, as with ``eval_hellaswag.py --watch``) while the trainer holds the run."""
    pytest.importorskip("wandb")
    script = f"""
        from gpt2.tracking import open_run_trackers
        with open_run_trackers({str(tmp_path)!r}, warn=lambda m: print("WARN", m)) as trackers:
            trackers.log_record({{"step": 0, "kind": "hellaswag", "acc": 0.3, "acc_norm": 0.31, "n": 10}})
    """
    warnings: list[str] = []
    with open_trackers(tmp_path, wandb_project="gpt2-test", warn=warnings.append) as trainer:
        trainer.log_record({"step": 0, "kind": "val", "loss": 3.0})
        proc = python(script)
        assert proc.returncode == 0, proc.stderr
        trainer.log_record({"step": 1, "kind": "val", "loss": 2.0})
    assert warnings == []
    warns = [line for line in proc.stdout.splitlines() if line.startswith("WARN")]
    assert len(warns) == 1 and "a training run holds W&B run" in warns[0] and "wandb sync" in warns[0]
    want = {("val/loss", 0): 3.0, ("val/loss", 1): 2.0, ("eval/hellaswag/acc", 0): 0.3,
            ("eval/hellaswag/acc_norm", 0): 0.31, ("eval/hellaswag/n", 0): 10}  # fmt: skip
    assert_same(wandb_values(tmp_path), want)


def test_untracked_run_has_no_trackers(tmp_path: Path) -> None:
    trackers = open_run_trackers(tmp_path)
    assert not trackers
    trackers.log_record({"step": 0, "kind": "hellaswag", "acc": 0.3, "acc_norm": 0.31, "n": 10})
    trackers.close()
    assert not (tmp_path / TRACKING_FILE).exists()


# ----------------------------------------------------------------------------------------------------------------------
# Failures


class Broken:
    """A backend whose every call fails, like a tracker whose disk filled up."""

    calls = 0

    def log_config(self, config: dict[str, Any]) -> None:
        self._fail()

    def log_record(self, rec: dict[str, Any]) -> None:
        self._fail()

    def close(self, exit_code: int = 0) -> None:
        self._fail()

    def _fail(self) -> None:
        Broken.calls += 1
        raise OSError(28, "No space left on device")


def test_failing_backend_warns_once_and_the_others_go_on(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    warnings: list[str] = []
    trackers = open_trackers(tmp_path, tensorboard_dir=tmp_path / "tb", warn=warnings.append)
    trackers.backends["Broken"] = Broken()
    for rec in run_records():
        trackers.log_record(rec)
    trackers.close()
    assert len(warnings) == 1 and "Broken tracking failed" in warnings[0] and "No space left" in warnings[0]
    assert "\n" not in warnings[0]
    assert Broken.calls == 2  # the failing call, then one attempt to close it
    assert tb_scalars(tmp_path / "tb") == expected_scalars(run_records())


def test_tensorboard_write_error_warns_once(tmp_path: Path) -> None:
    """A real write error, hit by SummaryWriter's writer thread: in a child Python, no file may grow any more once
    record 10 comes (RLIMIT_FSIZE, as a full disk). One warning; the run and the other backends go on; the event
    file keeps the records before."""
    pytest.importorskip("tensorboard")
    records = run_records()
    script = f"""
        import json, resource
        from types import SimpleNamespace
        from gpt2.tracking import open_trackers
        out = {str(tmp_path)!r}
        trackers = open_trackers(out, tensorboard_dir=out + "/tb", warn=lambda m: print("WARN", m))
        kept = []
        trackers.backends["memory"] = SimpleNamespace(log_record=kept.append, close=lambda exit_code: None)
        for i, rec in enumerate(json.loads({json.dumps(records)!r})):
            if i == 10:
                resource.setrlimit(resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
            trackers.log_record(rec)
        trackers.close()
        print("kept", len(kept))
    """
    proc = python(script)
    assert proc.returncode == 0, proc.stderr
    warns = [line for line in proc.stdout.splitlines() if line.startswith("WARN")]
    assert len(warns) == 1 and "TensorBoard tracking failed" in warns[0] and "File too large" in warns[0], proc.stdout
    assert proc.stdout.rstrip().endswith(f"kept {len(records)}")
    assert tb_scalars(tmp_path / "tb") == expected_scalars(records[:10])


@pytest.mark.slow
def test_wandb_process_death_warns_once_and_tensorboard_goes_on(tmp_path: Path) -> None:
    """The W&B service process dies mid-run (killed in a child Python, so this process keeps its own)."""
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    script = f"""
        import os, signal, time
        from pathlib import Path
        from gpt2.tracking import open_trackers
        out = Path({str(tmp_path)!r})
        trackers = open_trackers(out, wandb_project="p", tensorboard_dir=out / "tb", warn=lambda m: print("WARN", m))
        for step in range(20):
            if step == 5:
                children = open(f"/proc/{{os.getpid()}}/task/{{os.getpid()}}/children").read().split()
                for pid in children:
                    if "wandb-core" in open(f"/proc/{{pid}}/cmdline").read():
                        os.kill(int(pid), signal.SIGKILL)
                time.sleep(1)
            trackers.log_record({{"step": step, "kind": "train", "loss": 10.0 - step}})
        trackers.close()
        print("done")
    """
    proc = python(script)
    assert proc.returncode == 0, proc.stderr
    warns = [line for line in proc.stdout.splitlines() if line.startswith("WARN")]
    assert len(warns) == 1 and "W&B tracking failed" in warns[0], proc.stdout
    assert proc.stdout.rstrip().endswith("done")
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert tb_scalars(tmp_path / "tb") == {("train/loss", s): 10.0 - s for s in range(20)}


def test_missing_extra_is_a_one_line_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.utils.tensorboard too: the probe imports it, and a test that ran before may have done so already
    hidden = [m for m in sys.modules if m.split(".")[0] == "wandb" or "tensorboard" in m.split(".")]
    for module in hidden + ["wandb", "tensorboard", "torch.utils.tensorboard"]:
        monkeypatch.setitem(sys.modules, module, None)  # makes `import` raise ModuleNotFoundError
    for flags, flag in [({"wandb": True}, "--wandb"), ({"tensorboard": True}, "--tensorboard")]:
        with pytest.raises(UserError) as info:
            check_available(**flags)
        message = str(info.value)
        assert message.startswith(flag) and INSTALL_HINT in message and "\n" not in message
    check_available()  # nothing asked, nothing needed


def test_trackers_without_backends_do_nothing() -> None:
    trackers = Trackers()
    trackers.log_config(CONFIG)
    trackers.log_record(run_records()[0])
    trackers.close()


# ----------------------------------------------------------------------------------------------------------------------
# Through the real trainer


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    tokens = np.repeat(rng.integers(0, 256, 8_000), 2)
    return write_shards(tmp_path_factory.mktemp("shards"), tokens[:2_000], [tokens[2_000:]])


def tiny_run(data: Path, out: Path, **overrides: Any) -> TrainConfig:
    settings = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=256, seq_len=16, micro_batch=2,
                    batch_tokens=32, max_steps=8, warmup_steps=2, eval_every=2, val_tokens=256, sample_every=4,
                    max_new_tokens=4, sample_prompt="a", save_every=5, device="cpu", dtype="fp32", compile=False,
                    peak_tflops="none")  # fmt: skip
    return train_config(data=str(data), out=str(out), **{**settings, **overrides})


class StopAfter:
    """A reporter that asks the trainer to stop after a step, as SIGTERM does (checkpoint, then exit)."""

    def __init__(self, stop: StopRequest, step: int) -> None:
        self.stop, self.step = stop, step

    def record(self, rec: dict[str, Any]) -> None:
        if rec["kind"] == "train" and rec["step"] + 1 == self.step:
            self.stop.request("SIGTERM")

    def message(self, text: str) -> None:
        pass


def crash_after_the_run_and_resume(cfg: TrainConfig) -> None:
    """Stop after step 3 as on SIGTERM and resume; train to the end, lose the final checkpoint (a crash before it
    was written) and resume from step 5: the log and the trackers get steps 5-8 twice, and must keep them once."""
    stop = StopRequest()
    assert train(cfg, StopAfter(stop, 3), stop).stopped_by == "SIGTERM"
    train(cfg)
    (Path(cfg.out) / "ckpt_000008.pt").unlink()
    train(cfg)


def test_the_trainers_tensorboard_equals_its_log_after_a_crash_and_resume(shards: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    crash_after_the_run_and_resume(tiny_run(shards, tmp_path, tensorboard=""))
    records = JsonlLog(tmp_path / "log.jsonl").read()
    assert sorted(r["step"] for r in records if r["kind"] == "train") == list(range(8))  # each step once
    assert tb_scalars(tmp_path / "tb") == expected_scalars(records)


@pytest.mark.slow
def test_the_trainers_wandb_run_holds_its_log_and_resumes_under_the_same_id(shards: Path, tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    # No samples: a 256-token model's text is arbitrary bytes (texts are compared in the tests above).
    crash_after_the_run_and_resume(tiny_run(shards, tmp_path, wandb="gpt2-tests", wandb_run="tiny", sample_every=0))
    records = JsonlLog(tmp_path / "log.jsonl").read()
    segments = wandb_segments(tmp_path)
    assert len(segments) == 3 and len({run["run_id"] for run, _ in segments}) == 1  # one run, resumed twice
    got = wandb_values(tmp_path)  # a step seen twice fails
    timing = ("train/dt_ms", "train/tok_per_s")  # a repeated step keeps its first attempt's (equal, fp32) values
    want = {k: v for k, v in expected_wandb(records).items() if k[0] not in timing}
    assert_same({k: v for k, v in got.items() if k[0] not in timing}, want)


def test_tracking_flags_without_the_extra_stop_before_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import importlib

    real = importlib.import_module

    def without_tensorboard(name: str, *args: Any):
        if "tensorboard" in name.split("."):  # tensorboard and torch.utils.tensorboard
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_tensorboard)
    data = write_shards(tmp_path / "data", np.arange(512) % 256, [np.arange(4096) % 256])
    with pytest.raises(UserError, match=r'pip install -e "\.\[track\]"'):
        train(tiny_run(data, tmp_path / "out", tensorboard=""))
    assert not (tmp_path / "out").exists()  # stopped before anything was written
