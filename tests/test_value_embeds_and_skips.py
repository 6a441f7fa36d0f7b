"""Value embeddings, U-net skips and the x0 mix against the formulas written out here; every new parameter in a
sensible optimizer role; the FLOP count with windows and lookups; the switches recorded in checkpoints and refused
by the GPT-2 export."""

from __future__ import annotations

import pytest
import torch
from support import speedrun_model, tiny_config
from torch.nn import functional as F

from gpt2 import model as model_module
from gpt2.checkpoint import load_model, model_payload, save_checkpoint
from gpt2.config import GPTConfig, train_config
from gpt2.errors import UserError
from gpt2.hf import export_hf
from gpt2.model import GPT
from gpt2.optim import build_optimizers, params_by_role

MODERN = dict(rope_theta=10000.0, norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=False, bias=False)


def test_value_embedding_tables_serve_the_first_and_last_layers():
    assert GPTConfig(n_layer=6, value_embeds=2).value_embed_layers == {0: 0, 1: 1, 4: 0, 5: 1}
    assert GPTConfig(n_layer=2, value_embeds=1).value_embed_layers == {0: 0, 1: 0}
    assert GPTConfig(n_layer=6).value_embed_layers == {}
    model = GPT(tiny_config(n_layer=6, value_embeds=2))
    assert [hasattr(b.attn, "ve_gate") for b in model.transformer.h] == [True, True, False, False, True, True]
    assert len(model.value_embeds) == 2 and model.value_embeds[0].weight.shape == (50257, 32)


def test_value_embedding_adds_the_gated_table_row_to_the_values(monkeypatch):
    """v(layer) = x W_v + 2 sigmoid(x[:12] W_gate) (per head) * E[token], E the layer's table; checked on the values
    that reach attention, against the same model with a zero table."""
    torch.manual_seed(0)
    model = GPT(tiny_config(**MODERN, n_layer=2, value_embeds=1))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.ve_gate.weight.normal_()
    seen = []
    original = model_module.attend
    monkeypatch.setattr(model_module, "attend", lambda q, k, v, mask: seen.append(v) or original(q, k, v, mask))
    idx = torch.randint(0, 50257, (2, 10))
    with torch.no_grad():
        model(idx)
        table = model.value_embeds[0].weight.clone()
        model.value_embeds[0].weight.zero_()
        model(idx)
    v_with, v_without = seen[0], seen[2]  # layer 0 (its input does not depend on the table)
    x = F.rms_norm(F.rms_norm(model.transformer.wte(idx), (32,)), (32,))  # embedding norm, then the block's norm
    gate = 2 * torch.sigmoid(x[..., :12] @ model.transformer.h[0].attn.ve_gate.weight.T)  # (B, T, n_head)
    expected = (gate[..., None] * table[idx].view(2, 10, 2, 16)).transpose(1, 2)  # (B, n_head, T, head_dim)
    torch.testing.assert_close(v_with - v_without, expected, atol=1e-6, rtol=1e-5)


def test_gates_start_neutral_and_skip_weights_start_at_one():
    model = GPT(tiny_config(n_layer=4, value_embeds=1, unet_skips=True))
    assert model.transformer.h[0].attn.ve_gate.weight.abs().sum() == 0  # 2 * sigmoid(0) = 1
    assert torch.equal(model.skip_weights, torch.ones(2))


