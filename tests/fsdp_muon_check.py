"""Run by tests/test_parallel.py under torchrun (2 gloo ranks): ``gpt2.muon.Muon`` on FSDP2-sharded matrices
against ``torch.optim.Muon`` on whole copies, both fed the same gradients for a few steps. Prints one JSON line
per rank: after each step, the largest difference of the weights and of the momentum buffers, and how far the
weights have moved from where they started (so that equality is not that of weights that never moved)."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

from gpt2.muon import Muon


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    # Tall, wide and square matrices, with a row count that 2 ranks split unevenly (FSDP pads it).
    shapes = [(96, 32), (32, 128), (48, 48), (33, 16)]
    whole = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(*s) * 0.02) for s in shapes)
    sharded = torch.nn.ParameterList(torch.nn.Parameter(p.detach().clone()) for p in whole)
    fully_shard(sharded, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    settings = dict(lr=0.02, weight_decay=0.01, momentum=0.95, nesterov=True)
    reference, ours = torch.optim.Muon(list(whole), **settings), Muon(list(sharded), **settings)
    start = [p.detach().clone() for p in whole]
    steps = []
    for _ in range(3):
        for p, q in zip(whole, sharded):
            grad = torch.randn_like(p)  # the same on every rank: the same seed, the same draws
            p.grad = grad
            q.grad = distribute_tensor(grad, q.device_mesh, q.placements)
        reference.step()
        ours.step()
        steps.append(
            {
                "weights": max((p - q.full_tensor()).abs().max().item() for p, q in zip(whole, sharded)),
                "momentum": max(
                    (reference.state[p]["momentum_buffer"] - ours.state[q]["momentum_buffer"].full_tensor())
                    .abs()
                    .max()
                    .item()
                    for p, q in zip(whole, sharded)
                ),
                "moved": max((p - p0).abs().max().item() for p, p0 in zip(whole, start)),
            }
        )
    # One process prints every rank's result: two ranks writing to one pipe can interleave within a line.
    results: list = [None] * dist.get_world_size()
    dist.all_gather_object(results, {"rank": dist.get_rank(), "steps": steps})
    if dist.get_rank() == 0:
        print(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
