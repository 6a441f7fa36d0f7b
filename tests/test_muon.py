"""Muon (``gpt2/muon.py``): on q, k and v as separate matrices (the split layout computes what the fused one computes,
and a step equals Newton-Schulz on each third, written out here; the fused layout of the v1 recipes stays one matrix
with its rate scaled by sqrt(3)); its own step with both refinements off is torch.optim.Muon's bit for bit; Polar
Express and NorMuon's neuron-wise normalisation equal their formulas written out here; the options reach
build_optimizers, and the optimizer state resumes exactly. (On FSDP's shards: tests/test_parallel.py.)"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from support import tiny_config

from gpt2.config import MODERN_BLOCK, train_config
from gpt2.model import GPT
from gpt2.muon import POLAR_EXPRESS, Muon, normuon_scale, polar_express
from gpt2.optim import build_optimizers, params_by_role

MODERN = dict(rope_theta=10000.0, norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=False, bias=False)
LR = 0.02


def fused_and_split(seed: int = 0) -> tuple[GPT, GPT]:
    """The same weights in both layouts: c_q, c_k, c_v are the thirds of c_attn."""
    torch.manual_seed(seed)
    fused = GPT(tiny_config(**MODERN))
    split = GPT(tiny_config(**MODERN, split_qkv=True))
    state = {}
    for name, tensor in fused.state_dict().items():
        if name.endswith("attn.c_attn.weight"):
            for part, third in zip("qkv", tensor.chunk(3)):
                state[name.replace("c_attn", f"c_{part}")] = third
        else:
            state[name] = tensor
    split.load_state_dict(state)
    return fused, split


def muon_config(**overrides) -> SimpleNamespace:
    """The fields of a run's configuration that ``build_optimizers`` reads (Muon for the matrices, nothing else
    moving: the other groups get a zero learning rate)."""
    return SimpleNamespace(**{"optimizer": "muon", "lr": LR, "embed_lr": 0.0, "head_lr": 0.0, "gains_lr": 0.0,
                              "lr_width": 0, "weight_decay": 0.0, "beta1": 0.8, "beta2": 0.95, "eps": 1e-10,
                              "muon_ns_steps": 5, "muon_polar_express": False, "normuon_beta2": 0.0,
                              **overrides})  # fmt: skip


def newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's quintic Newton-Schulz iteration in bf16: X <- aX + (bA + cA^2)X with A = XX^T, on the wide
    orientation, after scaling to unit Frobenius norm. Each polynomial is one addmm, as torch.optim.Muon rounds it
    (a bf16 iteration that rounds b*A and c*A^2 separately drifts from it by ~10% in five steps)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16()
    tall = X.size(0) > X.size(1)
    X = X.T if tall else X
    X = X / X.norm().clamp(min=1e-7)
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # bA + cA^2
        X = torch.addmm(X, B, X, beta=a)  # aX + BX
    return X.T if tall else X


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50257, (2, 16), generator=g) for _ in range(n)]


def test_split_layout_computes_what_the_fused_one_computes():
    fused, split = fused_and_split()
    x = batches(1)[0]
    torch.testing.assert_close(split(x)[0], fused(x)[0], atol=1e-6, rtol=1e-5)
    fused(x, x)[1].backward()
    split(x, x)[1].backward()
    for f, s in zip(fused.transformer.h, split.transformer.h):
        grads = torch.cat([s.attn.c_q.weight.grad, s.attn.c_k.weight.grad, s.attn.c_v.weight.grad])
        torch.testing.assert_close(grads, f.attn.c_attn.weight.grad, atol=1e-6, rtol=1e-4)
    roles = params_by_role(split)
    names = {id(p): n for n, p in split.named_parameters()}
    assert sorted(names[id(p)].split(".")[-2] for p in roles["matrices"]) == sorted(
        ["c_q", "c_k", "c_v", "c_proj", "c_fc", "c_proj"] * 2
    )


def qkv(block) -> torch.Tensor:
    attn = block.attn
    return torch.cat([attn.c_q.weight, attn.c_k.weight, attn.c_v.weight]) if attn.split_qkv else attn.c_attn.weight


@pytest.mark.parametrize("layout", ["split", "fused"])
def test_muon_orthogonalises_each_of_q_k_v_in_the_split_layout_only(layout):
    """Two Muon steps (momentum included): on the split model, q/k/v move by the reference applied to each third of
    their stacked gradient; on the fused model they do not (one orthogonalisation of the 3C x C matrix, lr x
    sqrt(3))."""
    fused, split = fused_and_split()
    model = split if layout == "split" else fused
    opt = build_optimizers(model, muon_config(), "cpu")
    C = model.config.n_embd
    reference = [qkv(block).detach().clone() for block in model.transformer.h]
    buffers = [torch.zeros_like(w) for w in reference]
    for x in batches(2):
        opt.zero_grad()
        model(x, x)[1].backward()
        for i, block in enumerate(model.transformer.h):
            attn = block.attn
            g = torch.cat([attn.c_q.weight.grad, attn.c_k.weight.grad, attn.c_v.weight.grad]) if layout == "split" \
                else attn.c_attn.weight.grad  # fmt: skip
            buffers[i].lerp_(g, 1 - 0.95)  # momentum 0.95, Nesterov (torch.optim.Muon's form)
            update = g.lerp(buffers[i], 0.95)
            ortho = torch.cat([newton_schulz(third) for third in update.split(C)]).float()
            reference[i] = reference[i] - LR * math.sqrt(max(1, C / C)) * ortho  # square thirds: no lr scaling
        opt.step()
    for block, expected in zip(model.transformer.h, reference):
        got = qkv(block).detach()
        close = torch.allclose(got, expected, atol=LR * 1e-4, rtol=0)
        assert close is (layout == "split"), (got - expected).abs().max()


def matrices(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g) * 0.1) for shape in [(32, 32), (96, 32), (32, 128)]]


def run(opt_class, params, steps: int = 3, **kw) -> list[torch.Tensor]:
    opt = opt_class([{"params": params, "lr": 0.02, "weight_decay": 0.1}], momentum=0.95, nesterov=True, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


class OwnStep(Muon):
    """Our Muon taking its own step (the path of sharded matrices and of the refinements) even where neither
    applies, where ``Muon.step`` hands over to ``torch.optim.Muon.step``."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        for group in self.param_groups:
            for p in group["params"]:
                self._update(p, group)


