"""Optimizers: the model's parameters in named groups by role, each with its own base learning rate and
weight decay, stepped together under one learning-rate schedule.

Roles (every trainable parameter has exactly one; a tied head is the embedding and counted once):

- ``embeddings``: lookup tables: token, position and value embeddings;
- ``matrices``: the 2-D weights inside the transformer blocks that act on the residual stream (q, k, v, the
  projections, the MLP);
- ``head``: the output projection, when it is not tied to the token embedding;
- ``gains``: biases, normalization gains and the other few scalars and gates that scale a path rather than
  transform it (U-net skip weights; the value-embedding gates, 2-D but tiny: n_head x 12).

The GPT-2 recipe is AdamW over all of them at one learning rate, with weight decay on the >= 2-D
tensors only, as in GPT-3 and build-nanogpt. Each group carries ``base_lr``; the schedule multiplies it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from gpt2.errors import UserError
from gpt2.model import GPT

if TYPE_CHECKING:
    from gpt2.config import TrainConfig

ROLES = ("embeddings", "matrices", "head", "gains")


def params_by_role(model: GPT) -> dict[str, list[nn.Parameter]]:
    """Every trainable parameter under its role, in ``model.parameters()`` order within a role."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    gates = {id(m.weight) for m in model.modules() if getattr(m, "gate", False)}
    head = model.lm_head.weight
    roles: dict[str, list[nn.Parameter]] = {role: [] for role in ROLES}
    for p in model.parameters():  # a tied weight is listed once
        if not p.requires_grad:
            continue
        if id(p) in embeddings:
            roles["embeddings"].append(p)
        elif p is head:
            roles["head"].append(p)
        elif p.dim() >= 2 and id(p) not in gates:
            roles["matrices"].append(p)
        else:
            roles["gains"].append(p)
    return roles


@dataclass(frozen=True)
class GroupSpec:
    """How one role is optimized: its base learning rate and weight decay."""

    lr: float
    weight_decay: float


def adamw(
    model: GPT,
    specs: dict[str, GroupSpec],
    *,
    betas: tuple[float, float],
    eps: float,
    device_type: str,
) -> torch.optim.AdamW:
    """AdamW over the roles named in ``specs`` (in ``ROLES`` order; empty roles are left out), one named
    parameter group per role carrying its ``base_lr``."""
    roles = params_by_role(model)
    groups = [
        {"name": role, "params": roles[role], "base_lr": specs[role].lr, "lr": specs[role].lr,
         "weight_decay": specs[role].weight_decay}
        for role in ROLES
        if role in specs and roles[role]
    ]  # fmt: skip
    fused = device_type in ("cuda", "cpu", "mps") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=fused)


