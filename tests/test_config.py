"""Configuration: recipes are functions returning complete configs; the flags a user gives select pieces that bring
their own defaults; ``--help`` shows the chosen recipe's values; validation is of values alone."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from support import ROOT, TINY, read_log, run_python

from gpt2 import cli
from gpt2.cli import build_parser, parse
from gpt2.config import (
    ADAMW_LR,
    MUON_LR,
    PRESETS,
    RECIPES,
    TrainConfig,
    gpt2_recipe,
    modern_recipe,
    train_config,
)
from gpt2.errors import UserError
from gpt2.evaluate import HellaSwagConfig
from gpt2.trainer import train


def test_defaults_are_the_gpt2_124m_recipe_and_flags_mirror_the_config():
    cfg = parse(TrainConfig, [], prog="train.py", factory=train_config)
    assert cfg == gpt2_recipe()
    expected = dict(
        model="gpt2", seq_len=1024, micro_batch=64, batch_tokens=524288, max_steps=19073, warmup_steps=715,
        lr=6e-4, min_lr=6e-5, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0, seed=1337,
        data="data/fineweb_edu10B", out="runs/gpt2-124m", device="auto", dtype="bf16", eval_every=250,
        save_every=5000, resume="auto",
    )  # fmt: skip
    assert {k: getattr(cfg, k) for k in expected} == expected
    arch = cfg.model_config()
    assert (arch.n_layer, arch.n_head, arch.n_embd, arch.vocab_size, arch.padded_vocab_size) == (
        12,
        12,
        768,
        50257,
        50304,
    )
    assert cfg.use_compile("cuda") and not cfg.use_compile("cpu")
    argv = ["--seq-len", "256", "--micro-batch", "4", "--no-compile", "--n-layer", "3"]
    cfg = parse(TrainConfig, argv, prog="t", factory=train_config)
    assert (cfg.seq_len, cfg.micro_batch, cfg.compile, cfg.n_layer, cfg.model_config().n_layer) == (256, 4, False, 3, 3)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_a_recipe_is_complete_and_concretely_typed(recipe):
    cfg = RECIPES[recipe]()
    assert cfg.recipe == recipe
    hints = {f.name: f.type for f in fields(TrainConfig)}
    for name in ("lr", "min_lr", "beta1", "beta2", "eps", "weight_decay", "cooldown_frac", "rope_theta"):
        assert isinstance(getattr(cfg, name), float), (name, hints[name])
    with pytest.raises(TypeError, match="missing"):
        TrainConfig()  # a config is made by a recipe, not from half the values


def test_the_command_line_defaults_and_help_are_the_chosen_recipes():
    assert parse(TrainConfig, ["--recipe", "modern"], prog="t", factory=train_config) == modern_recipe()
    shown = build_parser(TrainConfig, prog="t", defaults=modern_recipe()).format_help()
    assert "(default: 0.02)" in shown and "(default: 0.3)" in shown  # Muon's and the embeddings' rates
    assert "(default: 0.0006)" in build_parser(TrainConfig, prog="t", defaults=gpt2_recipe()).format_help()


def test_overriding_the_optimizer_brings_that_optimizers_own_rate():
    adamw = train_config(recipe="modern", optimizer="adamw")
    assert (adamw.optimizer, adamw.lr, adamw.embed_lr, adamw.head_lr) == ("adamw", ADAMW_LR, 0.3, 0.006)
    muon = train_config(recipe="gpt2", optimizer="muon")
    assert (muon.lr, muon.embed_lr, muon.head_lr, muon.gains_lr) == (MUON_LR, 6e-4, 6e-4, 6e-4)
    assert muon.min_lr / muon.lr == pytest.approx(0.1)  # the schedule still ends at the recipe's fraction
    assert train_config(recipe="modern", optimizer="adamw", lr=1e-3).lr == 1e-3  # a flag given wins


def test_modern_with_adamw_trains_and_logs_adamws_rate(synthetic, tmp_path):
    run = {k: v for k, v in TINY.items() if k not in ("warmup_steps", "max_steps")}  # no warmup: the recipe's
    run["n_layer"] = 4  # the recipe's two value-embedding tables need four layers
    train(train_config(data=str(synthetic), out=str(tmp_path), **run, recipe="modern", optimizer="adamw", max_steps=2))
    first = next(r for r in read_log(tmp_path) if r["kind"] == "train")
    assert first["lr"] == ADAMW_LR  # wsd without warmup: the peak from step 0


def test_a_preset_brings_its_architecture_and_the_demo_its_run():
    medium = train_config(model="gpt2-medium")
    assert (medium.n_layer, medium.n_head, medium.n_embd) == (24, 16, 1024)
    demo = train_config(model="demo", recipe="modern")
    assert (demo.n_embd, demo.block_size, demo.seq_len, demo.batch_tokens % (demo.seq_len * demo.micro_batch)) == (
        64, 64, 64, 0)  # fmt: skip
    assert demo.rope_theta == 10000.0  # the recipe's block stays
    assert train_config(model="demo", n_layer=2).n_layer == 2


def test_the_warmup_is_given_in_steps_or_as_a_fraction():
    assert train_config().warmup() == 715
    assert train_config(warmup_frac=0.1, max_steps=100).warmup() == 10  # the fraction replaces the recipe's steps
    with pytest.raises(UserError, match="not both"):
        train_config(warmup_frac=0.1, warmup_steps=5)
    with pytest.raises(UserError, match="--warmup-steps 30 exceeds --max-steps 20"):
        train_config(warmup_steps=30, max_steps=20)


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(recipe="llama"), "unknown --recipe 'llama'"),
        (dict(lr=-1.0), "--lr must be positive"),
        (dict(min_lr=1.0), "need --min-lr <= --lr"),
        (dict(init_from="gpt2", n_layer=2), "--init-from takes the pretrained model's architecture; drop --n-layer"),
        (dict(init_from="gpt2", recipe="modern"), "--init-from loads OpenAI's GPT-2 architecture"),
    ],
)
def test_bad_values_are_one_line_user_errors(flags, message):
    with pytest.raises(UserError, match=message):
        train_config(**flags)


def test_validating_a_config_imports_neither_the_model_nor_a_tracker():
    code = (
        "import sys; from gpt2.config import train_config; train_config(recipe='modern', tensorboard='tb'); "
        "print([m for m in ('gpt2.model', 'gpt2.tracking', 'torch.utils.tensorboard', 'wandb') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert json.loads(out.replace("'", '"')) == []


def test_every_preset_is_a_valid_architecture():
    for name in PRESETS:
        assert train_config(model=name).model_config().n_layer == PRESETS[name]["n_layer"]


@pytest.mark.slow
def test_the_readmes_demo_command_runs_on_the_demo_data(tmp_path):
    """``python train.py --model demo --data data/demo --out runs/demo ...`` (README), shortened to 2 steps."""
    data = tmp_path / "demo"
    sample = ROOT / "data" / "sample"
    prepared = run_python("prepare_fineweb.py", "--input", sample / "wiki.jsonl", sample / "c4.jsonl", "--out", data,
                          "--shard-tokens", "131072", "--val-shard-tokens", "65536")  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr
    proc = run_python("train.py", "--model", "demo", "--data", data, "--out", tmp_path / "run", "--lr", "1e-2",
                      "--min-lr", "1e-3", "--embed-lr", "1e-3", "--max-steps", "2", "--warmup-steps", "1",
                      "--device", "cpu", env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    records = read_log(tmp_path / "run")
    assert [r["step"] for r in records if r["kind"] == "train"] == [0, 1] and "val" in {r["kind"] for r in records}


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