def test_with_both_refinements_off_its_own_step_is_torch_muon_bit_for_bit():
    for kw in ({}, {"ns_steps": 3}):
        assert all(
            torch.equal(a, b) for a, b in zip(run(OwnStep, matrices(), **kw), run(torch.optim.Muon, matrices(), **kw))
        )


@pytest.mark.parametrize("shape", [(32, 32), (96, 32), (32, 128)])
def test_polar_express_is_the_polynomial_composition_and_nearly_orthogonal(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    # float64, each step's odd polynomial p(x) = a x + b x^3 + c x^5 applied to the singular values
    X = G.double() / (G.double().norm() * 1.01 + 1e-6)
    for a, b, c in POLAR_EXPRESS:
        XXt = X @ X.T
        X = a * X + b * XXt @ X + c * XXt @ XXt @ X
    got = polar_express(G).double()
    assert (got - X).abs().max() < 0.05 * X.abs().max()  # bf16
    singular = torch.linalg.svdvals(got)
    assert singular.min() > 0.6 and singular.max() < 1.2, singular  # near the polar factor's all-ones


@pytest.mark.parametrize("shape", [(6, 4), (4, 6)])
def test_normuon_divides_each_neuron_by_its_rms_ema_and_keeps_the_norm(shape):
    g = torch.Generator().manual_seed(3)
    updates = [torch.randn(shape, generator=g) for _ in range(2)]
    neurons = 0 if shape[0] >= shape[1] else 1  # rows of a tall matrix, columns of a wide one
    state = torch.zeros((shape[0], 1) if neurons == 0 else (1, shape[1]))
    ema = [0.0] * shape[neurons]
    for update in updates:
        got = normuon_scale(update, state, beta2=0.9)
        expected = update.clone()
        for i in range(shape[neurons]):
            vector = update[i] if neurons == 0 else update[:, i]
            ema[i] = 0.9 * ema[i] + 0.1 * vector.square().mean().item()
            if neurons == 0:
                expected[i] = vector / ema[i] ** 0.5
            else:
                expected[:, i] = vector / ema[i] ** 0.5
        expected *= update.norm() / expected.norm()
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "options",
    [{}, dict(muon_polar_express=True), dict(normuon_beta2=0.95), dict(muon_polar_express=True, normuon_beta2=0.95)],
)
def test_options_reach_build_optimizers_and_the_state_resumes_exactly(options):
    torch.manual_seed(0)
    model = GPT(tiny_config(**MODERN_BLOCK, split_qkv=True))
    opt = build_optimizers(model, train_config(recipe="modern-v1", **options), "cpu")
    group = opt.optimizers["muon"].param_groups[0]
    assert (group["polar_express"], group["beta2"]) == (
        options.get("muon_polar_express", False), options.get("normuon_beta2", 0.0))  # fmt: skip
    batches = [torch.randint(0, 50257, (2, 16)) for _ in range(4)]

    def step(m, o, x):
        o.zero_grad()
        m(x, x)[1].backward()
        o.step()

    for x in batches[:2]:
        step(model, opt, x)
    resumed = copy.deepcopy(model)
    resumed_opt = build_optimizers(resumed, train_config(recipe="modern-v1", **options), "cpu")
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for x in batches[2:]:
        step(model, opt, x)
        step(resumed, resumed_opt, x)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
