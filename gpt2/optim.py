"""Optimizers: the model's parameters in named groups by role, each with its own base learning rate and
weight decay, stepped together under one learning-rate schedule.

Roles (every trainable parameter has exactly one; a tied head is the embedding and counted once):

- ``embeddings``: lookup tables: token, position and value embeddings;
- ``matrices``: the 2-D weights inside the transformer blocks that act on the residual stream (q, k, v, the
  projections, the MLP);
- ``head``: the output projection, when it is not tied to the token embedding;
- ``gains``: biases, normalization gains and the other few scalars and gates that scale a path rather than
  transform it (U-net skip weights; the x0-mix weights; the smear's weight and gate; the value-embedding gates,
  2-D but tiny: n_head x 12).

The GPT-2 recipe is AdamW over all of them at one learning rate, with weight decay on the >= 2-D
tensors only, as in GPT-3 and build-nanogpt. Each group carries ``base_lr``; the schedule multiplies it.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from gpt2.errors import UserError
from gpt2.model import GPT
from gpt2.muon import Muon

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
        """Restore the optimizers' state; the settings of their groups stay this run's own (``own_settings``)."""
        if state.keys() != self.optimizers.keys():
            raise UserError(f"checkpoint holds optimizers {sorted(state)}, this run uses {sorted(self.optimizers)}")
        with self.own_settings():
            for name, opt in self.optimizers.items():
                opt.load_state_dict(_regrouped(state[name], opt))

    @contextlib.contextmanager
    def own_settings(self) -> Iterator[None]:
        """Whatever state is loaded inside, each group keeps this run's settings (base learning rate, weight decay,
        betas, Muon's options, ...): a resumed run takes its optimizer's state from the checkpoint and its
        hyperparameters from its own configuration, as it takes ``--lr``."""
        own = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        yield
        for group, settings in zip(self.param_groups, own):
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


def build_optimizers(model: GPT, cfg: TrainConfig, device_type: str) -> Optimizers:
    """The optimizers of the run ``cfg`` describes, every group with its recipe's base learning rate.

    ``adamw`` (the GPT-2 recipe): one AdamW over all roles, weight decay on all but the gains; with GPT-2's
    defaults every group runs at ``--lr``. ``muon``: ``torch.optim.Muon`` (momentum 0.95, Nesterov, 5
    Newton-Schulz steps) orthogonalises the update of each hidden matrix (q, k and v one by one where the model
    splits them); AdamW takes the embeddings, the head and the gains, which are not matrices acting on the
    residual stream, refined where the run asks for it (Polar Express, NorMuon). ``--lr-width`` scales the
    embeddings' and the head's rates to the model's width. Both see the all-reduced gradient:
    DDP averages it during backward, before any step (FSDP reduce-scatters it: each rank sees its shard).
    """
    rate = lambda lr: cfg.lr if lr is None else lr  # noqa: E731 - a group without its own rate takes --lr
    # nanochat's rule for rates tuned at one width: Adam moves every weight by about lr, so a logit (a sum over the
    # width) moves by about lr * sqrt(width) where the updates' signs are random; scaled by 1/sqrt(width) it moves
    # alike at every width (muP, which assumes aligned updates, scales the head by 1/width).
    width_scale = math.sqrt(cfg.lr_width / model.config.n_embd) if cfg.lr_width else 1.0
    adam_specs = {
        "embeddings": GroupSpec(rate(cfg.embed_lr) * width_scale, cfg.weight_decay),
        "head": GroupSpec(rate(cfg.head_lr) * width_scale, cfg.weight_decay),
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
        optimizers["muon"] = Muon([group], momentum=0.95, nesterov=True, ns_steps=cfg.muon_ns_steps,
                                  polar_express=cfg.muon_polar_express, beta2=cfg.normuon_beta2)  # fmt: skip
    return Optimizers(optimizers)
