"""Memory: what a training step holds on each process, planned from the model's shape, and ``--micro-batch auto``.

The plan counts bytes per process (rank) in six parts, from the architecture, the micro-batch, the dtype, the
optimizer and the parallelism. ``P`` is the number of parameters, ``N = tokens x n_embd`` the size of one
hidden-state tensor of a micro-batch (tokens = micro_batch x seq_len), ``s`` the bytes of the compute dtype (2 in
bf16, 4 in fp32), ``W`` the world size.

- **weights**: fp32, ``4P``; sharded under FSDP: ``4P / W`` (each parameter's rows padded to a multiple of W).
- **gradients**: fp32, ``4P`` (DDP's buckets are the gradients); ``4P / W`` under FSDP.
- **optimizer state**: AdamW keeps 2 fp32 tensors per parameter (``8P``); Muon 1 momentum buffer per hidden
  matrix (``4 P_matrices``) and AdamW for the rest; divided by W under FSDP.
- **compute copies**: DDP in bf16 keeps autocast's bf16 copy of every block weight for the whole step
  (``2 P_blocks``); FSDP keeps the root's parameters whole in fp32 (embeddings, final norm, head), two blocks'
  gathered parameters in the compute dtype (the running one and the prefetched next) and one block's
  unsharded gradients (compute dtype, and fp32 for the reduction).
- **activations**: the tensors autograd saves for backward, per micro-batch. Per block (counting, op by op, what
  each saves; checked against the bytes autograd really saves in ``tests/test_memory.py``)::

      N x (2·4 + 2s + 3s + 8·[qk-norm, s<4] + 2s·[qk-norm or rotary] + s + s·[rotary] + 8s) + small terms

  the fp32 residual entering both norms (2·4), the norms' outputs entering the matmuls (2s), q, k, v (3s), the
  fp32 copies of q and k that QK-norm normalises (8, in bf16 only), the transformed q and k entering attention
  (2s), the attention output (s) and its transposed copy where rotary made q contiguous (s), and the MLP's hidden
  layer before and after its activation (4s + 4s); the small terms are the norms' statistics and attention's
  log-sum-exp (4 bytes per token and head). Outside the blocks: the final norm's input (4N), the embedding norm's
  input in the modern block (4N), the token ids, and the loss: the fused loss (bf16, or a soft-cap) keeps the
  gradients it computes in forward, ``4N`` for the hidden states and ``4 x vocabulary x n_embd`` for the head; the plain
  fp32 loss keeps the log-softmax of every logit (``4 x tokens x vocab``). With activation checkpointing a block
  keeps only its fp32 input (``4N``), and backward rebuilds one block at a time. The x0 mix keeps each block's
  input before the mix as well (``4N`` per block, either way); the smear keeps the embedding and its shifted
  copy (``8N``; under bf16 autocast ``4N`` and the gate's bf16 input), as measured.
- **temporaries**: the larger of what lives only inside forward (one chunk of the fused loss,
  ``1024 rows x vocabulary x (4 + 2s)``, or the plain loss's logits and their gradient) and inside a block's
  backward (its activation gradients, ``8sN``, and with checkpointing the block being rebuilt).

The plan counts tensors, as ``TensorMemory`` measures them: within 0.89-1.08x of a step's measured tensor peak in
``tests/test_memory.py``, +3% (+6% with checkpointing) for a GPT-2 124M step (bench/RESULTS.md). It leaves out
what the framework holds besides (the CUDA context, the allocator's cached or fragmented memory, the Python
runtime): a CPU process's peak RSS ran 12-59% above it there. ``--micro-batch auto`` holds the plan against the
memory available on a CPU, and tries each size on a GPU (``cuda_fits``). ``python -m gpt2.memory`` prints the
table of GPT-2 sizes x parallelism x GPU memory (the README's "Memory" section).
"""

from __future__ import annotations

import math
import os
import resource
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2.cli import option, parse
from gpt2.config import GPTConfig
from gpt2.errors import UserError, run_cli
from gpt2.files import atomic_write_text
from gpt2.model import GPT, SMEAR_GATE_CHANNELS
from gpt2.optim import params_by_role

