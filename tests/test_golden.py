"""The previous releases, reproduced: the gpt2 recipe's run as v0.1 made it, the modern recipe's as v0.2 made it
(today's ``--recipe modern-v1``), their checkpoints resumed and evaluated.

Each release's fp32 outputs are recorded per kind of machine (``tests/fixtures/golden_*/``), since fp32 kernels'
last bits differ between CPU vendors, vector levels and torch builds. Every test compares with this machine's
recording bit for bit where one exists, and with every other recording within stated tolerances, so it runs (and
can fail) on any machine. The tolerances are ten times the largest differences measured between recordings:

- v0.1 (AdamW; AMD AVX2, AMD AVX-512, Intel AMX): losses and gradient norms 1.1e-7 relative, weights 3.6e-4 of a
  tensor's largest magnitude, HellaSwag losses 8.8e-8 relative.
- v0.2's modern recipe (AMD AVX2 vs AVX-512): losses and gradient norms 5.3e-4 relative. Weights are compared on
  the same kind of machine only: Muon orthogonalises each update, and for the near-zero first gradients of the
  zero-initialised projections last-bit differences become different directions (up to 0.6 of a tensor's scale
  after 10 steps), while the losses stay close.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
from support import GOLDEN, GOLDEN_V0_2, SAMPLE_HELLASWAG, Recording, recordings

from gpt2.checkpoint import FORMAT_VERSION, checkpoint_format, load_checkpoint, load_model, read_torch_file
from gpt2.config import train_config
from gpt2.distributed import DistContext
from gpt2.evaluate import HellaSwagConfig, run
from gpt2.hellaswag import evaluate, load_examples
from gpt2.sample import generate
from gpt2.trainer import train

SCORE_RTOL = 1e-6

# The settings of tests/fixtures/golden_v0_1/make.py (which adds warmup_steps=2) and golden_v0_2/make.py
RUN = dict(
    n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=256, seq_len=32, micro_batch=2, batch_tokens=128,
    max_steps=10, eval_every=5, val_tokens=1024, sample_every=0, save_every=5, device="cpu", dtype="fp32",
    compile=False, peak_tflops="none",
)  # fmt: skip


@dataclass(frozen=True)
class Release:
    """A previous release's recorded run, and how close another kind of machine's recording comes."""

    fixture: Path
    run: dict
    name: str  # the run's folder in each recording
    layout: int  # the checkpoint format it wrote
    loss_rtol: float
    weight_tol: float | None  # of a tensor's largest magnitude; None: weights compared on the same kind only


V0_1 = Release(GOLDEN, dict(RUN, warmup_steps=2), "run", 1, loss_rtol=1e-6, weight_tol=3.6e-3)
V0_2 = Release(GOLDEN_V0_2, dict(RUN, recipe="modern-v1"), "modern", 2, loss_rtol=5e-3, weight_tol=None)
RELEASES = pytest.mark.parametrize("release", [V0_1, V0_2], ids=["gpt2-v0.1", "modern-v1-v0.2"])


def read_log(path: Path) -> list[dict]:
    """A log's records without the timings, which vary from run to run, and without the memory record (new since
    the fixtures were recorded; it measures the process, not the training)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("dt_ms", "tok_per_s")} for r in records if r["kind"] != "memory"]


def assert_same_history(new: list[dict], old: list[dict], exact: bool, rtol: float) -> None:
    """Bit-identical (or, from another kind of machine, close) losses and gradient norms; the logged lr may differ
    in its last double bit (it is ``--lr`` x the schedule's multiplier since v0.2), which fp32 training never sees."""
    assert [(r["step"], r["kind"]) for r in new] == [(r["step"], r["kind"]) for r in old]
    for a, b in zip(new, old):
        assert a.keys() == b.keys()
        for key in a.keys() - {"step", "kind"}:
            if exact and key != "lr":
                assert a[key] == b[key], (a, b)
            elif b[key] is not None:
                assert a[key] == pytest.approx(b[key], rel=rtol if key != "lr" else 1e-14), (key, a, b)


def assert_same_weights(path: Path, reference: Path, exact: bool, tol: float | None) -> None:
    new, old = load_checkpoint(path)["model"], load_checkpoint(reference)["model"]
    assert new.keys() == old.keys()
    for name in old:
        if exact:
            assert torch.equal(new[name], old[name]), name
        elif tol is not None:
            scale = old[name].abs().max().item() or 1.0
            torch.testing.assert_close(new[name], old[name], rtol=0, atol=tol * scale, msg=name)


def assert_reproduces(out: Path, old: Path, history: list[dict], recording: Recording, release: Release) -> None:
    """The run in ``out`` is the recorded one in ``old``: its ``history`` and its final weights."""
    assert_same_history(read_log(out / "log.jsonl"), history, recording.exact, release.loss_rtol)
    assert_same_weights(out / "ckpt_000010.pt", old / "ckpt_000010.pt", recording.exact, release.weight_tol)


@RELEASES
def test_a_recipe_reproduces_its_release(release: Release, tmp_path: Path):
    train(train_config(data=str(GOLDEN / "data"), out=str(tmp_path), **release.run))
    for recording in recordings(release.fixture):
        old = recording.path / release.name
        assert_reproduces(tmp_path, old, read_log(old / "log.jsonl"), recording, release)