class Optimizers:
    """Named torch optimizers stepped as one, with one learning-rate multiplier for all their groups.

    ``state_dict()`` is ``{name: optimizer.state_dict()}``. ``load_state_dict`` also takes a state whose groups
    split the same parameters, in the same order, at other boundaries (v0.1's AdamW had two: decay, no decay).
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def set_lr_multiplier(self, multiplier: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * multiplier

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the optimizers' state; the base learning rates and weight decays stay this run's own
        (the command line may change them on resume, as it may change ``--lr``)."""
        if state.keys() != self.optimizers.keys():
            raise UserError(f"checkpoint holds optimizers {sorted(state)}, this run uses {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            own = [{k: v for k, v in g.items() if k in ("base_lr", "weight_decay")} for g in opt.param_groups]
            opt.load_state_dict(_regrouped(state[name], opt))
            for group, settings in zip(opt.param_groups, own):
                group.update(settings)


def _regrouped(saved: dict[str, Any], opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``saved`` with its parameters split into ``opt``'s groups when only the grouping differs.

    Optimizer state is keyed by a parameter's index in the concatenation of the groups, so a state saved
    with other group boundaries but the same parameter order is the same state under new boundaries.
    """
    sizes = [len(g["params"]) for g in opt.param_groups]
    if [len(g["params"]) for g in saved["param_groups"]] == sizes:
        return saved
    if sum(len(g["params"]) for g in saved["param_groups"]) != sum(sizes):
        raise UserError("the checkpoint's optimizer state covers a different number of parameters")
    settings = {k: v for k, v in saved["param_groups"][0].items() if k != "params"}
    groups, start = [], 0
    for size, group in zip(sizes, opt.param_groups):
        groups.append({**settings, **{k: group[k] for k in ("name", "base_lr") if k in group},
                       "params": list(range(start, start + size))})  # fmt: skip
        start += size
    return {"state": saved["state"], "param_groups": groups}


# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932): a different (a, b, c) at each of five
# iterations, computed for safety factor 2e-2 and cushion 2; the coefficients modded-nanogpt and nanochat use.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def polar_express(
    G: torch.Tensor, coefficients: tuple[tuple[float, float, float], ...] = POLAR_EXPRESS
) -> torch.Tensor:
    """The orthogonal polar factor of ``G`` by Polar Express, in bf16: scaled just below unit Frobenius norm, then
    X <- aX + (bA + cA^2)X with A = XX^T for each step's (a, b, c), on the wide orientation."""
    X = G.bfloat16()
    tall = X.size(0) > X.size(1)
    X = X.T if tall else X
    X = X / (X.norm() * 1.01 + 1e-6)
    for a, b, c in coefficients:
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # bA + cA^2
        X = torch.addmm(X, B, X, beta=a)  # aX + BX
    return X.T if tall else X


def normuon_scale(update: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon (arXiv:2510.05491, as modded-nanogpt and nanochat apply it): each neuron's (row's, or for a wide
    matrix column's) share of an orthogonalised update is divided by the root of an EMA of its mean square, then
    the whole update is rescaled to its former Frobenius norm, so only the balance between neurons changes.
    ``second_moment`` (rows x 1, or 1 x columns) is updated in place."""
    dim = -1 if update.size(-2) >= update.size(-1) else -2
    mean_square = update.float().square().mean(dim=dim, keepdim=True)
    second_moment.lerp_(mean_square, 1 - beta2)
    scaled = update.float() * second_moment.clamp_min(1e-10).rsqrt()
    return scaled * (update.float().norm() / scaled.norm().clamp_min(1e-10))


class NorMuon(torch.optim.Muon):
    """``torch.optim.Muon`` with two refinements of the speedrun, each optional: Polar Express coefficients for the
    orthogonalisation (``polar_express``) and NorMuon's neuron-wise normalisation (``beta2`` > 0).

    Written here because no maintained package provides them in a form that takes these parameter groups:
    torch.optim.Muon takes one fixed (a, b, c) and has no normalisation; heavyball 3.2.1 has no NorMuon and offers
    Polar Express only as a module-wide switch, for square matrices only, inside its own optimizer framework. With
    both off, a step is torch.optim.Muon's exactly (same momentum, Newton-Schulz, learning-rate adjustment and
    weight decay, and the same ``momentum_buffer`` state).
    """

    def __init__(self, params: Any, *, polar_express: bool = False, beta2: float = 0.0, **muon: Any) -> None:
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"NorMuon's beta2 must be in [0, 1), got {beta2}")
        super().__init__(params, **muon)
        for group in self.param_groups:
            group.setdefault("polar_express", polar_express)
            group.setdefault("beta2", beta2)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                if group["polar_express"]:
                    update = polar_express(update)
                else:
                    update = _zeropower_via_newtonschulz(
                        update, group["ns_coefficients"], group["ns_steps"], group["eps"]
                    )
                if group["beta2"]:
                    if "second_moment" not in state:
                        rows, cols = p.shape
                        shape = (rows, 1) if rows >= cols else (1, cols)
                        state["second_moment"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                    update = normuon_scale(update, state["second_moment"], group["beta2"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def muon(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """torch.optim.Muon (momentum 0.95, Nesterov, ``--muon-ns-steps``) over ``groups``; ``NorMuon`` where a
    refinement is asked for (``--muon-polar-express``, ``--normuon-beta2``)."""
    kwargs = dict(momentum=0.95, nesterov=True, ns_steps=cfg.muon_ns_steps)
    if cfg.muon_polar_express or cfg.normuon_beta2:
        return NorMuon(groups, polar_express=cfg.muon_polar_express, beta2=cfg.normuon_beta2, **kwargs)
    return torch.optim.Muon(groups, **kwargs)


def build_optimizers(model: GPT, cfg: TrainConfig, device_type: str) -> Optimizers:
    """The optimizers of the run ``cfg`` describes, every group with its recipe's base learning rate.

    ``adamw`` (the GPT-2 recipe): one AdamW over all roles, weight decay on all but the gains; with GPT-2's
    defaults every group runs at ``--lr``. ``muon``: ``torch.optim.Muon`` (momentum 0.95, Nesterov, 5
    Newton-Schulz steps) orthogonalises the update of each hidden matrix (q, k and v one by one where the model
    splits them); AdamW takes the embeddings, the head and the gains, which are not matrices acting on the
    residual stream, refined where the run asks for it (Polar Express, NorMuon). Both see the all-reduced gradient:
    DDP averages it during backward, before any step.
    """
    rate = lambda lr: cfg.lr if lr is None else lr  # noqa: E731 - a group without its own rate takes --lr
    adam_specs = {
        "embeddings": GroupSpec(rate(cfg.embed_lr), cfg.weight_decay),
        "head": GroupSpec(rate(cfg.head_lr), cfg.weight_decay),
        "gains": GroupSpec(rate(cfg.gains_lr), 0.0),
    }
    if cfg.optimizer == "adamw":
        adam_specs["matrices"] = GroupSpec(cfg.lr, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    optimizers: dict[str, torch.optim.Optimizer] = {
        "adamw": adamw(model, adam_specs, betas=betas, eps=cfg.eps, device_type=device_type)
    }
    if cfg.optimizer == "muon":
        matrices = params_by_role(model)["matrices"]
        group = {"name": "matrices", "params": matrices, "base_lr": cfg.lr, "lr": cfg.lr,
                 "weight_decay": cfg.weight_decay}  # fmt: skip
        optimizers["muon"] = muon([group], cfg)
    return Optimizers(optimizers)
