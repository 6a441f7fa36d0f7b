"""Document masks and attention windows: the masks equal ones written out query by query, attention equals attention
computed one document at a time, flex_attention equals SDPA (eager and compiled), and every layer gets its window."""

from __future__ import annotations

import math

import pytest
import torch
from support import speedrun_model, tiny_config
from torch.nn import functional as F

from gpt2 import model as model_module
from gpt2.config import GPTConfig
from gpt2.model import GPT, attend

EOT = 50256


def rows_with_documents(B: int = 2, T: int = 40, seed: int = 0) -> torch.Tensor:
    """Token rows with documents of varied lengths: one starting mid-row, one of a single token, one at position 0."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 1000, (B, T), generator=g)
    idx[0, [0, 9, 10, 23]] = EOT  # row 0 starts with a document; a one-token document at 9
    idx[1, [17, 31]] = EOT  # row 1 starts mid-document (as a window of the stream does)
    return idx


def reference_allowed(tokens: list[int], window: int | None) -> torch.Tensor:
    """(T, T) written out: query q sees key k iff k <= q, no document starts in (k, q], and q - k < window."""
    T = len(tokens)
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for q in range(T):
        for k in range(q + 1):
            same_document = all(tokens[j] != EOT for j in range(k + 1, q + 1))
            allowed[q, k] = same_document and (window is None or q - k < window)
    return allowed


@pytest.mark.parametrize("window", [None, 1, 5])
def test_masks_equal_the_rule_written_out_query_by_query(window):
    model = GPT(tiny_config(doc_mask=True, window_pattern="S", short_window=window or 1, n_layer=2))
    idx = rows_with_documents()
    masks = model.attention_masks(idx, torch.arange(idx.size(1)), None)
    assert set(masks) == {None, window or 1}  # layer 0 is short, the last layer always long
    mask = masks[window] if window else masks[None]
    for b in range(idx.size(0)):
        assert torch.equal(mask[b, 0], reference_allowed(idx[b].tolist(), window)), b


def test_off_by_default_every_layer_is_plain_causal_attention():
    for config in (tiny_config(), tiny_config(window_pattern="L"), tiny_config(window_pattern="S", n_layer=1)):
        masks = GPT(config).attention_masks(rows_with_documents(), torch.arange(40), None)
        assert masks == {None: None}  # SDPA's is_causal kernel, as before these switches existed


def test_window_pattern_is_tiled_and_the_last_layer_sees_everything():
    config = GPTConfig(n_layer=6, block_size=64, window_pattern="SSL", short_window=0)
    assert config.windows == [16, 16, None, 16, 16, None]
    assert GPTConfig(n_layer=3, window_pattern="s", short_window=7).windows == [7, 7, None]
    for bad in (dict(window_pattern="SXL"), dict(short_window=-1), dict(value_embeds=2, n_layer=3)):
        with pytest.raises(ValueError):
            GPTConfig(**bad)


def attention_one_query_at_a_time(q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    """softmax(q.k / sqrt(d)) over the allowed keys, then the weighted values, in float64, query by query."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, D = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for t in range(T):
            keys = allowed[b, t].nonzero().flatten()
            scores = (q[b, :, t : t + 1] @ k[b][:, keys].transpose(-1, -2)) / math.sqrt(D)  # (H, 1, n)
            out[b, :, t] = (scores.softmax(-1) @ v[b][:, keys]).squeeze(1)
    return out


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("window", [None, 4])
def test_attention_equals_attention_over_the_allowed_keys_only(monkeypatch, backend, window):
    monkeypatch.setattr(model_module, "MASKED_ATTENTION", backend)
    model = GPT(tiny_config(doc_mask=True, window_pattern="S", short_window=window or 1, n_layer=2))
    idx = rows_with_documents()
    mask = model.attention_masks(idx, torch.arange(40), None)[window]
    q, k, v = torch.randn(3, 2, 2, 40, 16).unbind(0)
    allowed = torch.stack([reference_allowed(row.tolist(), window) for row in idx])
    expected = attention_one_query_at_a_time(q, k, v, allowed)
    torch.testing.assert_close(attend(q, k, v, mask).double(), expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("windows", [False, True])
def test_a_row_of_documents_equals_each_document_run_alone(windows):
    """The whole model: the hidden states of a packed row are those of each document run on its own (at the same
    positions; with rotary embeddings only differences of positions matter, up to rounding)."""
    overrides = {} if windows else dict(window_pattern="")
    model = speedrun_model(seed=1, **overrides)
    alone = speedrun_model(seed=1, doc_mask=False, **overrides)  # the same weights, no document mask
    idx = rows_with_documents()
    packed = model.hidden(idx)
    for b in range(idx.size(0)):
        starts = [0] + (idx[b] == EOT).nonzero().flatten().tolist() + [idx.size(1)]
        for a, z in zip(starts, starts[1:]):
            if z > a:
                h = alone.hidden(idx[b : b + 1, a:z], pos=torch.arange(a, z)[None])
                torch.testing.assert_close(packed[b, a:z], h[0], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(packed, alone.hidden(idx), atol=1e-3)  # the mask does change the row


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_flex_attention_equals_sdpa_in_the_model_forward(monkeypatch, compile):
    """The flex path (the GPU one) computes what the SDPA path computes, checked on CPU eager and compiled. Forward
    only: torch 2.13's flex_attention has no backward on CPU, which is one reason "auto" never picks it there."""
    model = speedrun_model(seed=2)
    idx = rows_with_documents(T=64)  # fewer tokens than one 128-token flex block: partial blocks work
    logits = {}
    for backend in ("sdpa", "flex"):
        monkeypatch.setattr(model_module, "MASKED_ATTENTION", backend)
        torch._dynamo.reset()
        logits[backend] = (torch.compile(model) if compile else model)(idx)[0]
    torch.testing.assert_close(logits["flex"], logits["sdpa"], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@torch.no_grad()  # flex has no backward on CPU (see above)
def test_auto_uses_flex_only_under_compile_on_a_flex_device(monkeypatch):
    seen = []
    original = model_module.flex_block_mask
    monkeypatch.setattr(model_module, "flex_block_mask", lambda *a: seen.append(a) or original(*a))
    model = speedrun_model(seed=3)
    idx = rows_with_documents(T=32)
    model(idx)
    assert seen == []  # eager: SDPA
    torch._dynamo.reset()
    torch.compile(model)(idx)
    assert seen == []  # CPU is not a FLEX_DEVICE: SDPA, compiled
    monkeypatch.setattr(model_module, "FLEX_DEVICES", ("cpu",))
    torch._dynamo.reset()
    torch.compile(model, dynamic=False)(idx)
    assert len(seen) == 2  # one block mask per distinct window (6 and full), built once per forward


def test_sdpa_boolean_mask_path_matches_a_plain_softmax():
    """The boolean-mask SDPA call itself, against F.softmax with -inf where masked (a sanity check of the kernel)."""
    q, k, v = torch.randn(3, 1, 2, 10, 8).unbind(0)
    allowed = torch.rand(1, 1, 10, 10) > 0.5
    allowed |= torch.eye(10, dtype=torch.bool)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    expected = F.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
    torch.testing.assert_close(attend(q, k, v, allowed), expected, atol=1e-6, rtol=1e-5)
