"""Downstream evaluation through lm-evaluation-harness: our ``gpt2-pipeline`` model gives the harness's own
``hf`` backend's log-likelihoods and choices on every task of the suite, leaves the harness's own models reachable
and runs on the device it is given; two ranks give one process's results; run directories are scored
incrementally, by both programs into one scores file, and plotted; and bad input is one clear line.

A tiny model (2 layers, 32 wide, GPT-2's vocabulary, 128 positions so that long prompts get cut) scores the
first 50 validation examples of each task (``tests/fixtures/evals``), read offline through ``--data-dir``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from support import ROOT, run_python, tiny_model  # noqa: E402

from gpt2 import evaluate  # noqa: E402
from gpt2.checkpoint import model_payload, save_checkpoint  # noqa: E402
from gpt2.distributed import DistContext  # noqa: E402
from gpt2.errors import UserError  # noqa: E402
from gpt2.evaluate import SUITE, EvaluateConfig, HellaSwagConfig, require_harness, run, task_names  # noqa: E402
from gpt2.export import main as export_main  # noqa: E402
from gpt2.hellaswag import TASK  # noqa: E402
from gpt2.lm_eval import (  # noqa: E402
    PipelineLM,
    evaluate_tasks,
    harness_choices,
    load_tasks,
    placement,
    task_manager,
)
from gpt2.model import GPT  # noqa: E402
from gpt2.plot import REFERENCES, draw_run, read_run  # noqa: E402
from gpt2.rundir import SCORES_FILE, checkpoint_path, read_scores  # noqa: E402
from gpt2.tracking import Trackers  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures" / "evals"
N_EXAMPLES = 50
BLOCK = 128


def save_tiny(run_dir: Path, step: int, seed: int = 0) -> Path:
    path = checkpoint_path(run_dir, step)
    save_checkpoint(path, model_payload(tiny_model(seed=seed, block_size=BLOCK), step))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny checkpoint and its Hugging Face export (``python -m gpt2.export``)."""
    root = tmp_path_factory.mktemp("tiny")
    ckpt = save_tiny(root / "run", 10)
    export_main([str(ckpt), str(root / "hf")])
    return ckpt, root / "hf"


@pytest.fixture(scope="module")
def suite() -> dict:
    return load_tasks(list(SUITE), FIXTURES)


@pytest.fixture(scope="module")
def ours_and_hf(tiny, suite) -> tuple[dict, dict]:
    """The harness's full output (per-example samples included) for our model and for its ``hf`` backend."""
    from lm_eval.models.huggingface import HFLM

    ckpt, hf_dir = tiny
    models = [
        PipelineLM(str(ckpt), batch_size=16, device="cpu", dtype="fp32"),
        HFLM(pretrained=str(hf_dir), device="cpu", batch_size=1, dtype="float32"),  # its fastest here,
    ]
    return tuple(
        lm_eval.simple_evaluate(
            model=lm, tasks=list(suite.values()), bootstrap_iters=0, log_samples=True, task_manager=task_manager()
        )
        for lm in models
    )


@pytest.mark.slow
def test_every_task_matches_the_hf_backend(ours_and_hf):
    ours, hf = ours_and_hf
    for task in SUITE:
        assert ours["n-samples"][task]["effective"] == hf["n-samples"][task]["effective"] == N_EXAMPLES, task
        for mine, theirs in zip(ours["samples"][task], hf["samples"][task], strict=True):
            assert mine["doc_id"] == theirs["doc_id"]
            assert mine["arguments"] == theirs["arguments"]  # the same prompts and choices
            lls = [ll for ll, _ in mine["filtered_resps"]]
            ref = [ll for ll, _ in theirs["filtered_resps"]]
            assert lls == pytest.approx(ref, abs=1e-4), (task, mine["doc_id"])
            assert [g for _, g in mine["filtered_resps"]] == [g for _, g in theirs["filtered_resps"]]
            assert harness_choices(mine) == harness_choices(theirs)  # the acc and the acc_norm choice
            assert (mine["acc"], mine.get("acc_norm")) == (theirs["acc"], theirs.get("acc_norm"))
        assert ours["results"][task] == hf["results"][task], task


def test_requests_sharing_a_context_are_one_row(tiny, monkeypatch):
    import gpt2.lm_eval as module

    lm = PipelineLM(str(tiny[0]), batch_size=4, device="cpu", dtype="fp32")
    pairs = [("The cat sat on the", " mat"), ("The cat sat on the", " hat."), ("A dog", " ran"),
             ("The cat sat on the", " mat"), ("", "Hello world")]  # fmt: skip
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    rows = []

    def recording_score_rows(scorer, packed, *args, **kwargs):
        rows.extend(packed)
        return score_rows(scorer, packed, *args, **kwargs)

    score_rows = module.score_rows
    monkeypatch.setattr(module, "score_rows", recording_score_rows)
    together = lm.loglikelihood(requests)
    assert len(rows) == 3  # "The cat sat on the" once (its repeated " mat" scored once), "A dog", end-of-text
    assert [len(row.continuation_lens) for row in rows] == [2, 1, 1]
    assert together[0] == together[3]
    lm.batch_size = 1
    assert lm.loglikelihood(requests) == together  # bit for bit: a row's scores never depend on its batch-mates
    alone = [lm.loglikelihood([request])[0] for request in requests]  # a row of its own (other lengths, other bits)
    assert [ll for ll, _ in together] == pytest.approx([ll for ll, _ in alone], abs=1e-5)


