"""Muon (``gpt2/muon.py``): its own step with both refinements off is torch.optim.Muon's bit for bit; Polar Express
and NorMuon's neuron-wise normalisation equal their formulas written out here; the options reach build_optimizers,
and the optimizer state resumes exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from support import tiny_config

from gpt2.config import MODERN_BLOCK, train_config
from gpt2.model import GPT
from gpt2.muon import POLAR_EXPRESS, Muon, normuon_scale, polar_express
from gpt2.optim import build_optimizers


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
    [{}, dict(muon_polar_express=True), dict(normuon_beta2=0.95)],
)
def test_options_reach_build_optimizers_and_the_state_resumes_exactly(options):
    torch.manual_seed(0)
    model = GPT(tiny_config(**MODERN_BLOCK, split_qkv=True))
    opt = build_optimizers(model, train_config(recipe="modern", **options), "cpu")
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
    resumed_opt = build_optimizers(resumed, train_config(recipe="modern", **options), "cpu")
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for x in batches[2:]:
        step(model, opt, x)
        step(resumed, resumed_opt, x)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