@torch.no_grad()
@pytest.mark.parametrize("n_layer", [4, 5])
def test_unet_skips_feed_each_first_half_output_to_its_mirror_block(n_layer):
    torch.manual_seed(1)
    model = GPT(tiny_config(**MODERN, n_layer=n_layer, unet_skips=True))
    model.skip_weights.normal_()
    idx = torch.randint(0, 50257, (2, 12))
    rope = model.transformer.rotary(torch.arange(12))
    b = [lambda x, block=block: block(x, rope) for block in model.transformer.h]
    w = model.skip_weights
    x = F.rms_norm(model.transformer.wte(idx), (32,))
    if n_layer == 4:  # pairs (0, 3) and (1, 2)
        h0 = b[0](x)
        h1 = b[1](h0)
        h2 = b[2](h1 + w[1] * h1)
        out = b[3](h2 + w[0] * h0)
    else:  # pairs (0, 4) and (1, 3); the middle block 2 has none
        h0 = b[0](x)
        h1 = b[1](h0)
        h2 = b[2](h1)
        h3 = b[3](h2 + w[1] * h1)
        out = b[4](h3 + w[0] * h0)
    torch.testing.assert_close(model.hidden(idx), model.transformer.ln_f(out), atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_x0_mix_gives_each_block_its_weighted_input_plus_its_weighted_embedding():
    torch.manual_seed(2)
    model = GPT(tiny_config(**MODERN, n_layer=3, x0_mix=True))
    assert torch.equal(model.resid_lambdas, torch.ones(3))  # starts as the plain residual stream...
    assert torch.equal(model.x0_lambdas, torch.full((3,), 0.1))  # ...with a little of the embedding in each block
    model.resid_lambdas.normal_()
    model.x0_lambdas.normal_()
    idx = torch.randint(0, 50257, (2, 12))
    rope = model.transformer.rotary(torch.arange(12))
    a, b = model.resid_lambdas, model.x0_lambdas
    x0 = x = F.rms_norm(model.transformer.wte(idx), (32,))
    for i, block in enumerate(model.transformer.h):
        x = block(a[i] * x + b[i] * x0, rope)
    torch.testing.assert_close(model.hidden(idx), model.transformer.ln_f(x), atol=1e-6, rtol=1e-5)
    roles = params_by_role(model)
    assert {id(p) for p in roles["gains"]} == {id(model.resid_lambdas), id(model.x0_lambdas)}  # AdamW, no decay


@torch.no_grad()
@pytest.mark.parametrize("doc_mask", [False, True])
def test_smear_adds_the_gated_previous_embedding_within_each_sequence_and_document(doc_mask):
    torch.manual_seed(3)
    model = GPT(tiny_config(**MODERN, n_layer=2, smear=True, doc_mask=doc_mask))
    assert model.smear_lambda.item() == 0 and model.smear_gate.weight.abs().sum() == 0  # closed at init
    model.smear_lambda.fill_(0.7)
    model.smear_gate.weight.normal_()
    idx = torch.randint(0, 50000, (2, 10))
    idx[0, 4] = 50256  # a document starts at token 4 of row 0
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 0, 1, 2, 3, 0, 1, 2]])  # row 1: three sequences
    e = F.rms_norm(model.transformer.wte(idx), (32,))
    expected = e.clone()
    for b in range(2):
        for t in range(1, 10):
            if pos[b, t] == 0 or (doc_mask and idx[b, t] == 50256):
                continue  # no predecessor in its sequence (document)
            gate = torch.sigmoid(e[b, t, :24] @ model.smear_gate.weight[0])
            expected[b, t] += 0.7 * gate * e[b, t - 1]
    torch.testing.assert_close(model.smeared(e, idx, pos), expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(model.smeared(e, idx, torch.arange(10)), model.smeared(e, idx, pos[:1].expand(2, 10)))
    # a packed row as the scorer builds it: a context (0-2), then two continuations of it (3-4 and 5-6), each
    # attending to the context and to itself; each continuation's first token follows the context's last
    mask = torch.zeros(7, 7, dtype=torch.bool)
    for start, end in ((0, 3), (3, 5), (5, 7)):
        mask[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        if start:
            mask[start:end, :3] = True
    packed = model.smeared(e[:1, :7], idx[:1, :7], torch.tensor([[0, 1, 2, 3, 4, 3, 4]]), mask[None, None])
    gate = lambda t: torch.sigmoid(e[0, t, :24] @ model.smear_gate.weight[0])  # noqa: E731
    for t, p in ((0, None), (1, 0), (2, 1), (3, 2), (4, 3), (5, 2), (6, 5)):
        first = p is None or (doc_mask and idx[0, t] == 50256)  # token 4 starts a document
        share = 0 if first else 0.7 * gate(t) * e[0, p]
        torch.testing.assert_close(packed[0, t], e[0, t] + share, atol=1e-6, rtol=1e-5)
    roles = params_by_role(model)
    assert {id(p) for p in roles["gains"]} >= {id(model.smear_lambda), id(model.smear_gate.weight)}


def test_every_new_parameter_has_one_sensible_role_and_muon_takes_only_matrices():
    model = speedrun_model()
    roles = params_by_role(model)
    names = {id(p): name for name, p in model.named_parameters()}
    named = {role: sorted(names[id(p)] for p in params) for role, params in roles.items()}
    flat = [p for params in roles.values() for p in params]
    assert len(flat) == len({id(p) for p in flat}) == len(list(model.parameters()))
    assert named["embeddings"] == ["transformer.wte.weight", "value_embeds.0.weight"]  # lookups: AdamW
    assert named["head"] == ["lm_head.weight"]
    assert named["gains"] == sorted(  # scale a path rather than transform it: AdamW, no weight decay
        [
            "resid_lambdas",
            "skip_weights",
            "smear_gate.weight",
            "smear_lambda",
            "transformer.h.0.attn.ve_gate.weight",
            "transformer.h.3.attn.ve_gate.weight",
            "x0_lambdas",
        ]
    )
    assert all(name.split(".")[-2] in ("c_q", "c_k", "c_v", "c_proj", "c_fc") for name in named["matrices"])
    assert len(named["matrices"]) == 4 * 6
    opt = build_optimizers(model, train_config(recipe="modern"), "cpu")
    muon = opt.optimizers["muon"].param_groups[0]["params"]
    assert {id(p) for p in muon} == {id(p) for p in roles["matrices"]}


def test_flops_count_windowed_attention_and_leave_out_lookups():
    cfg = tiny_config(**MODERN, n_layer=4, block_size=64, window_pattern="S", short_window=16, value_embeds=1)
    with torch.device("meta"):
        model = GPT(cfg)
    lookups = 2 * cfg.padded_vocab_size * 32  # wte (untied) and one value-embedding table
    assert model.num_params(non_embedding=True) == model.num_params() - lookups
    # layers 0-2 see 16 keys, the last one the whole sequence (PaLM: 12 * heads * head_dim * keys per layer)
    assert model.flops_per_token(64) == 6 * (model.num_params() - lookups) + 12 * 2 * 16 * (3 * 16 + 64)
    assert model.flops_per_token(8) == 6 * (model.num_params() - lookups) + 12 * 2 * 16 * (4 * 8)  # windows > T
    with torch.device("meta"):
        full = GPT(tiny_config(**MODERN, n_layer=4, block_size=64))
    assert full.flops_per_token(64) == 6 * full.num_params(non_embedding=True) + 12 * 4 * 2 * 16 * 64


def test_switches_are_recorded_in_checkpoints_and_refused_by_the_gpt2_export(tmp_path):
    model = speedrun_model(seed=4)
    save_checkpoint(tmp_path / "ckpt_000001.pt", model_payload(model, 1))
    loaded, _ = load_model(tmp_path / "ckpt_000001.pt")
    assert loaded.config == model.config
    idx = torch.randint(0, 50257, (2, 20))
    idx[:, 7] = 50256
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    for piece in (
        dict(split_qkv=True),
        dict(doc_mask=True),
        dict(window_pattern="SL"),
        dict(unet_skips=True),
        dict(x0_mix=True),
        dict(smear=True),
    ):
        assert GPTConfig(**piece).gpt2_compatible() == [f"{k}={v!r}" for k, v in piece.items()]
        with pytest.raises(UserError, match="GPT2LMHeadModel cannot hold this architecture"):
            export_hf(GPT(tiny_config(**piece)), tmp_path / "hf")
