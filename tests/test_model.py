"""The GPT-2 model: size, masking of padded vocabulary, causality, init, optimizer groups."""

import math

import pytest
import torch
from support import tiny_model

from gpt2.config import GPTConfig
from gpt2.model import GPT


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
