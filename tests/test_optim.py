"""Optimization: parameters grouped by role, each group at its own base rate under one schedule (cosine, or
warmup-stable-decay), Muon for the hidden matrices and AdamW for the rest."""

from __future__ import annotations

import math

import pytest
import torch
from support import lr_at, tiny, tiny_model

from gpt2.config import train_config
from gpt2.model import GPT
from gpt2.optim import GroupSpec, Optimizers, adamw, build_optimizers, params_by_role
from gpt2.schedule import lr_multiplier


def test_lr_schedule_warms_up_linearly_then_follows_the_cosine_to_min_lr():
    kw = dict(lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=110)
    assert lr_at(0, **kw) == pytest.approx(6e-5)  # never zero on the first step
    assert [lr_at(s, **kw) for s in range(10)] == pytest.approx([6e-4 * (s + 1) / 10 for s in range(10)])
    assert lr_at(10, **kw) == pytest.approx(6e-4)
    assert lr_at(60, **kw) == pytest.approx((6e-4 + 6e-5) / 2)  # halfway through the cosine
    assert lr_at(35, **kw) == pytest.approx(6e-5 + (6e-4 - 6e-5) * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(110, **kw) == lr_at(5000, **kw) == pytest.approx(6e-5)
    decay = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


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


@pytest.mark.parametrize(
    "recipe, adamw_groups",
    [
        ("modern-v1", [("embeddings", 0.3), ("head", 0.006)]),
        # the value-embedding tables are embeddings; their gates and the x0 mix's weights are gains, at --lr (Muon's)
        ("modern", [("embeddings", 0.3), ("head", 0.006), ("gains", 0.02)]),
    ],
)
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(synthetic, tmp_path, recipe, adamw_groups):
    cfg = tiny(synthetic, tmp_path, recipe=recipe, n_layer=4)
    model = GPT(cfg.model_config())
    opt = build_optimizers(model, cfg, "cpu")
    muon, adam = opt.optimizers["muon"], opt.optimizers["adamw"]
    assert isinstance(muon, torch.optim.Muon)
    assert all(p.dim() == 2 and p.shape[0] < 1000 for g in muon.param_groups for p in g["params"])
    assert [(g["name"], g["base_lr"]) for g in adam.param_groups] == adamw_groups
    n = sum(p.numel() for o in (muon, adam) for g in o.param_groups for p in g["params"])
    assert n == model.num_params()


@pytest.mark.parametrize("lr_width, scale", [(0, 1.0), (64, 1.0), (256, 2.0), (16, 0.5)])
def test_lr_width_scales_the_embedding_and_head_rates_by_the_root_of_the_width_ratio(synthetic, tmp_path, lr_width,
                                                                                    scale):  # fmt: skip
    cfg = tiny(synthetic, tmp_path, recipe="modern", n_layer=4, n_embd=64, lr_width=lr_width)  # 0: none at any width
    opt = build_optimizers(GPT(cfg.model_config()), cfg, "cpu")
    rates = {g["name"]: g["base_lr"] for g in opt.param_groups}
    assert rates == pytest.approx({"embeddings": 0.3 * scale, "head": 0.006 * scale, "gains": 0.02,
                                   "matrices": 0.02})  # fmt: skip


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
