"""Checkpoint format, the one model loader behind every program, sampling, and their one-line errors."""

import dataclasses
import sys
import types
from pathlib import Path

import pytest
import torch
from support import adversarial_padded_model, run_python, tiny_config, tiny_model

from gpt2.checkpoint import clean_state_dict, load_model, model_payload, save_checkpoint
from gpt2.errors import UserError
from gpt2.model import GPT
from gpt2.rundir import find_checkpoints
from gpt2.sample import generate
from gpt2.tokenizer import N_VOCAB


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


def save_build_nanogpt_checkpoint(path: Path, model: GPT, step: int) -> None:
    """A checkpoint as build-nanogpt's train_gpt2.py writes it: its GPTConfig dataclass pickled by reference
    to a module (``train_gpt2``) that does not exist where the checkpoint is read."""
    module = types.ModuleType("train_gpt2")

    @dataclasses.dataclass
    class GPTConfig:  # noqa: F811 - build-nanogpt's own, deliberately the same name
        block_size: int = 1024
        vocab_size: int = 50257
        n_layer: int = 12
        n_head: int = 12
        n_embd: int = 768

    GPTConfig.__module__, GPTConfig.__qualname__ = "train_gpt2", "GPTConfig"
    module.GPTConfig = GPTConfig
    sys.modules["train_gpt2"] = module
    try:
        c = model.config
        config = GPTConfig(c.block_size, 50304, c.n_layer, c.n_head, c.n_embd)
        state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}  # saved from a compiled model
        torch.save({"model": state, "config": config, "step": step, "val_loss": 3.5}, path)
    finally:
        del sys.modules["train_gpt2"]


@pytest.mark.slow
def test_convert_reads_build_nanogpt_and_nanogpt_checkpoints_only_with_trust_pickle_when_pickled(tmp_path):
    model = adversarial_padded_model(seed=4)
    save_build_nanogpt_checkpoint(tmp_path / "bn.pt", model, step=7)

    refused = run_python("-m", "gpt2.convert", tmp_path / "bn.pt", tmp_path / "ours.pt")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "--trust-pickle" in refused.stderr and not (tmp_path / "ours.pt").exists()

    done = run_python("-m", "gpt2.convert", tmp_path / "bn.pt", tmp_path / "ours.pt", "--trust-pickle")
    assert done.returncode == 0, done.stderr
    assert "--trust-pickle" in done.stderr  # the warning
    converted, info = load_model(tmp_path / "ours.pt")
    assert info["step"] == 7 and converted.config.vocab_size == N_VOCAB
    x = torch.randint(0, N_VOCAB, (2, 16))
    torch.testing.assert_close(converted(x)[0], model.lm_head(model.hidden(x))[..., :N_VOCAB])

    # nanoGPT proper: model_args, bias=False (zero biases), a plain (weights-only) file; no flag needed.
    nano = GPT(tiny_config(vocab_size=50304))
    state = {k: v for k, v in nano.state_dict().items() if not k.endswith(".bias")}
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()  # nanoGPT's causal-mask buffer
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, bias=False, vocab_size=50304, dropout=0.0)
    torch.save({"model": state, "model_args": args, "iter_num": 250, "best_val_loss": 4.0}, tmp_path / "nano.pt")
    done = run_python("-m", "gpt2.convert", tmp_path / "nano.pt", tmp_path / "nano_ours.pt")
    assert done.returncode == 0, done.stderr
    converted, info = load_model(tmp_path / "nano_ours.pt")
    assert info["step"] == 250
    with torch.no_grad():
        for name, p in nano.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
    torch.testing.assert_close(converted(x)[0], nano(x)[0][..., :N_VOCAB])
