"""Muon for the hidden matrices: ``torch.optim.Muon``, plus what it lacks here.

- **Sharded matrices (FSDP2).** Muon orthogonalises each matrix's update, which needs the whole matrix. On a
  ``DTensor`` row shard, torch's Muon (2.13) runs the global iteration through DTensor's sharding propagation, but
  for a tall matrix (c_attn, c_fc: it transposes them) the Gram products become partial sums of bf16 matmuls
  reduced across ranks, 11 all-reduces per step and matrix, and the result differs from the unsharded one (by up
  to 0.013 in a 128 x 32 matrix's orthogonalised update, on 2 ranks). Here the momentum stays sharded (its update
  is elementwise), the update is all-gathered once per matrix, every rank orthogonalises it exactly as one process
  would, and keeps its rows: bit for bit the unsharded update.
- **The speedrun's refinements**, each optional: Polar Express coefficients for the orthogonalisation
  (``polar_express``) and NorMuon's neuron-wise normalisation (``beta2`` > 0). Written here because no maintained
  package provides them for these parameter groups: torch.optim.Muon takes one fixed (a, b, c) and has no
  normalisation; heavyball 3.2.1 has no NorMuon and offers Polar Express only as a module-wide switch, for square
  matrices only, inside its own optimizer framework.

With whole matrices and no refinement, a step is ``torch.optim.Muon.step`` itself. Otherwise the same operations
(momentum, Nesterov, Newton-Schulz through torch's own routine, learning-rate adjustment, weight decay, the same
``momentum_buffer`` state) run here, on each rank's rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

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


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` (see the module docstring) taking FSDP2's sharded matrices, with Polar Express
    (``polar_express``) and NorMuon (``beta2`` > 0) as options."""

    def __init__(self, params: Any, *, polar_express: bool = False, beta2: float = 0.0, **muon: Any) -> None:
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"NorMuon's beta2 must be in [0, 1), got {beta2}")
        super().__init__(params, **muon)
        for group in self.param_groups:
            group.setdefault("polar_express", polar_express)
            group.setdefault("beta2", beta2)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: ANN401 - the Optimizer.step signature
        plain = not any(g["polar_express"] or g["beta2"] for g in self.param_groups) and not any(
            isinstance(p, DTensor) for g in self.param_groups for p in g["params"]
        )
        if plain:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """One matrix's step, on this rank's rows of it (all of it, unless it is sharded)."""
        state, lr, momentum = self.state[p], group["lr"], group["momentum"]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        sharded = isinstance(p, DTensor)
        local = (lambda t: t.to_local()) if sharded else (lambda t: t)  # noqa: E731
        grad, buf = local(p.grad), local(state["momentum_buffer"])
        buf.lerp_(grad, 1 - momentum)  # the same operations as torch.optim._muon._single_tensor_muon
        update = grad.lerp(buf, momentum) if group["nesterov"] else buf
        if sharded:  # the whole matrix, once
            update = DTensor.from_local(update, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            update = update.full_tensor()
        if group["polar_express"]:
            ortho = polar_express(update)
        else:
            ortho = _zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
        if group["beta2"]:
            if "second_moment" not in state:  # whole on every rank: a vector per matrix
                rows, cols = p.shape
                shape = (rows, 1) if rows >= cols else (1, cols)
                state["second_moment"] = torch.zeros(shape, dtype=torch.float32, device=ortho.device)
            ortho = normuon_scale(ortho, state["second_moment"], group["beta2"])
        if sharded:  # this rank's rows
            ortho = distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None).to_local()
        weights = local(p)
        weights.mul_(1 - lr * group["weight_decay"])
        weights.add_(ortho.to(weights.dtype), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