def test_the_gpt2_recipe_in_bf16_stays_within_bf16_rounding_of_v0_1(tmp_path: Path):
    train(train_config(data=str(GOLDEN / "data"), out=str(tmp_path), **{**V0_1.run, "dtype": "bf16"}))
    new = read_log(tmp_path / "log.jsonl")
    for recording in recordings(GOLDEN):
        old = read_log(recording.path / "run_bf16_log.jsonl")
        assert [(r["step"], r["kind"]) for r in new] == [(r["step"], r["kind"]) for r in old]
        for a, b in zip(new, old):
            assert a["loss"] == pytest.approx(b["loss"], rel=4e-3), (recording.path.name, a)  # 8 mantissa bits


@RELEASES
def test_a_release_checkpoint_is_upgraded_and_resumes_as_that_release_went_on(release: Release, tmp_path: Path):
    """Each recording's step-5 checkpoint (its optimizer state in the release's own layout: v0.1's single AdamW
    with two groups, v0.2's named Muon + AdamW) continues to exactly that recording's step 10."""
    for i, recording in enumerate(recordings(release.fixture)):
        old = recording.path / release.name
        assert checkpoint_format(read_torch_file(old / "ckpt_000005.pt")) == release.layout
        upgraded = load_checkpoint(old / "ckpt_000005.pt")
        assert upgraded["format"] == FORMAT_VERSION and upgraded["progress"]["step"] == 5
        out = tmp_path / str(i)
        train(train_config(data=str(GOLDEN / "data"), out=str(out), resume=str(old / "ckpt_000005.pt"), **release.run))
        history = [r for r in read_log(old / "log.jsonl") if r["step"] > 5 or (r["kind"] == "train" and r["step"] == 5)]
        assert_reproduces(out, old, history, recording, release)
        assert read_torch_file(out / "ckpt_000010.pt")["format"] == FORMAT_VERSION


def assert_same_predictions(new: list[dict], old: list[dict], exact: bool) -> None:
    if exact:
        assert new == old
        return
    assert [(p["ind"], p["pred"], p["pred_norm"]) for p in new] == [(p["ind"], p["pred"], p["pred_norm"]) for p in old]
    for a, b in zip(new, old):
        assert a["sum_losses"] == pytest.approx(b["sum_losses"], rel=SCORE_RTOL)


@pytest.mark.slow
def test_a_v0_1_checkpoint_evaluates_to_the_same_predictions_and_samples(shared_data: Path, tmp_path: Path):
    # eval_hellaswag.py --predictions: the evaluation runner with the task hellaswag_nanogpt
    predictions = tmp_path / "predictions.jsonl"
    run(HellaSwagConfig(target=str(GOLDEN / "hellaswag_ckpt.pt"), hellaswag_data=SAMPLE_HELLASWAG, batch_size=16,
                        dtype="fp32", predictions=predictions, progress=False), report=lambda line: None)  # fmt: skip
    written = [json.loads(line) for line in predictions.read_text().splitlines()]
    model, info = load_model(GOLDEN / "hellaswag_ckpt.pt")
    assert info["step"] == 0 and model.config.padded_vocab_size == 50304
    result = evaluate(model, load_examples(SAMPLE_HELLASWAG), DistContext(), batch_size=16, dtype="fp32",
                      keep_predictions=True)  # fmt: skip
    new = [asdict(p) for p in result.predictions]
    assert written == new
    for recording in recordings(GOLDEN):
        old = [json.loads(line) for line in (recording.path / "hellaswag_predictions.jsonl").read_text().splitlines()]
        assert_same_predictions(new, old, recording.exact)
    examples = load_examples(shared_data / "hellaswag" / "hellaswag_val_first1000.jsonl")
    result = evaluate(model, examples, DistContext(), batch_size=32, dtype="fp32", keep_predictions=True)
    lines = "".join(json.dumps(asdict(p)) + "\n" for p in result.predictions)
    new = [{k: v for k, v in asdict(p).items() if k != "label"} for p in result.predictions]
    for recording in recordings(GOLDEN):
        if recording.exact:  # byte-identical output, fp32
            expected = (recording.path / "hellaswag_first1000_predictions.sha256").read_text().strip()
            assert hashlib.sha256(lines.encode()).hexdigest() == expected
        if (scores := recording.path / "hellaswag_first1000_scores.jsonl.gz").exists():
            old = [json.loads(line) for line in gzip.decompress(scores.read_bytes()).decode().splitlines()]
            assert_same_predictions(new, old, recording.exact)
    assert len(generate(model, [15496, 11], num_samples=2, max_new_tokens=5)) == 2


def test_a_checkpoint_of_a_newer_format_is_refused_clearly(tmp_path: Path):
    raw = read_torch_file(GOLDEN / "hellaswag_ckpt.pt")
    torch.save({**raw, "format": FORMAT_VERSION + 1}, tmp_path / "ckpt_000001.pt")
    with pytest.raises(Exception, match=rf"has format {FORMAT_VERSION + 1}, from a newer release .* upgrade gpt2"):
        load_checkpoint(tmp_path / "ckpt_000001.pt")


def test_recordings_are_compared_exactly_only_on_their_own_kind_of_machine():
    found = recordings(GOLDEN)
    assert sum(r.exact for r in found) <= 1 and len(found) >= 2 and all(isinstance(r, Recording) for r in found)
