"""The model: GPT-2 (size, padded vocabulary, causality, init), each modern block switch against a reference written
here, and the one forward pass every consumer (training, validation, HellaSwag, sampling) runs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from support import (
    ROOT,
    SAMPLE_HELLASWAG,
    adversarial_padded_model,
    modern_model,
    read_log,
    reference_losses,
    run_python,
    tiny_config,
    tiny_model,
    write_shards,
)
from torch.nn import functional as F

from gpt2.checkpoint import load_model, model_payload, save_checkpoint
from gpt2.config import MODERN_BLOCK, GPTConfig, train_config
from gpt2.data import ValLoader
from gpt2.distributed import DistContext
from gpt2.hellaswag import evaluate, load_examples
from gpt2.model import GPT, apply_rotary
from gpt2.sample import generate
from gpt2.tokenizer import N_VOCAB
from gpt2.trainer import evaluate_loss, train


def test_gpt2_124m_parameter_count():
    with torch.device("meta"):  # no need to allocate 500 MB to count
        model = GPT(GPTConfig())
    assert model.num_params() == 124_439_808
    assert model.lm_head.weight is model.transformer.wte.weight


def test_presets():
    assert GPTConfig.preset("gpt2-xl") == GPTConfig(n_layer=48, n_head=25, n_embd=1600)
    assert GPTConfig.preset("gpt2", vocab_multiple=64).padded_vocab_size == 50304


def test_padded_vocab_is_never_scored_or_sampled():
    model = tiny_model(vocab_multiple=64)
    assert model.transformer.wte.weight.shape[0] == 50304
    with torch.no_grad():  # make the padded rows irresistible: they must still not appear
        model.transformer.wte.weight[50257:] = 100.0
    idx = torch.randint(0, 50257, (2, 16))
    logits, _ = model(idx)
    _, loss = model(idx, idx)  # with targets: the loss alone, the logits never materialised
    assert logits.shape == (2, 16, 50257)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).item())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the fused loss excludes the padding too
        _, fused = model(idx, idx)
    assert fused.item() == pytest.approx(loss.item(), rel=1e-2)


def test_causal_and_loss_matches_definition():
    model = tiny_model()
    idx = torch.randint(0, 50257, (1, 20))
    logits, _ = model(idx)
    changed = idx.clone()
    changed[0, 10:] = 0
    logits2, _ = model(changed)
    torch.testing.assert_close(logits[:, :10], logits2[:, :10])  # the future never leaks into the past
    targets = torch.randint(0, 50257, (1, 20))
    _, loss = model(idx, targets)
    expected = -torch.log_softmax(logits[0], -1)[torch.arange(20), targets[0]].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_too_long_sequence_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="longer than the model's block size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=1000, n_layer=8, n_head=4, n_embd=256))
    c_fc_std = model.transformer.h[0].mlp.c_fc.weight.std().item()
    c_proj_std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert c_fc_std == pytest.approx(0.02, rel=0.05)
    assert c_proj_std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.transformer.h[0].attn.c_attn.bias.abs().sum() == 0


def test_flops_per_token_formula():
    cfg = GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768)
    with torch.device("meta"):
        model = GPT(cfg)
    n = 124_439_808 - 1024 * 768
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


@pytest.mark.parametrize("bad", [dict(n_embd=30, n_head=4), dict(n_layer=0)])
def test_config_validation(bad):
    with pytest.raises(ValueError):
        GPTConfig(**bad)


# ----------------------------------------------------------------------------------------------------------------------
# The modern block, switch by switch, against references written here


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


# ----------------------------------------------------------------------------------------------------------------------
# One forward pass, and vocabularies padded beyond the tokenizer


def scaled_embeddings(monkeypatch: pytest.MonkeyPatch, scale: float) -> None:
    """A toy architecture change made in one place, the model: the token embeddings scaled by ``scale``."""
    original = torch.nn.Embedding.forward

    def forward(self: torch.nn.Embedding, idx: torch.Tensor) -> torch.Tensor:
        out = original(self, idx)
        return out * scale if self.num_embeddings >= N_VOCAB else out

    monkeypatch.setattr(torch.nn.Embedding, "forward", forward)


@torch.no_grad()
def greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


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


def test_the_scorer_has_no_transformer_of_its_own():
    """Attention, the block loop and the position embedding exist once, in gpt2/model.py."""
    for path in (ROOT / "gpt2").glob("*.py"):
        text = path.read_text()
        for needle in ("scaled_dot_product_attention", "for block in", ".wpe("):
            assert path.name == "model.py" or needle not in text, (path.name, needle)


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