GIB = 2**30
FUSED_LOSS_ROWS = 1024  # gpt2.loss.fused_cross_entropy's chunk_rows
CUDA_HEADROOM = 0.9  # --micro-batch auto on CUDA: use at most this share of the GPU's memory
CPU_HEADROOM = 0.8  # ... on CPU, of the memory available at start
PLAN_SETTINGS = ("parallel", "world_size", "dtype", "optimizer", "activation_checkpointing", "micro_batch", "seq_len")


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one process holds during a training step (see the module docstring for each part)."""

    parallel: str
    world_size: int
    dtype: str
    optimizer: str
    activation_checkpointing: bool
    micro_batch: int
    seq_len: int
    weights: int
    gradients: int
    optimizer_state: int
    compute_copies: int
    activations: int
    temporaries: int
    activations_without_checkpointing: int
    activations_with_checkpointing: int

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer_state
            + self.compute_copies
            + self.activations
            + self.temporaries
        )

    def record(self) -> dict[str, Any]:
        """The plan as flat log fields: the settings as they are, each size as ``<part>_gib``."""
        fields = asdict(self)
        sizes = {f"{k}_gib": v / GIB for k, v in fields.items() if k not in PLAN_SETTINGS}
        return {**{k: fields[k] for k in PLAN_SETTINGS}, **sizes, "total_gib": self.total / GIB}

    def describe(self) -> str:
        """One console line."""
        ac = " + checkpointing" if self.activation_checkpointing else ""
        return (
            f"memory plan per process ({self.parallel}{ac} on {self.world_size}, {self.dtype}, {self.optimizer}, "
            f"micro-batch {self.micro_batch} x {self.seq_len}): weights {_size(self.weights)} + gradients "
            f"{_size(self.gradients)} + optimizer {_size(self.optimizer_state)} + compute copies "
            f"{_size(self.compute_copies)} + activations {_size(self.activations)} (without checkpointing "
            f"{_size(self.activations_without_checkpointing)}, with {_size(self.activations_with_checkpointing)}) "
            f"+ temporaries {_size(self.temporaries)} = {_size(self.total)}"
        )


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class _Counts:
    """Parameter counts of an architecture (from a model built on the meta device: no memory, exact)."""

    total: int
    matrices: int  # Muon's share
    blocks: int  # all blocks' parameters
    block: int  # one block's
    root: int  # embeddings, final norm, head: outside the blocks
    sharded: int  # per rank under FSDP over W ranks (rows padded to a multiple of W)
    sharded_matrices: int


def _counts(config: GPTConfig, world_size: int) -> _Counts:
    model = _meta_model(config)
    params = list(model.parameters())  # a tied weight once

    def shard(p: nn.Parameter) -> int:
        return math.ceil(p.shape[0] / world_size) * (p.numel() // p.shape[0])

    matrices = params_by_role(model)["matrices"]
    blocks = sum(p.numel() for p in model.transformer.h.parameters())
    return _Counts(
        total=sum(p.numel() for p in params),
        matrices=sum(p.numel() for p in matrices),
        blocks=blocks,
        block=blocks // config.n_layer,
        root=sum(p.numel() for p in params) - blocks,
        sharded=sum(shard(p) for p in params),
        sharded_matrices=sum(shard(p) for p in matrices),
    )


def block_activation_bytes(config: GPTConfig, tokens: int, dtype: str) -> int:
    """Bytes one block saves for backward over ``tokens`` tokens (the module docstring's formula)."""
    s = 2 if dtype == "bf16" else 4
    rope, qk = bool(config.rope_theta), config.qk_norm
    per_element = 2 * 4 + 2 * s + 3 * s + 8 * (qk and s < 4) + 2 * s * (qk or rope) + s + s * rope + 8 * s
    norm_stats = 4 * (2 if config.norm == "layernorm" else 1)  # per token and norm: mean and 1/std, or 1/rms
    per_token = config.n_embd * per_element + 2 * norm_stats + 4 * config.n_head * (1 + 2 * qk)  # log-sum-exp
    return tokens * per_token


def activation_bytes(config: GPTConfig, tokens: int, dtype: str, checkpointing: bool) -> int:
    """Bytes autograd saves for backward in one forward pass over ``tokens`` tokens: what a micro-batch adds to
    memory until its backward. Under checkpointing a block saves only its fp32 input."""
    C, L = config.n_embd, config.n_layer
    blocks = L * tokens * C * 4 if checkpointing else L * block_activation_bytes(config, tokens, dtype)
    blocks += L * tokens * C * 4 * config.x0_mix  # the x0 mix keeps each block's unmixed fp32 input (the first: x0)
    bf16 = dtype == "bf16"  # the smear: the embedding and its shifted copy in fp32; one, and the gate's input, in bf16
    smear = tokens * (C * 4 * (1 if bf16 else 2) + 2 * min(SMEAR_GATE_CHANNELS, C) * bf16) * config.smear
    norm_stats = 4 * (2 if config.norm == "layernorm" else 1)
    embedding_norm = (C * 4 + norm_stats) * (config.norm == "rmsnorm")
    outside = tokens * (C * 4 + norm_stats + embedding_norm + 8)  # final norm's input, embedding norm's, ids
    if dtype == "bf16" or config.logit_softcap:  # gpt2.loss.fused_cross_entropy: gradients made in forward
        loss = tokens * C * 4 + 4 * config.padded_vocab_size * C
    else:  # the textbook loss: log-softmax of every logit, and the final hidden states for the head's matmul
        loss = tokens * (C * (2 if dtype == "bf16" else 4) + 4 * config.vocab_size + 8)
    return blocks + outside + smear + loss


def plan(
    config: GPTConfig,
    *,
    micro_batch: int,
    seq_len: int,
    dtype: str,
    optimizer: str,
    parallel: str = "ddp",
    world_size: int = 1,
    activation_checkpointing: bool = False,
) -> MemoryPlan:
    """The memory plan of one process of a run (see the module docstring)."""
    n = _counts(config, world_size)
    s = 2 if dtype == "bf16" else 4
    fsdp = parallel == "fsdp"
    owned, owned_matrices = (n.sharded, n.sharded_matrices) if fsdp else (n.total, n.matrices)
    adam = owned - owned_matrices if optimizer == "muon" else owned
    if fsdp:  # the root whole in fp32 (weights and gradients), two blocks gathered, one block's gradients
        compute_copies = 4 * n.root * 2 + 2 * s * n.block + (s + 4) * n.block
    else:
        compute_copies = 2 * n.blocks if dtype == "bf16" else 0
    tokens = micro_batch * seq_len
    if dtype == "bf16" or config.logit_softcap:
        loss_temporaries = min(FUSED_LOSS_ROWS, tokens) * config.vocab_size * (4 + 2 * s) + s * config.vocab_size
    else:
        loss_temporaries = 2 * 4 * tokens * config.padded_vocab_size
    # backward of one block: its activation gradients, and under checkpointing the block's rebuilt activations
    block_temporaries = 8 * s * tokens * config.n_embd + block_activation_bytes(config, tokens, dtype) * (
        activation_checkpointing
    )
    without = activation_bytes(config, tokens, dtype, checkpointing=False)
    with_ = activation_bytes(config, tokens, dtype, checkpointing=True)
    return MemoryPlan(
        parallel=parallel,
        world_size=world_size,
        dtype=dtype,
        optimizer=optimizer,
        activation_checkpointing=activation_checkpointing,
        micro_batch=micro_batch,
        seq_len=seq_len,
        weights=4 * owned,
        gradients=4 * owned,
        optimizer_state=8 * adam + 4 * (owned_matrices if optimizer == "muon" else 0),
        compute_copies=compute_copies,
        activations=with_ if activation_checkpointing else without,
        temporaries=max(loss_temporaries, block_temporaries),
        activations_without_checkpointing=without,
        activations_with_checkpointing=with_,
    )


def measured_peak_bytes(device: str) -> tuple[int, str]:
    """The most memory this process has held so far, and how it was measured: CUDA's allocator peak
    (``torch.cuda.max_memory_allocated``, tensors only) or, on CPU, the peak resident set size (everything)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(torch.device(device)), "cuda max_memory_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024), "peak RSS"  # Linux reports KiB, macOS bytes


def available_bytes() -> int:
    """Memory the system can still give processes (Linux: MemAvailable; elsewhere: free physical pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def divisors(n: int) -> list[int]:
    """The micro-batches that split a process's ``n`` sequences per step evenly, largest first."""
    return [d for d in range(n, 0, -1) if n % d == 0]


def auto_micro_batch(candidates: Sequence[int], fits: Callable[[int], bool], agree: Callable[[bool], bool]) -> int:
    """The largest of ``candidates`` (largest first) that ``fits`` on every rank: ``agree`` turns each rank's
    answer into one for all (all ranks try the same candidates in the same order)."""
    for micro_batch in candidates:
        if agree(fits(micro_batch)):
            return micro_batch
    raise UserError(
        "--micro-batch auto: not even a micro-batch of 1 fits in memory; shard with --parallel fsdp, add "
        "--activation-checkpointing, or use more processes"
    )


def cuda_fits(
    model: nn.Module, micro_batch: int, seq_len: int, device: str, dtype: str, reserve: int, sharded: bool
) -> bool:
    """Whether a forward and backward of ``micro_batch`` sequences on ``model`` fit on this GPU with ``reserve``
    bytes to spare (the optimizer state not allocated yet), trying it: an out-of-memory error means no. The
    gradients are dropped and the cache emptied after. The tokens are zeros: no random numbers are drawn.

    A sharded model all-gathers its weights during the trial, so a rank that ran out of memory halfway cannot
    carry on with the others: that is an error (the other ranks then end at the collective timeout)."""
    from gpt2.distributed import autocast

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    x = torch.zeros((micro_batch, seq_len), dtype=torch.long, device=device)
    try:
        with autocast(torch.device(device).type, dtype):
            _, loss = model(x, x)
        loss.backward()
        peak: int | None = torch.cuda.max_memory_allocated(device)
    except torch.OutOfMemoryError:
        peak = None
    model.zero_grad(set_to_none=True)
    loss = x = None  # noqa: F841 - freed before the cache is emptied
    torch.cuda.empty_cache()
    if peak is None and sharded:
        raise UserError(
            f"--micro-batch auto: micro-batch {micro_batch} ran out of GPU memory on this rank while the model is "
            f"sharded over ranks; pass --micro-batch N (the memory plan above suggests one)"
        )
    return peak is not None and peak + reserve <= CUDA_HEADROOM * torch.cuda.mem_get_info(device)[1]


class TensorMemory(TorchDispatchMode):
    """Measures, on any device, the bytes of the tensors created inside it: live now and at most (each storage
    counted once, until it is freed). What autograd saves in forward is what is still live after it."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:  # noqa: ANN401
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in torch.utils._pytree.tree_leaves((args, kwargs)) if _is_tensor(t)}
        for t in torch.utils._pytree.tree_leaves(out):
            if _is_tensor(t) and id(t.untyped_storage()) not in inputs:  # not a view, nor an in-place result
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, size = id(storage), storage.nbytes()
        if key in self._tracked or size == 0:
            return
        self._tracked.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._tracked.discard(key)
        self.live -= size


def _is_tensor(x: object) -> bool:
    return isinstance(x, torch.Tensor)


# ----------------------------------------------------------------------------------------------------------------------
# The table of GPT-2 sizes (python -m gpt2.memory)

SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
SETTINGS = (("DDP", "ddp", False), ("DDP + checkpointing", "ddp", True), ("FSDP", "fsdp", False),
            ("FSDP + checkpointing", "fsdp", True))  # fmt: skip
MICRO_BATCHES = (64, 32, 16, 8, 4, 2, 1)


@dataclass
class TableConfig:
    """``python -m gpt2.memory``'s arguments (``gpt2.cli``)."""

    gpus: list[int] = option(default_factory=lambda: [24, 40, 80], help="GPU memory sizes in GB (columns)")
    world_size: int = option(8, "processes (GPUs) FSDP shards over")
    recipe: str = option("gpt2", "the training recipe (its optimizer and block)", choices=["gpt2", "modern"])
    seq_len: int = option(1024, "tokens per sequence")
    dtype: str = option("bf16", "compute dtype", choices=["bf16", "fp32"])
    out: str | None = option(None, "write the markdown here (default: print it)")


def table(cfg: TableConfig) -> str:
    """Markdown: for each GPT-2 size and setting, the largest micro-batch whose plan fits each GPU size."""
    from gpt2.config import train_config

    optimizer = train_config(recipe=cfg.recipe).optimizer
    lines = [
        "## Which GPT-2 fits which GPU (estimates)",
        "",
        f"Estimates from the memory plan (`python -m gpt2.memory`, `gpt2/memory.py`), not measurements: each cell is "
        f"the largest micro-batch (of {', '.join(map(str, MICRO_BATCHES))} sequences of {cfg.seq_len} tokens) whose "
        f"planned peak per GPU stays within {CUDA_HEADROOM:.0%} of the GPU's memory, and that peak in GiB; `no` "
        f"means not even one sequence fits (the peak at micro-batch 1 in brackets). `--recipe {cfg.recipe}` "
        f"({optimizer}), {cfg.dtype}; FSDP shards over {cfg.world_size} GPUs (DDP's memory does not depend on the "
        f"number of GPUs). The plan counts the tensors of an eager step (weights, gradients, optimizer state, bf16 "
        "copies, the activations autograd saves, the largest temporaries), checked against what a CPU step really "
        "allocates (`tests/test_memory.py`: within 1% for the activations, 0.89-1.08x for the peak; +3% for a GPT-2 "
        "124M step, `bench/RESULTS.md`); it leaves out the CUDA context and the allocator's cached memory, which the "
        "10% margin is for. `torch.compile` usually needs less. `make gpu-check` measures the 124M rows on a GPU "
        "(peak memory beside the plan of each run).",
        "",
        "The micro-batch does not change the results: the global batch (`--batch-tokens`) is the same, and gradient "
        "accumulation makes up the difference. `--micro-batch auto` picks the largest that fits at start (on a GPU "
        "by trying each, on a CPU from the plan); `--activation-checkpointing` and `--parallel fsdp` are the two "
        "ways to fit more. With `--parallel fsdp` checkpoints are sharded directories (`ckpt_<step>.dcp`, "
        "`torch.distributed.checkpoint`) that resume on any number of GPUs, with FSDP or DDP, and that the "
        "evaluators, sampling and export read as they read checkpoint files.",
        "",
        f"| model | setting | {' | '.join(f'{g} GB' for g in cfg.gpus)} |",
        "|---|---|" + "---|" * len(cfg.gpus),
    ]
    for size in SIZES:
        run = train_config(model=size, recipe=cfg.recipe)
        config = run.model_config()
        params = sum(p.numel() for p in _meta_model(config).parameters())
        for name, parallel, checkpointing in SETTINGS:
            world = cfg.world_size if parallel == "fsdp" else 1  # DDP's memory does not depend on the world size

            def plan_at(micro_batch: int) -> MemoryPlan:
                return plan(config, micro_batch=micro_batch, seq_len=cfg.seq_len, dtype=cfg.dtype,  # noqa: B023
                            optimizer=run.optimizer, parallel=parallel, world_size=world,  # noqa: B023
                            activation_checkpointing=checkpointing)  # noqa: B023  # fmt: skip

            cells = []
            for gb in cfg.gpus:
                fitting = [b for b in MICRO_BATCHES if plan_at(b).total <= CUDA_HEADROOM * gb * GIB]
                if fitting:
                    cells.append(f"{fitting[0]} ({plan_at(fitting[0]).total / GIB:.1f})")
                else:
                    cells.append(f"no ({plan_at(1).total / GIB:.1f} at 1)")
            lines.append(f"| {size} ({params / 1e6:.0f}M) | {name} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def _meta_model(config: GPTConfig) -> GPT:
    with torch.device("meta"):
        return GPT(config)


def main(argv: list[str] | None = None) -> None:
    cfg = parse(TableConfig, argv, prog="python -m gpt2.memory", description=__doc__)
    text = table(cfg)
    if cfg.out is None:
        print(text, end="")
    else:
        atomic_write_text(cfg.out, text)
        print(f"wrote {cfg.out}")


if __name__ == "__main__":
    run_cli(main)
