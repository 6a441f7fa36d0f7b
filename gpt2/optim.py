"""Optimizers: the model's parameters in named groups by role, each with its own base learning rate and
weight decay, stepped together under one learning-rate schedule.

Roles (every trainable parameter has exactly one; a tied head is the embedding and counted once):

- ``embeddings``: token and position embedding tables;
- ``matrices``: the 2-D weights inside the transformer blocks;
- ``head``: the output projection, when it is not tied to the token embedding;
- ``gains``: biases and normalization gains (1-D).

The GPT-2 recipe is AdamW over all of them at one learning rate, with weight decay on the >= 2-D
tensors only, as in GPT-3 and build-nanogpt. Each group carries ``base_lr``; the schedule multiplies it.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from gpt2.model import GPT

if TYPE_CHECKING:
    from gpt2.config import TrainConfig

ROLES = ("embeddings", "matrices", "head", "gains")


def params_by_role(model: GPT) -> dict[str, list[nn.Parameter]]:
    """Every trainable parameter under its role, in ``model.parameters()`` order within a role."""
    tables = [model.transformer.wte] + ([model.transformer.wpe] if "wpe" in model.transformer else [])
    embeddings = {id(table.weight) for table in tables}
    head = model.lm_head.weight
    roles: dict[str, list[nn.Parameter]] = {role: [] for role in ROLES}
    for p in model.parameters():  # a tied weight is listed once
        if not p.requires_grad:
            continue
        if id(p) in embeddings:
            roles["embeddings"].append(p)
        elif p is head:
            roles["head"].append(p)
        elif p.dim() >= 2:
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

    ``state_dict()`` is ``{name: optimizer.state_dict()}``; ``load_state_dict`` also reads the v0.1
    checkpoints' single AdamW state, whose two groups (decay / no decay) held the same parameters in the
    same order as today's role groups.
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
        if "param_groups" in state and len(self.optimizers) == 1:  # v0.1: one AdamW's state, unnamed
            state = {next(iter(self.optimizers)): state}
        if state.keys() != self.optimizers.keys():
            raise ValueError(f"checkpoint holds optimizers {sorted(state)}, this run uses {sorted(self.optimizers)}")
        with self.own_settings():
            for name, opt in self.optimizers.items():
                opt.load_state_dict(_regrouped(state[name], opt))

    @contextlib.contextmanager
    def own_settings(self) -> Iterator[None]:
        """Whatever state is loaded inside, each group keeps this run's base learning rate and weight decay."""
        own = [{k: v for k, v in g.items() if k in ("base_lr", "weight_decay")} for g in self.param_groups]
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
        raise ValueError("the checkpoint's optimizer state covers a different number of parameters")
    settings = {k: v for k, v in saved["param_groups"][0].items() if k != "params"}
    groups, start = [], 0
    for size, group in zip(sizes, opt.param_groups):
        groups.append({**settings, **{k: group[k] for k in ("name", "base_lr") if k in group},
                       "params": list(range(start, start + size))})  # fmt: skip
        start += size
    return {"state": saved["state"], "param_groups": groups}


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` that also takes FSDP2's sharded matrices, giving the same update as on whole ones.

    Muon orthogonalises each matrix's update with Newton-Schulz iterations, which need the whole matrix. On a
    ``DTensor`` row shard, torch's Muon (2.13) computes the global iteration through DTensor's sharding
    propagation, but for a tall matrix (c_attn, c_fc: it transposes them) the Gram products become partial sums
    of bf16 matmuls reduced across ranks, 11 all-reduces per step and matrix, and the result differs from the
    unsharded one (by up to 0.013 in a 128 x 32 matrix's orthogonalised update, on 2 ranks). Here the momentum
    stays sharded (its update is elementwise), the Nesterov update is all-gathered once per matrix, every rank
    orthogonalises it with torch's own routine exactly as one process would, and keeps its rows: bit for bit
    the unsharded update (``tests/test_parallel.py``). Plain tensors go through torch's step unchanged.
    """

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: ANN401 - the Optimizer.step signature
        if not any(isinstance(p, DTensor) for group in self.param_groups for p in group["params"]):
            return super().step(closure)
        if closure is not None:
            raise ValueError("Muon on sharded parameters takes no closure")
        for group in self.param_groups:
            lr, weight_decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                grad, buf = p.grad.to_local(), state["momentum_buffer"].to_local()
                # The same operations as torch.optim._muon._single_tensor_muon, on this rank's rows.
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                whole = DTensor.from_local(update, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                ortho = _zeropower_via_newtonschulz(
                    whole.full_tensor(), group["ns_coefficients"], group["ns_steps"], group["eps"]
                )
                rows = distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None).to_local()
                local = p.to_local()
                local.mul_(1 - lr * weight_decay)
                local.add_(rows, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return None


def build_optimizers(model: GPT, cfg: TrainConfig, device_type: str) -> Optimizers:
    """The optimizers of the run ``cfg`` describes, every group with its recipe's base learning rate.

    ``adamw`` (the GPT-2 recipe): one AdamW over all roles, weight decay on all but the gains; with GPT-2's
    defaults every group runs at ``--lr``. ``muon``: ``torch.optim.Muon`` (momentum 0.95, Nesterov, 5
    Newton-Schulz steps) orthogonalises the update of each hidden matrix; AdamW takes the embeddings, the head
    and the gains, which are not matrices acting on the residual stream. Both see the all-reduced gradient:
    DDP averages it during backward, before any step (FSDP reduce-scatters it: each rank sees its shard).
    """
    adam_specs = {
        "embeddings": GroupSpec(cfg.embed_lr, cfg.weight_decay),
        "head": GroupSpec(cfg.head_lr, cfg.weight_decay),
        "gains": GroupSpec(cfg.gains_lr, 0.0),
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
        optimizers["muon"] = Muon([group], momentum=0.95, nesterov=True)
    return Optimizers(optimizers)
