"""The seams for change: one forward pass that every consumer sees, optimizer groups with their own rates under
one schedule, the v0.1 release's runs and checkpoints reproduced bit for bit, vocabularies padded beyond the
tokenizer, nanoGPT checkpoints converted, and every program's command line generated from its dataclass."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from support import (
    ROOT,
    SAMPLE_HELLASWAG,
    read_log,
    reference_losses,
    run_python,
    tiny_config,
    tiny_model,
    write_shards,
)

from gpt2 import cli
from gpt2.checkpoint import load_model, model_payload, save_checkpoint
from gpt2.config import train_config
from gpt2.data import ValLoader
from gpt2.distributed import DistContext
from gpt2.evaluate import HellaSwagConfig
from gpt2.hellaswag import evaluate, load_examples
from gpt2.model import GPT
from gpt2.optim import GroupSpec, Optimizers, adamw, params_by_role
from gpt2.sample import generate
from gpt2.schedule import lr_multiplier
from gpt2.tokenizer import N_VOCAB
from gpt2.trainer import evaluate_loss, train

# ----------------------------------------------------------------------------------------------------------------------
# One forward pass


def scaled_embeddings(monkeypatch: pytest.MonkeyPatch, scale: float) -> None:
    """A toy architecture change made in one place, the model: the token embeddings scaled by ``scale``."""
    original = torch.nn.Embedding.forward

    def forward(self: torch.nn.Embedding, idx: torch.Tensor) -> torch.Tensor:
        out = original(self, idx)
        return out * scale if self.num_embeddings >= N_VOCAB else out

    monkeypatch.setattr(torch.nn.Embedding, "forward", forward)


def test_an_architecture_change_in_the_model_reaches_training_validation_hellaswag_and_sampling(tmp_path, monkeypatch):
    """Everything downstream runs the model's own forward: change the model and every consumer sees it."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, N_VOCAB, 6000)
    data = write_shards(tmp_path / "data", tokens[:2000], [tokens[2000:]])
    model = tiny_model(seed=1).eval()
    examples = load_examples(SAMPLE_HELLASWAG, limit=12)
    run = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, seq_len=32, micro_batch=2, batch_tokens=64,
               max_steps=2, warmup_steps=1, eval_every=0, sample_every=0, device="cpu", dtype="fp32",
               compile=False, peak_tflops="none")  # fmt: skip

    def observe(out: Path) -> dict:
        val = ValLoader(data, 32, 256, 4, vocab_size=N_VOCAB)
        x, y = next(iter(val))
        _, direct = model(x, y)  # the model's forward, as the change defines it
        hellaswag = evaluate(model, examples, DistContext(), batch_size=4, dtype="fp32", keep_predictions=True)
        train(train_config(data=str(data), out=str(out), **run))
        return {
            "val": evaluate_loss(model, ValLoader(data, 32, 32 * 4, 4, vocab_size=N_VOCAB), DistContext(), "fp32"),
            "direct_val": direct.item(),
            "hellaswag": [p.sum_losses for p in hellaswag.predictions],
            "brute_force": [reference_losses(model, e)[0] for e in examples],
            "sample": generate(model, [464, 3290], num_samples=2, max_new_tokens=8, top_k=1, dtype="fp32"),
            "greedy": greedy(model, [464, 3290], 8),
            "train": [r["loss"] for r in read_log(out) if r["kind"] == "train"],
        }

    before = observe(tmp_path / "before")
    scaled_embeddings(monkeypatch, 40.0)
    after = observe(tmp_path / "after")
    for seen in (before, after):  # each consumer computes what the model's forward computes
        assert seen["val"] == pytest.approx(seen["direct_val"], rel=1e-6)
        for packed, brute in zip(seen["hellaswag"], seen["brute_force"]):
            assert packed == pytest.approx(brute, rel=1e-5)
        assert seen["sample"][0] == seen["greedy"]
    for key in ("val", "hellaswag", "sample", "train"):  # and the change shows everywhere
        assert before[key] != after[key], key


@torch.no_grad()
def greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_the_scorer_has_no_transformer_of_its_own():
    """Attention, the block loop and the position embedding exist once, in gpt2/model.py."""
    for path in (ROOT / "gpt2").glob("*.py"):
        text = path.read_text()
        for needle in ("scaled_dot_product_attention", "for block in", ".wpe("):
            assert path.name == "model.py" or needle not in text, (path.name, needle)


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer groups under one schedule


