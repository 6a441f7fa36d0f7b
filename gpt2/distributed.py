"""Devices, process groups and mixed precision: what the trainer and the evaluator share.

Under ``torchrun`` (RANK/LOCAL_RANK/WORLD_SIZE set) a process group is started: NCCL on CUDA with one
GPU per local rank, gloo on CPU, so the whole DDP path also runs on a laptop. Without torchrun the
program is one process and no process group exists.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from gpt2.errors import UserError

T = TypeVar("T")
DEVICES = ("auto", "cuda", "cpu", "mps")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Rank 0 alone writes checkpoints (18 GB for GPT-2 XL with its optimizer), downloads HellaSwag and samples text
# while the other ranks wait in the next collective: give them longer than NCCL's default 10 minutes.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def resolve_device(name: str = "auto") -> str:
    """``auto`` means CUDA when present, else CPU; an explicit device must be available."""
    if name not in DEVICES:
        raise UserError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available")
    return name


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its rank among ``world_size`` processes and the device it drives."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type


def init_distributed(device: str = "auto", timeout: timedelta = COLLECTIVE_TIMEOUT) -> DistContext:
    """Start the process group when launched by torchrun; return this process's place and device.

    ``timeout`` bounds every collective: a rank that stops answering fails the others' next collective after it
    (gloo raises; NCCL's watchdog aborts the process), so the job ends, and torchrun may restart it.
    """
    device_type = resolve_device(device)
    if "RANK" not in os.environ:
        if device_type == "cuda":
            return DistContext(device="cuda:0")
        return DistContext(device=device_type)
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device_type == "cuda":
        # Checked against the node's process count, not this rank's index, so that every rank of the node fails
        # alike and the job reports the error once (gpt2.errors).
        processes, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)), torch.cuda.device_count()
        if processes > gpus:
            raise UserError(
                f"torchrun starts {processes} processes on this node but only {gpus} GPUs are visible; "
                f"use --nproc_per_node={gpus}"
            )
        device_name = f"cuda:{local_rank}"
        torch.cuda.set_device(device_name)
        backend = "nccl"
    else:
        device_name = device_type
        backend = "gloo"
    if not dist.is_initialized():
        # device_id binds the NCCL communicator to this rank's GPU at once (no guessing, no stray context on GPU 0).
        device_id = torch.device(device_name) if backend == "nccl" else None
        dist.init_process_group(
            backend=backend, device_id=device_id, timeout=timeout, **_attempt_store(rank, world_size, timeout)
        )
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device_name)


def _attempt_store(rank: int, world_size: int, timeout: timedelta) -> dict[str, Any]:
    """Where the process group meets: under a torchrun agent that hosts the store (TORCHELASTIC_USE_AGENT_STORE),
    a prefix of that store proper to this attempt of the workers; elsewhere the env:// default (no arguments).

    The agent's store outlives its workers. After ``--max-restarts`` restarts them, the new workers would read the
    keys the dead ones left there (gloo: "connectFullMesh failed ... Connection refused" to a port of the previous
    attempt; measured, ../shared/notes); ``TORCHELASTIC_RESTART_COUNT`` names the attempt, so each one meets under
    keys of its own. It counts the restarts of this node's agent: see the README on restarts for several nodes.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"gpt2/attempt_{attempt}", agent_store), "rank": rank, "world_size": world_size}


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finish_distributed() -> None:
    """End the process group once every rank is done (a collective), so that ending it cannot deadlock.

    gloo's worker threads free a finished collective themselves when they hold its last reference, and its
    tensors' Python objects need the GIL for that; the process group's destructor joins those threads while
    holding the GIL. Where the last reference to the group went (a rank leaving ``train``) while a worker was
    still freeing the run's last collective, the rank hung for good (seen under ``torchrun --max-restarts``; its
    stacks in gdb: ``~ProcessGroupGloo`` joining ``pt_gloo_runloop``, which waited for the GIL in
    ``~AsyncBarrierWork``). Here the last collective is a barrier whose handle this function holds until the
    group has ended (call it once nothing else holds the group: ``train`` lets go of its trainer first), so no
    worker frees anything then; the handle is freed after, on this thread.
    """
    if not dist.is_initialized():
        return
    last = dist.barrier(async_op=True)
    last.wait()
    dist.destroy_process_group()
    del last


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op in one process) and return it."""
    if ctx.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def autocast(device_type: str, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA and CPU (``dtype="bf16"``), or plain fp32 (``dtype="fp32"``)."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype])


def enable_tf32(device_type: str) -> None:
    """TF32 tensor cores for the fp32 matmuls left outside autocast (CUDA only). ``set_float32_matmul_precision``
    works in every torch this project supports; the newer ``torch.backends.*.fp32_precision`` attributes (2.9+)
    are not needed for it."""
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")


def peak_memory_gib(device: str) -> float | None:
    """The most memory torch has allocated on a CUDA device so far, in GiB; None on other devices."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(torch.device(device)) / 2**30


def gather_strided(local: list[T], ctx: DistContext) -> list[T]:
    """Undo the strided split ``items[rank::world_size]``: every rank's share, interleaved back in order."""
    if not ctx.is_distributed:
        return local
    shares: list[list[T]] = [[] for _ in range(ctx.world_size)]
    dist.all_gather_object(shares, local)
    return [shares[i % ctx.world_size][i // ctx.world_size] for i in range(sum(map(len, shares)))]


def on_main(fn: Callable[[], T], ctx: DistContext) -> T:
    """Run ``fn`` on rank 0 only and hand its result (or its ``UserError``) to every rank."""
    if not ctx.is_distributed:
        return fn()
    box: list[Any] = [None]
    if ctx.is_main:
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise UserError(value)
    return value