def test_rolling_loglikelihood_matches_the_hf_backend(tiny):
    from lm_eval.models.huggingface import HFLM

    passages = [json.loads(line)["passage"] for line in (FIXTURES / "boolq_validation.jsonl").open()][:3]
    texts = [passages[0] + " " + passages[1], "Short.", passages[2]]  # the first spans several 128-token windows
    requests = [Instance("loglikelihood_rolling", {}, (text,), 0) for text in texts]
    ours = PipelineLM(str(tiny[0]), device="cpu", dtype="fp32").loglikelihood_rolling(requests)
    theirs = HFLM(pretrained=str(tiny[1]), device="cpu", batch_size=8, dtype="float32").loglikelihood_rolling(requests)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_registered_with_the_harness(tiny, suite):
    from lm_eval.api.registry import get_model

    assert get_model("gpt2-pipeline") is PipelineLM
    out = lm_eval.simple_evaluate(
        model="gpt2-pipeline",
        model_args=f"pretrained={tiny[0]},batch_size=8,device=cpu,dtype=fp32",
        tasks=[suite["copa"]],
        limit=5,
        bootstrap_iters=0,
        task_manager=task_manager(),
    )
    assert out["n-samples"]["copa"]["effective"] == 5


@pytest.mark.slow
def test_importing_ours_leaves_the_harness_models_reachable():
    """In a fresh process, as a user's script would: the harness loads its own models only while its registry is
    empty, so registering ours first used to hide them."""
    code = "import gpt2.lm_eval; from lm_eval.api.registry import get_model as g; print(g('hf').__name__)"
    proc = run_python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["HFLM"]


