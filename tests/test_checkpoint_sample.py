"""Checkpoint format, the one model loader behind every program, sampling, and their one-line errors."""

import pytest
import torch
from support import run_python, tiny_model

from gpt2.checkpoint import clean_state_dict, load_model, model_payload, save_checkpoint
from gpt2.errors import UserError
from gpt2.rundir import find_checkpoints
from gpt2.sample import generate


@pytest.fixture
def run_dir(tmp_path):
    model = tiny_model(seed=3)
    for step in (5, 10):
        save_checkpoint(tmp_path / f"ckpt_{step:06d}.pt", model_payload(torch.compile(model), step))
    (tmp_path / "ckpt_000015.pt.tmp").write_bytes(b"half-written")
    return tmp_path


def test_checkpoint_format_is_plain_and_weights_only(run_dir):
    ckpt = torch.load(run_dir / "ckpt_000010.pt", weights_only=True)
    assert ckpt["step"] == 10 and ckpt["config"]["n_layer"] == 2
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert [step for step, _ in find_checkpoints(run_dir)] == [5, 10]  # the .tmp is not a checkpoint


def test_clean_state_dict_strips_wrappers():
    assert list(clean_state_dict({"module._orig_mod.lm_head.weight": 0, "_orig_mod.x.y": 1})) == [
        "lm_head.weight",
        "x.y",
    ]


def test_load_model_from_run_dir_takes_newest(run_dir):
    model, info = load_model(run_dir)
    assert info["step"] == 10 and not model.training
    torch.testing.assert_close(model.state_dict(), tiny_model(seed=3).state_dict())


@pytest.mark.slow
def test_same_seed_same_text_compiled_or_not():
    model = tiny_model(seed=4).eval()
    eager = generate(model, [15496, 11], num_samples=3, max_new_tokens=8, seed=42)
    assert eager == generate(model, [15496, 11], num_samples=3, max_new_tokens=8, seed=42)
    assert eager != generate(model, [15496, 11], num_samples=3, max_new_tokens=8, seed=43)
    compiled = generate(torch.compile(model, dynamic=True), [15496, 11], num_samples=3, max_new_tokens=8, seed=42)
    assert compiled == eager
    assert all(0 <= t < 50257 for row in eager for t in row)


@pytest.mark.slow
def test_sample_cli(run_dir):
    result = run_python("-m", "gpt2.sample", run_dir / "ckpt_000005.pt", "--num-samples", "2", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("sample 0: Hello, I'm a language model,")
    again = run_python("-m", "gpt2.sample", run_dir / "ckpt_000005.pt", "--num-samples", "2", "--max-new-tokens", "5")
    assert again.stdout == result.stdout


def corrupt(run_dir):
    (run_dir / "ckpt_000010.pt").write_bytes((run_dir / "ckpt_000010.pt").read_bytes()[:1000])
    return run_dir / "ckpt_000010.pt"


def mismatched(run_dir):
    ckpt = torch.load(run_dir / "ckpt_000010.pt", weights_only=True)
    ckpt["config"]["n_embd"] = 64
    torch.save(ckpt, run_dir / "ckpt_000010.pt")
    return run_dir / "ckpt_000010.pt"


@pytest.mark.parametrize(
    "make_target, args, message",
    [
        (lambda d: "gpt7", [], "gpt7 does not exist"),
        (lambda d: d / "ckpt_000099.pt", [], "ckpt_000099.pt does not exist"),
        (corrupt, [], "ckpt_000010.pt cannot be loaded"),
        (mismatched, [], "config does not match the weights"),
        (lambda d: d, ["--prompt", "word " * 70], "exceeds the model's block size 64"),
        (lambda d: d / "ckpt_000005.pt", ["--device", "tpu"], "invalid choice: 'tpu'"),
    ],
)
@pytest.mark.slow
def test_bad_input_is_one_line(run_dir, make_target, args, message):
    result = run_python("-m", "gpt2.sample", make_target(run_dir), *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_load_model_errors_in_library(tmp_path):
    with pytest.raises(UserError, match="holds no ckpt"):
        load_model(tmp_path)
