"""Parallelism: how the model is spread over a run's processes, applied from outside the model.

``parallelize`` turns the plain ``GPT`` into what the training loop calls, in torchtitan's order:

1. activation checkpointing (``--activation-checkpointing``): each ``Block`` is wrapped so that its forward runs
   under non-reentrant ``torch.utils.checkpoint``: only the block's input is kept for backward, and the block is
   run again during backward to rebuild the rest. Same operations on the same values, so the same results; it
   works under ``torch.compile`` (dynamo traces the checkpoint as a higher-order op). State-dict names stay
   clean: the wrapper strips its ``_checkpoint_wrapped_module.`` from ``state_dict()``;
2. ``torch.compile``: the whole model under DDP; each block under FSDP (the FSDP hooks then run eagerly between
   the compiled blocks, as torchtitan does it);
3. data parallelism (``--parallel``):

   - ``ddp``: every process holds the whole model, its gradients and optimizer state; DDP all-reduces the
     gradients during backward (``DistributedDataParallel``, gradients as views into its buckets);
   - ``fsdp``: FSDP2 (``fully_shard``) on each block and at the root: every process holds 1/N of each
     parameter, of its gradient and of its optimizer state (row shards, ``DTensor``); a block's parameters are
     all-gathered just before it runs (forward and backward) and freed after, and its gradients are
     reduce-scattered in backward.

Mixed precision under FSDP (``--dtype bf16``): the blocks all-gather their weights in bf16
(``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``): half the traffic and half the memory of the
gathered weights, rounded exactly as autocast rounds an fp32 weight for a bf16 matmul. Gradients are reduced in
fp32 and the optimizer updates fp32 shards. Autocast stays on around forward and backward, as under DDP: it keeps
the attention softmax, the norms' arithmetic and the loss in fp32 (this model has no explicit upcasts of its own),
and it finds the matmul weights already in bf16, so it keeps no bf16 copies of its own (under DDP it caches one
per weight for the whole step). What stays fp32: the root's weights (embeddings, final norm, head), so that the
residual stream is fp32 as under DDP, and each block's LayerNorm weights, gathered in a small fp32 group of their
own. A LayerNorm's weights must match its input's dtype on the CPU (autocast there does not upcast layer_norm:
"mixed dtype (CPU): expect parameter to have scalar type of Float"), and in fp32 they keep the GPT-2 recipe's
norms as DDP computes them. The blocks leave their inputs as they are (``cast_forward_inputs=False``). So FSDP in
bf16 computes what DDP with autocast computes; the two differ by the order of the gradient reductions only
(``tests/test_parallel.py`` compares them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2.checkpoint import clean_state_dict
from gpt2.config import TrainConfig
from gpt2.distributed import DistContext
from gpt2.errors import UserError
from gpt2.model import GPT


def parallelize(model: GPT, cfg: TrainConfig, ctx: DistContext) -> tuple[nn.Module, nn.Module]:
    """``(train_model, compiled)``: what a training step calls, and what evaluations call where the model is
    whole on every rank (the compiled model, or the model itself). ``model`` is changed in place: its blocks
    wrapped for checkpointing or compiled, and under FSDP its parameters replaced by their shards."""
    if cfg.activation_checkpointing:
        checkpoint_blocks(model)
    compile_on = cfg.use_compile(ctx.device_type)
    if cfg.parallel == "fsdp":
        if not ctx.is_distributed:
            raise UserError(
                "--parallel fsdp shards the model over torchrun's processes: run under torchrun "
                "(--nproc_per_node=1 works too), or use --parallel ddp in one process"
            )
        if ctx.device_type not in ("cuda", "cpu"):
            raise UserError(f"--parallel fsdp runs on CUDA or CPU, not {ctx.device_type}")
        if compile_on:
            for i, block in enumerate(model.transformer.h):
                model.transformer.h[i] = torch.compile(block)
        shard(model, ctx, cfg.dtype)
        return model, model
    # Compile first, then DDP: dynamo then splits the graph at DDP's buckets so communication overlaps backward.
    compiled = torch.compile(model) if compile_on else model
    if not ctx.is_distributed:
        return compiled, compiled
    device_ids = [ctx.local_rank] if ctx.device_type == "cuda" else None
    # Gradients as views into DDP's all-reduce buckets: one copy of them in memory, not two.
    return DDP(compiled, device_ids=device_ids, gradient_as_bucket_view=True), compiled


def checkpoint_blocks(model: GPT) -> None:
    """Activation checkpointing of every block (non-reentrant; the RNG state is replayed in the recomputation)."""
    for i, block in enumerate(model.transformer.h):
        model.transformer.h[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def shard(model: GPT, ctx: DistContext, dtype: str) -> None:
    """FSDP2 over all ranks: one group per block (and in bf16 one for its LayerNorms, gathered in fp32), the rest
    (embeddings, final norm, head: tied weights stay in one group) at the root. Mixed precision as the module
    docstring says."""
    mesh = init_device_mesh(ctx.device_type, (ctx.world_size,))
    if dtype == "bf16":
        blocks = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
        fp32 = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
    else:
        blocks = fp32 = MixedPrecisionPolicy()
    for layer in model.transformer.h:
        norms = [m for m in layer.modules() if isinstance(m, nn.LayerNorm)]
        if norms and dtype == "bf16":  # their own group, gathered in fp32
            fully_shard(norms, mesh=mesh, mp_policy=fp32)
        fully_shard(layer, mesh=mesh, mp_policy=blocks)
    fully_shard(model, mesh=mesh, mp_policy=fp32)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Forward and backward with the gradient reduction on or off (off: accumulate locally, for all micro-steps
    but the last of an optimizer step): DDP's ``no_sync``, FSDP's ``set_requires_gradient_sync``."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    elif isinstance(model, DDP) and not enabled:
        with model.no_sync():
            yield
    else:
        yield


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (sharded gradients included): the global norm, as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def weights_finite(model: nn.Module, ctx: DistContext) -> bool:
    """Whether every weight is finite, on every rank (a collective when the weights are sharded)."""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    finite = torch.tensor([all(bool(torch.isfinite(p).all()) for p in local)], device=ctx.device)
    if is_sharded(model):
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def gathered_copy(model: GPT, device: str) -> GPT:
    """A plain, whole copy of a sharded model on every rank (a collective: every rank calls it), for what needs
    the whole model on one rank: evaluations whose ranks run different numbers of forward passes (validation
    shares, HellaSwag), and sampling on rank 0. Parameters are gathered one at a time into a copy built without
    initialisation (the global RNG is untouched): memory for one fp32 copy of the model."""
    with torch.device("meta"):
        copy = GPT(model.config)
    copy.to_empty(device=device)
    targets = copy.state_dict()
    for name, value in clean_state_dict(model.state_dict()).items():
        targets[name].copy_(value.full_tensor() if isinstance(value, DTensor) else value)
    for name, buffer in clean_state_dict(dict(model.named_buffers())).items():
        copy.get_buffer(name).copy_(buffer)
    return copy.train(model.training)