def test_groups_get_their_own_base_rates_times_the_schedules_multiplier():
    model = tiny_model(seed=2)
    specs = {"embeddings": GroupSpec(lr=1e-2, weight_decay=0.0), "matrices": GroupSpec(lr=1e-4, weight_decay=0.0)}
    opt = Optimizers({"adamw": adamw(model, specs, betas=(0.9, 0.95), eps=1e-8, device_type="cpu")})
    assert [g["name"] for g in opt.param_groups] == ["embeddings", "matrices"]
    multiplier = lr_multiplier(1, warmup_steps=4, max_steps=10, min_lr_ratio=0.1)  # 0.5: halfway up the warmup
    opt.set_lr_multiplier(multiplier)
    assert [g["lr"] for g in opt.param_groups] == [1e-2 * 0.5, 1e-4 * 0.5]

    before = {id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]}
    x = torch.randint(0, 1000, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    # Adam's first step moves every parameter with a gradient by about lr (the update is m / sqrt(v) = sign).
    for group in opt.param_groups:
        moved = torch.cat([(p.detach() - before[id(p)]).abs().flatten() for p in group["params"]])
        assert moved.max().item() == pytest.approx(group["lr"], rel=1e-3), group["name"]


def test_roles_cover_every_parameter_once_and_the_gpt2_grouping_matches_v0_1():
    model = tiny_model()
    roles = params_by_role(model)
    assert roles["head"] == []  # tied to the token embedding
    assert [p is model.transformer.wte.weight for p in roles["embeddings"]] == [True, False]
    flat = [p for role in roles.values() for p in role]
    assert len(flat) == len({id(p) for p in flat}) == len(list(model.parameters()))
    assert all(p.dim() == 2 for p in roles["matrices"]) and all(p.dim() == 1 for p in roles["gains"])


# ----------------------------------------------------------------------------------------------------------------------
# Vocabularies beyond the tokenizer, and nanoGPT checkpoints


def adversarial_padded_model(seed: int = 0) -> GPT:
    """A model saved the nanoGPT way (``vocab_size`` 50304) whose 47 padding rows would win every softmax."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(vocab_size=50304))
    with torch.no_grad():
        h = model.hidden(torch.randint(0, N_VOCAB, (4, 32))).flatten(0, 1)
        model.lm_head.weight[N_VOCAB:] = 200 * h.mean(0) / h.mean(0).norm() ** 2
    return model


@pytest.mark.slow
def test_padding_rows_are_never_sampled_or_scored(tmp_path):
    model = adversarial_padded_model()
    x = torch.randint(0, N_VOCAB, (2, 16))
    assert (model.lm_head(model.hidden(x)).argmax(-1) >= N_VOCAB).float().mean() > 0.5  # they would dominate
    save_checkpoint(tmp_path / "ckpt_000003.pt", model_payload(model, 3))
    loaded, _ = load_model(tmp_path / "ckpt_000003.pt")
    assert loaded.config.vocab_size == N_VOCAB and loaded.config.padded_vocab_size == 50304
    ids = generate(loaded, [464], num_samples=8, max_new_tokens=16, top_k=None)
    assert max(max(row) for row in ids) < N_VOCAB

    sample = run_python("-m", "gpt2.sample", tmp_path, "--num-samples", "2", "--max-new-tokens", "5")
    assert sample.returncode == 0, sample.stderr  # v0.1: a KeyError traceback from the tokenizer

    # HellaSwag agrees with scoring over the tokenizer's 50257 ids only (brute force through forward).
    examples = load_examples(SAMPLE_HELLASWAG, limit=8)
    result = evaluate(loaded, examples, DistContext(), batch_size=4, dtype="fp32", keep_predictions=True)
    for example, pred in zip(examples, result.predictions):
        assert pred.sum_losses == pytest.approx(reference_losses(loaded, example)[0], rel=1e-5)
    # ... where forward's logits are the padded head's first 50257 columns: a 50257-way softmax
    torch.testing.assert_close(loaded(x)[0], loaded.lm_head(loaded.hidden(x))[..., :N_VOCAB])


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


# ----------------------------------------------------------------------------------------------------------------------
# Command lines


PROGRAMS = {
    "prepare_fineweb.py": "gpt2.prepare:PrepareConfig",
    "train.py": "gpt2.config:TrainConfig",
    "eval_hellaswag.py": "gpt2.evaluate:HellaSwagConfig",
    "-m gpt2.sample": "gpt2.sample:SampleConfig",
    "-m gpt2.plot": "gpt2.plot:PlotConfig",
    "-m gpt2.export": "gpt2.export:ExportConfig",
    "-m gpt2.convert": "gpt2.convert:ConvertConfig",
    "-m gpt2.evaluate": "gpt2.evaluate:EvaluateConfig",
}


@pytest.mark.slow
@pytest.mark.parametrize("program", PROGRAMS)
def test_every_programs_help_is_its_dataclass(program):
    module, name = PROGRAMS[program].split(":")
    config = getattr(__import__(module, fromlist=[name]), name)
    expected = {
        cli.flag(f.name) if not f.metadata["positional"] else f.name.upper()
        for f in dataclasses.fields(config)
        if f.metadata.get("cli")
    }
    result = run_python(*program.split(), "--help")
    assert result.returncode == 0, result.stderr
    shown = {word.strip(",") for word in result.stdout.split() if word.startswith("--") or word.isupper()}
    assert expected <= shown
    for f in dataclasses.fields(config):
        if f.metadata.get("cli") and f.metadata["help"]:
            assert f.metadata["help"].split()[0] in result.stdout


def test_a_renamed_flag_still_works_with_a_note(capsys):
    cfg = cli.parse(HellaSwagConfig, ["x", "--data", "f.jsonl"], prog="p")
    assert cfg.hellaswag_data == Path("f.jsonl")
    assert "note: --data is deprecated; use --hellaswag-data" in capsys.readouterr().err
