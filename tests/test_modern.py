"""The modern recipe: each block switch against an independent reference, Muon and warmup-stable-decay, and
everything the GPT-2 recipe guarantees (DDP equals accumulation, exact resume, compile, HellaSwag, sampling)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import (
    ONE_THREAD,
    ROOT,
    SAMPLE_HELLASWAG,
    Capture,
    cli_flags,
    losses,
    read_log,
    reference_losses,
    run_python,
    tiny,
    tiny_config,
)
from torch.nn import functional as F

from gpt2.checkpoint import load_model, model_payload, save_checkpoint
from gpt2.config import MODERN_BLOCK, GPTConfig, train_config
from gpt2.distributed import DistContext
from gpt2.errors import UserError
from gpt2.hellaswag import evaluate, load_examples
from gpt2.hf import export_hf
from gpt2.model import GPT, apply_rotary
from gpt2.optim import build_optimizers
from gpt2.sample import generate
from gpt2.schedule import lr_multiplier
from gpt2.trainer import StopRequest, train


def modern_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    # random weights everywhere, and the soft-cap on (the recipe leaves it off; its path is tested here)
    model = GPT(tiny_config(**{**MODERN_BLOCK, "zero_init": False, "logit_softcap": 15.0, **overrides}))
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Each switch against a reference written here


def test_rotary_equals_the_complex_number_formulation():
    theta, head_dim, T = 10000.0, 8, 12
    x = torch.randn(2, 3, T, head_dim)
    model = GPT(tiny_config(rope_theta=theta, n_embd=head_dim * 2, n_head=2, block_size=16))
    cos, sin = model.transformer.rotary(torch.arange(T))
    # Channel pair (i, i + d/2) is the complex number x_i + j x_{i+d/2}, rotated by position * theta^(-2i/d).
    z = torch.complex(x[..., : head_dim // 2].double(), x[..., head_dim // 2 :].double())
    freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    rotated = z * torch.polar(torch.ones(T, head_dim // 2, dtype=torch.float64), torch.outer(torch.arange(T), freq))
    expected = torch.cat([rotated.real, rotated.imag], dim=-1).float()
    torch.testing.assert_close(apply_rotary(x, cos, sin), expected, rtol=1e-5, atol=1e-5)
    # ... and attention scores then depend on relative positions only
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    cos, sin = model.transformer.rotary(torch.arange(16))

    def score(pq: int, pk: int) -> float:
        return float(apply_rotary(q, cos[pq], sin[pq]) @ apply_rotary(k, cos[pk], sin[pk]))

    assert score(7, 3) == pytest.approx(score(12, 8), rel=1e-5)


def test_qk_norm_gives_unit_rms_queries_and_keys_per_head(monkeypatch):
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q, k))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = modern_model(rope_theta=0.0)  # rotation keeps the norm anyway; test the normalisation alone
    model(torch.randint(0, 1000, (2, 10)))
    for q, k in seen:
        for t in (q, k):
            rms = t.float().pow(2).mean(-1).sqrt()
            torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-4, atol=1e-4)


def test_softcapped_logits_stay_within_the_cap_and_equal_cap_tanh():
    model = modern_model(logit_softcap=3.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(200)  # raw logits far beyond the cap
        idx = torch.randint(0, 1000, (2, 10))
        h = model.hidden(idx)
        raw = (h @ model.lm_head.weight.T)[..., : model.config.vocab_size]
        logits, _ = model(idx)
    assert raw.abs().max() > 30 and logits.abs().max() <= 3.0
    torch.testing.assert_close(logits, 3.0 * torch.tanh(raw / 3.0))


def test_relu2_rmsnorm_untied_head_and_no_bias_are_what_they_say():
    model = modern_model()
    mlp, x = model.transformer.h[0].mlp, torch.randn(3, 32)
    torch.testing.assert_close(mlp(x), mlp.c_proj(F.relu(mlp.c_fc(x)) ** 2))
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert not any("ln_" in name for name, _ in model.named_parameters())  # the RMSNorms have no parameters
    h = torch.randn(4, 32) * 5
    torch.testing.assert_close(model.transformer.ln_f(h), h / h.pow(2).mean(-1, keepdim=True).sqrt())
    zeroed = GPT(tiny_config(**MODERN_BLOCK))  # zero_init: blocks start as the identity, the head at zero
    for block in zeroed.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
    assert zeroed.lm_head.weight.abs().sum() == 0 and zeroed.transformer.wte.weight.abs().sum() > 0


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(synthetic, tmp_path):
    cfg = tiny(synthetic, tmp_path, recipe="modern")
    model = GPT(cfg.model_config())
    opt = build_optimizers(model, cfg, "cpu")
    muon, adam = opt.optimizers["muon"], opt.optimizers["adamw"]
    assert isinstance(muon, torch.optim.Muon)
    assert all(p.dim() == 2 and p.shape[0] < 1000 for g in muon.param_groups for p in g["params"])
    assert [(g["name"], g["base_lr"]) for g in adam.param_groups] == [("embeddings", 0.3), ("head", 0.006)]
    n = sum(p.numel() for o in (muon, adam) for g in o.param_groups for p in g["params"])
    assert n == model.num_params()


def test_wsd_warms_up_holds_and_cools_down_to_the_end_of_any_budget():
    kw = dict(warmup_steps=0, max_steps=108, min_lr_ratio=0.0, schedule="wsd", cooldown_frac=0.4)
    values = [lr_multiplier(s, **kw) for s in range(109)]
    cooldown = 108 - round(0.4 * 108)
    assert values[:cooldown] == [1.0] * cooldown
    assert all(a > b for a, b in zip(values[cooldown:], values[cooldown + 1 :]))
    assert values[107] == pytest.approx(1 / (108 - cooldown)) and values[108] == 0.0  # fully decayed at the end
    cfg = train_config(recipe="modern", max_steps=108)
    assert (cfg.warmup(), cfg.schedule, cfg.cooldown_frac, cfg.min_lr) == (0, "wsd", 0.4, 0.0)
    assert train_config(recipe="modern", max_steps=200, warmup_frac=0.05).warmup() == 10


# ----------------------------------------------------------------------------------------------------------------------
# The pipeline's guarantees, under the modern recipe

MODERN = dict(recipe="modern", warmup_steps=1, logit_softcap=15.0)  # every piece on, the optional soft-cap too


@pytest.mark.slow
def test_modern_ddp_on_two_ranks_equals_accumulation_in_one_process(synthetic: Path, tmp_path: Path):
    run = dict(**MODERN, max_steps=6, eval_every=3, micro_batch=2, batch_tokens=128, save_every=3)
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
         *cli_flags(synthetic, tmp_path / "ddp", **run)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD},
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = Capture()
    train(tiny(synthetic, tmp_path / "single", **run), single)
    for kind in ("train", "val"):
        a, b = losses(read_log(tmp_path / "ddp"), kind), losses(single.records, kind)
        assert sorted(a) == sorted(b) and len(a) >= 3
        for step in a:
            assert a[step] == pytest.approx(b[step], rel=1e-5), (kind, step)
    assert losses(single.records)[5] < losses(single.records)[0]
    # The two-rank checkpoint (Muon and AdamW state included) continues in one process as the same run.
    branch = Capture()
    train(tiny(synthetic, tmp_path / "resized", **run, resume=str(tmp_path / "ddp" / "ckpt_000003.pt")), branch)
    resized, reference = losses(branch.records), losses(single.records)
    assert sorted(resized) == [3, 4, 5]
    assert all(resized[s] == pytest.approx(reference[s], rel=1e-5) for s in resized)


def test_modern_resume_is_bit_identical(synthetic: Path, tmp_path: Path):
    run = dict(**MODERN, max_steps=20, eval_every=5)
    train(tiny(synthetic, tmp_path / "straight", **run))
    stop = StopRequest()
    train(tiny(synthetic, tmp_path / "resumed", **run), Capture(stop, stop_after=10), stop)
    train(tiny(synthetic, tmp_path / "resumed", **run))
    for kind in ("train", "val"):
        assert losses(read_log(tmp_path / "resumed"), kind) == losses(read_log(tmp_path / "straight"), kind)


@pytest.mark.slow
def test_modern_compiled_run_trains_evaluates_and_samples(synthetic: Path, tmp_path: Path):
    cap = Capture()
    train(tiny(synthetic, tmp_path, **MODERN, compile=True, n_layer=1, max_steps=3, eval_every=3, val_tokens=256,
               sample_every=3, sample_prompt="a", max_new_tokens=4, num_samples=1, vocab_size=50257), cap)  # fmt: skip
    kinds = [r["kind"] for r in cap.records]
    assert kinds.count("train") == 3 and "val" in kinds and "sample" in kinds


def test_hellaswag_on_a_modern_checkpoint_equals_brute_force_scoring(tmp_path: Path):
    model = modern_model(seed=5)
    save_checkpoint(tmp_path / "ckpt_000001.pt", model_payload(model, 1))
    loaded, _ = load_model(tmp_path / "ckpt_000001.pt")
    examples = load_examples(SAMPLE_HELLASWAG, limit=10)
    result = evaluate(loaded, examples, DistContext(), batch_size=3, dtype="fp32", keep_predictions=True)
    for example, pred in zip(examples, result.predictions):
        sums, means = reference_losses(loaded, example)
        assert pred.sum_losses == pytest.approx(sums, rel=1e-5)
        assert pred.mean_losses == pytest.approx(means, rel=1e-5)
    ids = generate(loaded, [464, 3290], num_samples=2, max_new_tokens=6)
    assert len(ids) == 2 and all(len(row) == 6 for row in ids)


# ----------------------------------------------------------------------------------------------------------------------
# One-line errors


@pytest.mark.slow
def test_unknown_recipe_odd_rotary_head_and_exporting_a_modern_model_are_clear_errors(tmp_path: Path):
    bad = run_python("train.py", "--recipe", "llama")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "invalid choice: 'llama'" in bad.stderr
    with pytest.raises(UserError, match="unknown --recipe 'llama'"):
        train_config(recipe="llama")
    with pytest.raises(UserError, match="rotary embeddings need an even head dimension, got 9"):
        train_config(recipe="modern", n_embd=18, n_head=2).model_config()
    with pytest.raises(ValueError, match="even head dimension"):
        GPTConfig(n_embd=18, n_head=2, rope_theta=10000.0)
    with pytest.raises(UserError, match=r"GPT2LMHeadModel cannot hold this architecture \(rope_theta=10000.0, "):
        export_hf(modern_model(), tmp_path / "hf")
    save_checkpoint(tmp_path / "ckpt_000001.pt", model_payload(modern_model(), 1))
    proc = run_python("-m", "gpt2.export", tmp_path / "ckpt_000001.pt", tmp_path / "hf")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "norm='rmsnorm'" in proc.stderr
    assert not (tmp_path / "hf").exists()