def test_a_cuda_device_index_is_honoured(monkeypatch, tiny):
    """``device="cuda:1"`` runs on cuda:1 (it ran on cuda:0); under torchrun each rank keeps its own GPU. CUDA is
    faked: the model's moves are recorded instead of made."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    moves = []
    monkeypatch.setattr(GPT, "to", lambda self, device: moves.append(str(device)) or self)
    lm = PipelineLM(tiny_model(block_size=BLOCK), device="cuda:1")
    assert (lm.dist.device, lm.device, moves) == ("cuda:1", torch.device("cuda:1"), ["cuda:1"])
    assert PipelineLM(tiny_model(block_size=BLOCK), device="cuda").dist.device == "cuda:0"
    with pytest.raises(UserError, match="'cuda:2': no such device"):
        placement("cuda:2")
    rank1 = DistContext(rank=1, local_rank=1, world_size=2, device="cuda:1")
    monkeypatch.setattr("gpt2.lm_eval.init_distributed", lambda device: rank1)
    assert placement("cuda:0") == rank1


@pytest.mark.slow
def test_two_ranks_equal_one_process(tiny, suite, tmp_path):
    out = tmp_path / "results.json"
    proc = run_python("-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "gpt2.evaluate", tiny[0],
                      "--tasks", "small", "--data-dir", FIXTURES, "--limit", "20", "--dtype", "fp32",
                      "--batch-size", "8", "--out", out, env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    single = evaluate_tasks(PipelineLM(str(tiny[0]), device="cpu", dtype="fp32"), suite, limit=20)
    summary = json.loads(out.read_text())
    assert summary.pop("seconds") > 0
    assert summary == {
        "target": str(tiny[0]),
        "step": 10,
        "tasks": single.tasks,
        "centered_mean": single.centered_mean,
    }
    assert proc.stdout.strip() == single.table()
    assert -1 < single.centered_mean < 1 and all(scores["n"] == 20 for scores in single.tasks.values())


class Recorder:
    """A tracking backend that keeps what it is sent (stands in for a tracked run's TensorBoard or W&B)."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def log_config(self, config: dict) -> None:
        pass

    def log_record(self, rec: dict) -> None:
        self.records.append(rec)

    def close(self, exit_code: int = 0) -> None:
        pass


def test_both_programs_score_a_run_into_one_file_and_only_what_is_new(tmp_path, monkeypatch):
    """The acceptance check: ``eval_hellaswag.py RUN`` and ``python -m gpt2.evaluate RUN --tasks ...`` leave one
    scores file with every task for every checkpoint, each scored once, and the plot draws a panel per task."""
    run_dir = tmp_path / "run"
    save_tiny(run_dir, 10)
    recorder = Recorder()
    monkeypatch.setattr(evaluate, "open_run_trackers", lambda run, warn: Trackers({"recorder": recorder}))
    cfg = EvaluateConfig(target=str(run_dir), tasks="copa", limit=4, dtype="fp32", data_dir=FIXTURES, progress=False)
    lines = []
    assert len(run(cfg, report=lines.append)) == 1
    save_tiny(run_dir, 20, seed=1)
    hellaswag = HellaSwagConfig(target=str(run_dir), hellaswag_data=FIXTURES / "hellaswag_validation.jsonl", limit=8,
                                dtype="fp32", progress=False)  # fmt: skip
    assert [list(r.tasks) for r in run(hellaswag, report=lines.append)] == [[TASK], [TASK]]
    cfg.tasks = "copa,hellaswag"
    results = run(cfg, report=lines.append)  # step 10 lacks hellaswag only, the new step 20 both
    assert [list(r.tasks) for r in results] == [["hellaswag"], ["copa", "hellaswag"]]
    cfg.tasks = f"{TASK},copa,hellaswag"  # hellaswag_nanogpt from --data-dir: the harness's HellaSwag file
    assert run(cfg, report=lines.append) == []
    assert lines[-1] == f"every checkpoint in {run_dir} is already scored on these tasks in {SCORES_FILE}"
    records = read_scores(run_dir)
    assert [(r["step"], r["task"]) for r in records] == [
        (10, "copa"),
        (10, TASK),
        (20, TASK),
        (10, "hellaswag"),
        (20, "copa"),
        (20, "hellaswag"),
    ]
    assert [path.name for path in run_dir.glob("*.jsonl")] == [SCORES_FILE]
    assert set(records[0]) == {"step", "task", "acc", "acc_norm", "n"} and records[0]["n"] == 4
    assert records[0]["acc_norm"] is None and records[3]["acc_norm"] is not None  # copa reports acc only
    assert records[1]["n"] == 8 and 0 <= records[1]["acc_norm"] <= 1
    assert not list(run_dir.glob("*.tmp"))
    assert recorder.records == [{"kind": "downstream", **r} for r in records]  # a tracked run gets them too

    fig = draw_run(read_run(run_dir))
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert list(panels) == ["copa", TASK, "hellaswag"]  # no loss panel: the run has no log
    by_task = lambda task: [r for r in records if r["task"] == task]
    assert list(panels["hellaswag"].lines[0].get_xdata()) == [10, 20]
    assert list(panels["hellaswag"].lines[0].get_ydata()) == [r["acc_norm"] for r in by_task("hellaswag")]
    assert list(panels["copa"].lines[0].get_ydata()) == [r["acc"] for r in by_task("copa")]
    assert [line.get_ydata()[0] for line in panels["hellaswag"].lines[1:]] == list(REFERENCES["hellaswag"].values())
    assert len(panels["copa"].lines) == 1  # no published GPT-2 reference


def test_groups_expand_and_duplicates_go():
    assert task_names("small") == list(SUITE)
    assert task_names("copa, small,piqa") == ["copa", *[t for t in SUITE if t != "copa"]]


def test_one_line_errors(tiny, tmp_path, monkeypatch):
    def error(fn, *args) -> str:
        with pytest.raises(UserError) as e:
            fn(*args)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "unknown task 'arc_eazy' (did you mean 'arc_easy'?)" in error(load_tasks, ["arc_eazy"])
    assert f"(did you mean '{TASK}'?)" in error(load_tasks, ["hellaswag_nanogtp"])
    assert "piqa_validation.jsonl does not exist" in error(load_tasks, ["piqa"], tmp_path)
    (tmp_path / "gsm8k_validation.jsonl").write_text('{"question": "1 + 1?", "answer": "#### 2"}\n')
    assert "generation tasks (output_type generate_until) are not supported" in error(load_tasks, ["gsm8k"], tmp_path)
    lm = PipelineLM(str(tiny[0]), device="cpu")
    request = Instance("generate_until", {}, ("1 + 1 =", {"until": ["\n"]}), 0, metadata=("gsm8k", 0, 1))
    assert error(lm.generate_until, [request]).startswith("gsm8k: generation tasks")
    assert "a continuation of 129 tokens" in error(lm._loglikelihood_tokens, [(None, [1], [2] * (BLOCK + 1))])
    assert "batch_size must be a positive" in error(PipelineLM, str(tiny[0]), 0)
    assert "--out and --predictions score one model" in error(
        run, EvaluateConfig(target=str(tiny[0].parent), out=tmp_path / "x")
    )
    with pytest.raises(UserError, match=f"add {TASK} to --tasks"):
        EvaluateConfig(target=str(tiny[0]), tasks="copa", predictions=tmp_path / "p.jsonl")
    assert "--tasks is empty" in error(task_names, " , ")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the [eval] extra were not installed
    assert "pip install -e '.[eval]'" in error(require_harness)
    # eval_hellaswag.py needs no harness: its one task is ours
    hs = tmp_path / "hs.jsonl"
    hs.write_text((FIXTURES / "hellaswag_validation.jsonl").read_text().split("\n", 1)[0] + "\n")
    assert run(HellaSwagConfig(target=str(tiny[0]), hellaswag_data=hs, dtype="fp32", progress=False), print)
