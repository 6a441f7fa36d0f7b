"""The training loop: GPT-2 pretraining with DDP, gradient accumulation, in-loop evaluation and exact resume.

One code path for every setup: ``python train.py`` is one process without a process group, and
``torchrun --nproc_per_node=N train.py`` runs the same loop with DDP or FSDP (NCCL on CUDA, gloo on CPU); how the
model is spread over the processes is ``gpt2.parallel``'s business, what a step holds in memory ``gpt2.memory``'s.

Step numbering: optimizer step ``s`` (0-based) turns the weights after ``s`` steps into those after ``s + 1``.
Evaluations reported at step ``s`` and the checkpoint ``ckpt_<s>.pt`` both describe the weights after ``s``
steps; a checkpoint is always written after that step's evaluations, so a resumed run neither repeats nor
skips any, and continues with exactly the batches, learning rates and optimizer state of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from gpt2 import memory, sharded_checkpoint
from gpt2.checkpoint import (
    ModelState,
    clean_state_dict,
    config_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from gpt2.cli import flag
from gpt2.config import PADDED_VOCAB_MULTIPLE, GPTConfig, TrainConfig
from gpt2.data import PAD_TARGET, TrainLoader, ValLoader, list_shards
from gpt2.distributed import (
    DistContext,
    all_reduce_sum,
    autocast,
    barrier,
    destroy_distributed,
    enable_tf32,
    finish_distributed,
    init_distributed,
    peak_memory_gib,
)
from gpt2.documents import DocumentLoader
from gpt2.errors import EXIT_DIVERGED, UserError
from gpt2.hf import load_hf_model
from gpt2.hostmem import HostMemory, keep_freed_memory
from gpt2.metrics import device_peak, mfu
from gpt2.model import GPT
from gpt2.optim import Optimizers, build_optimizers
from gpt2.parallel import clip_grad_norm_, gathered_copy, gradient_sync, is_sharded, parallelize, weights_finite
from gpt2.rundir import (
    LOG_FILE,
    JsonlLog,
    checkpoint_path,
    find_checkpoints,
    is_sharded_checkpoint,
    sharded_checkpoint_path,
)
from gpt2.runlog import Reporter
from gpt2.sample import sample_text
from gpt2.schedule import lr_multiplier
from gpt2.sharded_checkpoint import SHARDED
from gpt2.tokenizer import get_encoding
from gpt2.tracking import Trackers, check_available, open_trackers

OTHER_STOP = 1000  # a stop requested by code rather than by a signal (signal numbers are smaller)


class NonFiniteLoss(UserError):
    """The loss or the gradient norm became NaN or infinite; the run stops without touching its checkpoints."""

    exit_code = EXIT_DIVERGED


@dataclass
class TrainResult:
    """How a run ended: after ``step`` optimizer steps, with its last val loss and newest checkpoint."""

    step: int
    val_loss: float | None
    checkpoint: Path | None
    stopped_by: str | None = None  # the signal (or other reason) that stopped the run early


class StopRequest:
    """A request to stop gracefully: the loop finishes its step, writes a checkpoint and returns.

    ``catch_signals`` turns SIGTERM and SIGINT into such a request; Ctrl-C once a stop is under way
    interrupts at once (without a checkpoint).
    """

    def __init__(self) -> None:
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        """Ask to stop; the first reason is the one reported."""
        self.reason = self.reason or reason

    @contextlib.contextmanager
    def catch_signals(self) -> Iterator[StopRequest]:
        def handler(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and self.reason is not None:
                raise KeyboardInterrupt
            self.request(signal.Signals(signum).name)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


# ----------------------------------------------------------------------------------------------------------------------
# One optimizer step


@dataclass
class StepStats:
    loss: float  # mean loss over the whole global batch
    grad_norm: float  # global gradient norm before clipping


def forward_backward(
    model: nn.Module,
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    grad_accum_steps: int,
    device_type: str,
    dtype: str,
) -> torch.Tensor:
    """Accumulate the gradient of the global batch's mean loss over ``grad_accum_steps`` micro-batches;
    return this rank's mean loss (detached).

    One autocast region spans all micro-steps: autocast caches the bf16 copy of each fp32 weight until the
    region ends, so the weights are cast once per optimizer step instead of once per micro-step.
    """
    loss_sum = torch.zeros((), device=next(model.parameters()).device)
    with autocast(device_type, dtype):
        for micro_step in range(grad_accum_steps):
            x, y = next_batch()
            # DDP all-reduces (FSDP reduce-scatters) gradients during backward; once, on the last micro-step.
            with gradient_sync(model, enabled=micro_step == grad_accum_steps - 1):
                _, loss = model(x, y)
                # Every micro-batch holds the same number of tokens, so the mean of the means is the global mean;
                # DDP then averages the ranks' gradients, which are means over equal shares too.
                loss = loss / grad_accum_steps
                loss.backward()
            loss_sum += loss.detach()
    return loss_sum


def train_step(
    model: nn.Module,
    optimizer: Optimizers,
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    *,
    grad_accum_steps: int,
    lr_multiplier: float,
    grad_clip: float,
    ctx: DistContext,
    dtype: str,
) -> StepStats:
    """One optimizer step on one global batch: accumulate, clip, update. Raises ``NonFiniteLoss`` before the
    update if the loss or the gradient norm is not finite, so the weights are never corrupted."""
    loss = forward_backward(model, next_batch, grad_accum_steps, ctx.device_type, dtype)
    loss = all_reduce_sum(loss, ctx) / ctx.world_size
    # max_norm=inf still returns the norm (for the log) without scaling anything.
    grad_norm = clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    loss_value, norm_value = torch.stack([loss, grad_norm.to(loss.device)]).tolist()
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        optimizer.zero_grad()
        raise NonFiniteLoss(f"loss {loss_value}, gradient norm {norm_value}")
    optimizer.set_lr_multiplier(lr_multiplier)
    optimizer.step()
    optimizer.zero_grad()
    return StepStats(loss=loss_value, grad_norm=norm_value)


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: ValLoader, ctx: DistContext, dtype: str) -> float:
    """Mean loss over every target token of the validation windows, exactly, whatever the world size."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64 if ctx.device_type != "mps" else torch.float32, device=ctx.device)
    for x, y in batches:
        with autocast(ctx.device_type, dtype):
            _, loss = model(x, y)
        n = (y != PAD_TARGET).sum()  # padding rows of the last batch are ignored by the loss
        totals += torch.stack([loss.to(totals.dtype) * n, n.to(totals.dtype)])
    model.train()
    loss_sum, count = all_reduce_sum(totals, ctx).tolist()
    return loss_sum / count


# ----------------------------------------------------------------------------------------------------------------------
# Setup helpers


def find_resume_checkpoint(cfg: TrainConfig, say: Callable[[str], None]) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to continue from according to ``--resume``, loaded; None to start afresh."""
    out = Path(cfg.out)
    if cfg.resume == "never":
        if out.is_dir() and any(out.iterdir()):
            raise UserError(f"--out {out} is not empty and --resume is never; choose a new --out or --resume auto")
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        return path, _resumable(_read_run_state(path), path)
    unreadable = []
    for _, path in reversed(find_checkpoints(out)):
        try:
            return path, _resumable(_read_run_state(path), path)
        except UserError as e:
            unreadable.append(path.name)
            say(f"warning: {e}; falling back to the previous checkpoint")
    if unreadable:
        raise UserError(
            f"no checkpoint in {out} can be resumed ({', '.join(unreadable)}); move them away to start over"
        )
    return None


def _read_run_state(path: Path) -> dict[str, Any]:
    """A checkpoint's entries; of a sharded one all but the model and optimizer state, which are read into the
    run's (sharded) model and optimizers later, each rank its part (``Trainer._restore_weights``)."""
    if is_sharded_checkpoint(path):
        return sharded_checkpoint.read_consolidated(path, skip=SHARDED)
    return load_checkpoint(path)


def _resumable(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    expected = [key for key in RUN_STATE if not (is_sharded_checkpoint(path) and key in SHARDED)]
    missing = [key for key in (*expected, "train_config") if key not in ckpt]
    if missing:
        raise UserError(f"checkpoint {path} holds no training state ({', '.join(missing)}), so it cannot be resumed")
    return ckpt


def check_architecture(ckpt: dict[str, Any], cfg: TrainConfig, source: Path) -> None:
    """A run directory belongs to one architecture: refuse to continue it with another."""
    if cfg.init_from is not None:
        return  # the architecture is the pretrained model's, whatever the flags say
    wanted, saved = cfg.model_config().to_dict(), config_from_checkpoint(ckpt, source).to_dict()
    diffs = [f"{k} {saved[k]} vs {v}" for k, v in wanted.items() if saved[k] != v]
    if diffs:
        raise UserError(
            f"{source} is a checkpoint of a different architecture ({', '.join(diffs)} in this run); "
            f"use another --out or the checkpoint's architecture flags"
        )


def build_model(cfg: TrainConfig, ckpt: dict[str, Any] | None, source: Path | None) -> GPT:
    """The model to train: the checkpoint's architecture (its weights are restored with the rest of the run
    state), the pretrained model (vocabulary padded), or a fresh one."""
    torch.manual_seed(cfg.seed)  # every rank draws the same initial weights
    if ckpt is not None:
        return GPT(config_from_checkpoint(ckpt, source))
    if cfg.init_from is not None:
        return load_hf_model(cfg.init_from, vocab_multiple=PADDED_VOCAB_MULTIPLE)
    return GPT(cfg.model_config())


# ----------------------------------------------------------------------------------------------------------------------
# Run state: every component a checkpoint saves and a resume restores, each with state_dict/load_state_dict

RUN_STATE = ("model", "optimizer", "loader", "rng", "progress")
WHOLE_STATE = tuple(name for name in RUN_STATE if name not in SHARDED)  # the same on every rank, small


@dataclass
class Progress:
    """How far the run is: optimizer steps taken, and the last validation loss."""

    step: int = 0
    val_loss: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "val_loss": self.val_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.val_loss = int(state["step"]), state.get("val_loss")


class RngState:
    """Every rank's torch RNG states (CPU, and CUDA where used). ``state_dict`` is a collective: every rank
    calls it; ``load_state_dict`` restores this rank's states (rank 0's when the world size changed)."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx

    def state_dict(self) -> dict[str, list[torch.Tensor] | None]:
        cuda = self.ctx.device_type == "cuda"
        state = (torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None)
        states = [state]
        if self.ctx.is_distributed:
            states = [None] * self.ctx.world_size
            dist.all_gather_object(states, state)
        return {"cpu": [s[0] for s in states], "cuda": [s[1] for s in states] if cuda else None}

    def load_state_dict(self, rng: dict[str, list[torch.Tensor] | None]) -> None:
        index = self.ctx.rank if len(rng["cpu"]) == self.ctx.world_size else 0
        torch.set_rng_state(rng["cpu"][index].cpu())
        if self.ctx.device_type == "cuda" and rng.get("cuda"):
            torch.cuda.set_rng_state(rng["cuda"][index].cpu())


def check_sampling(cfg: TrainConfig, config: GPTConfig) -> None:
    """Refuse at the start, not hours in, a sample prompt the model cannot read or continue."""
    ids = get_encoding().encode_ordinary(cfg.sample_prompt)
    if not ids or max(ids) >= config.vocab_size:
        raise UserError(f"--sample-prompt {cfg.sample_prompt!r} has token ids outside the model's vocabulary")
    if len(ids) + cfg.max_new_tokens > config.block_size:
        raise UserError(
            f"--sample-prompt ({len(ids)} tokens) + --max-new-tokens {cfg.max_new_tokens} exceeds the model's "
            f"block size {config.block_size}"
        )


# ----------------------------------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """Holds one run's model, optimizer, loaders and log; ``run()`` trains to ``max_steps`` or a stop request."""

    def __init__(
        self,
        cfg: TrainConfig,
        ctx: DistContext,
        reporter: Reporter | None,
        stop: StopRequest,
        host_memory: HostMemory | None = None,
    ) -> None:
        self.cfg, self.ctx, self.stop, self.host_memory = cfg, ctx, stop, host_memory
        self.reporter = reporter if ctx.is_main else None
        self.out = Path(cfg.out)

        # What can be checked before building anything: the data, the trackers' packages, the architecture.
        list_shards(cfg.data, "train")
        check_available(wandb=cfg.wandb is not None, tensorboard=cfg.tensorboard is not None)
        if cfg.init_from is None:
            cfg.model_config()
        resume = find_resume_checkpoint(cfg, self.say)
        barrier(ctx)  # every rank has looked at --out before rank 0 writes into it
        ckpt_path, ckpt = resume if resume else (None, None)
        if ckpt is not None:
            check_architecture(ckpt, cfg, ckpt_path)
        self.model = build_model(cfg, ckpt, ckpt_path).to(ctx.device)
        model_cfg = self.model.config
        if cfg.seq_len > model_cfg.block_size:
            raise UserError(f"{flag('seq_len')} {cfg.seq_len} exceeds the model's block size {model_cfg.block_size}")
        if cfg.sample_every:
            check_sampling(cfg, model_cfg)
        self._wrap_model()
        self.sharded = is_sharded(self.model)
        self.optimizer = build_optimizers(self.model, cfg, ctx.device_type)
        if ckpt is not None:
            self._restore_weights(ckpt, ckpt_path)
        self.micro_batch = cfg.micro_batch or self._auto_micro_batch()
        self.memory_plan = self._plan(self.micro_batch)
        self._build_data(model_cfg)
        self.progress = Progress()
        self.run_state = {
            "model": ModelState(self.model, ckpt_path or "checkpoint"),
            "optimizer": self.optimizer,
            "loader": self.loader,
            "rng": RngState(ctx),
            "progress": self.progress,
        }
        assert tuple(self.run_state) == RUN_STATE
        if ckpt is not None:
            for name in WHOLE_STATE:
                self.run_state[name].load_state_dict(ckpt[name])
        self.start_step, self.last_checkpoint = self.progress.step, ckpt_path
        self.flops_per_token = self.model.flops_per_token(cfg.seq_len)
        self.peak_flops = device_peak(ctx.device, cfg.peak_flops()) if ctx.is_main else None
        self._open_log()
        self._describe(ckpt_path)

    def _build_data(self, model_cfg: GPTConfig) -> None:
        """This rank's train loader (windows of the stream, or document-aligned rows) and val loader (windows, so
        that val losses compare across layouts), and the HellaSwag examples when asked for."""
        cfg, ctx = self.cfg, self.ctx
        placement = dict(rank=ctx.rank, world_size=ctx.world_size, vocab_size=model_cfg.vocab_size, device=ctx.device)
        batches = (cfg.data, cfg.seq_len, cfg.batch_tokens, self.micro_batch)
        if cfg.data_layout == "documents":
            self.loader = DocumentLoader(*batches, seed=cfg.seed, buffer_docs=cfg.buffer_docs, eot_id=model_cfg.eot_id,
                                         **placement)  # fmt: skip
        else:
            self.loader = TrainLoader(*batches, seed=cfg.seed, **placement)
        self.val_loader = None
        if cfg.eval_every and cfg.val_tokens:
            self.val_loader = ValLoader(cfg.data, cfg.seq_len, cfg.val_tokens, self.micro_batch, **placement)
        self.hellaswag_examples = None
        if cfg.hellaswag_every:
            from gpt2.hellaswag import load_eval_examples

            # --hellaswag-data, or the canonical val set downloaded once, by rank 0
            self.hellaswag_examples = load_eval_examples(cfg.hellaswag_data, cfg.hellaswag_limit, ctx)

    def _wrap_model(self) -> None:
        """``train_model``: what a train step calls (the model under DDP or FSDP, compiled, with checkpointed
        blocks, as the flags say); ``compiled``: what evaluations call when the model is whole (``gpt2.parallel``)."""
        enable_tf32(self.ctx.device_type)
        self.train_model, self.compiled = parallelize(self.model, self.cfg, self.ctx)

    def _restore_weights(self, ckpt: dict[str, Any], path: Path) -> None:
        """The checkpoint's model and optimizer state, into this run's model and optimizers whatever the layouts:
        a sharded checkpoint is read by every rank (its part, or the whole for a whole model); a file's whole
        tensors are loaded into whole models or cut into this rank's shards."""
        if is_sharded_checkpoint(path):
            sharded_checkpoint.load_into(path, self.model, self.optimizer)
        elif self.sharded:
            names = {id(p): name for name, p in clean_state_dict(dict(self.model.named_parameters())).items()}
            sharded_checkpoint.load_whole_into(ckpt, self.model, self.optimizer, names)
        else:
            ModelState(self.model, path).load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])

    def _plan(self, micro_batch: int) -> memory.MemoryPlan:
        cfg = self.cfg
        return memory.plan(
            self.model.config, micro_batch=micro_batch, seq_len=cfg.seq_len, dtype=cfg.dtype,
            optimizer=cfg.optimizer, parallel=cfg.parallel, world_size=self.ctx.world_size,
            activation_checkpointing=cfg.activation_checkpointing,
        )  # fmt: skip

    def _auto_micro_batch(self) -> int:
        """``--micro-batch auto``: the largest micro-batch that divides this rank's sequences per step and fits, the
        same on every rank. On CUDA each candidate is tried (forward and backward, the optimizer state that is
        not allocated yet set aside); elsewhere the memory plan is held against the memory available."""
        cfg, ctx = self.cfg, self.ctx
        per_pass = cfg.seq_len * ctx.world_size
        if cfg.batch_tokens % per_pass:
            raise UserError(
                f"--batch-tokens {cfg.batch_tokens:,} must be a multiple of --seq-len {cfg.seq_len} x "
                f"{ctx.world_size} rank(s) = {per_pass:,} tokens"
            )
        state_held = any(opt.state for opt in self.optimizer.optimizers.values())  # resumed: loaded already
        if ctx.device_type == "cuda":

            def fits(micro_batch: int) -> bool:
                reserve = 0 if state_held else self._plan(micro_batch).optimizer_state
                return memory.cuda_fits(
                    self.model, micro_batch, cfg.seq_len, ctx.device, cfg.dtype, reserve, self.sharded
                )
        else:
            per_process = memory.available_bytes() / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

            def fits(micro_batch: int) -> bool:
                plan = self._plan(micro_batch)
                held = plan.weights + (plan.optimizer_state if state_held else 0)
                return plan.total - held <= memory.CPU_HEADROOM * per_process

        def agree(ok: bool) -> bool:
            flag = torch.tensor([int(ok)], device=ctx.device)
            if ctx.is_distributed:
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            return bool(flag.item())

        micro_batch = memory.auto_micro_batch(memory.divisors(cfg.batch_tokens // per_pass), fits, agree)
        how = "tried on the GPU" if ctx.device_type == "cuda" else "from the memory plan and the memory available"
        self.say(f"--micro-batch auto: {micro_batch} ({how})")
        return micro_batch

    def _open_log(self) -> None:
        """Rank 0's log.jsonl, cut back to the history of the state being resumed, and its tracker mirrors."""
        cfg = self.cfg
        self.log = JsonlLog(self.out / LOG_FILE) if self.ctx.is_main else None
        self.trackers = Trackers()
        if self.log is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        logged = self.log.read()  # before the cut: what an interrupted attempt may already have sent to trackers
        dropped = self.log.truncate_to(self.start_step)
        if dropped:
            self.say(f"{self.log.path}: dropped {dropped} records after step {self.start_step} (not checkpointed)")
        if cfg.wandb is not None or cfg.tensorboard is not None:
            self.trackers = open_trackers(
                self.out, wandb_project=cfg.wandb, wandb_run=cfg.wandb_run, tensorboard_dir=cfg.tensorboard_dir(),
                resume_step=self.start_step, logged=logged, warn=lambda text: self.say(f"warning: {text}"),
            )  # fmt: skip
            for note in self.trackers.notes:
                self.say(note)
            self.trackers.log_config(cfg.to_dict())

    def say(self, text: str) -> None:
        if self.reporter is not None:
            self.reporter.message(text)

    def report(self, rec: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.append(rec)
            self.trackers.log_record(rec)
        if self.reporter is not None:
            self.reporter.record(rec)

    def _describe(self, ckpt_path: Path | None) -> None:
        cfg, ctx = self.cfg, self.ctx
        where = f"resuming from {ckpt_path} at step {self.start_step}" if ckpt_path else "starting from scratch"
        if ckpt_path is None and cfg.init_from:
            where = f"starting from pretrained {cfg.init_from}"
        peak = f"{self.peak_flops / 1e12:.1f} TFLOP/s" if self.peak_flops else "unknown"
        self.say(
            f"{where} | {self.model.num_params() / 1e6:.2f}M parameters | {ctx.world_size} process(es) on "
            f"{ctx.device_type} | {cfg.batch_tokens:,} tokens/step = {ctx.world_size} x "
            f"{self.loader.grad_accum_steps} x {self.micro_batch} x {cfg.seq_len} | {cfg.dtype} | "
            f"compile {'on' if cfg.use_compile(ctx.device_type) else 'off'} | {cfg.parallel}"
            f"{' + activation checkpointing' if cfg.activation_checkpointing else ''} | bf16 peak {peak}"
        )
        self.say(self.memory_plan.describe())

    def run(self) -> TrainResult:
        cfg, step = self.cfg, self.start_step
        if step >= cfg.max_steps:
            self.say(f"nothing to do: the run is already at step {step} of --max-steps {cfg.max_steps}")
            return TrainResult(step, self.progress.val_loss, self.last_checkpoint)
        stop_reason = None
        while True:
            last = step == cfg.max_steps
            if step > self.start_step or step == 0:  # a resumed step's evaluations precede its checkpoint
                self._evaluate(step, last)
            stopping = stop_reason is not None and not last
            if step > self.start_step and (last or stopping or (cfg.save_every and step % cfg.save_every == 0)):
                self._save(step)
            if last or stopping:
                break
            self._train(step)
            step = self.progress.step = step + 1
            stop_reason = self._agree_on_stop()
        if not stopping:
            return TrainResult(step, self.progress.val_loss, self.last_checkpoint)
        self.say(
            f"stopped by {stop_reason} after step {step}; newest checkpoint: {self.last_checkpoint}; "
            f"run the same command again to resume"
        )
        return TrainResult(step, self.progress.val_loss, self.last_checkpoint, stop_reason)

    def _train(self, step: int) -> None:
        cfg = self.cfg
        multiplier = lr_multiplier(
            step, warmup_steps=cfg.warmup(), max_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr / cfg.lr,
            schedule=cfg.schedule, cooldown_frac=cfg.cooldown_frac,
        )  # fmt: skip
        t0 = time.perf_counter()
        try:
            stats = train_step(
                self.train_model,
                self.optimizer,
                self.loader.next_batch,
                grad_accum_steps=self.loader.grad_accum_steps,
                lr_multiplier=multiplier,
                grad_clip=cfg.grad_clip,
                ctx=self.ctx,
                dtype=cfg.dtype,
            )
        except NonFiniteLoss as e:
            raise NonFiniteLoss(f"non-finite {e} at step {step}; stopping ({self._last_good()})") from None
        dt = time.perf_counter() - t0
        if self.host_memory is not None:
            self.host_memory.after_step()
        tok_per_s = cfg.batch_tokens / dt
        self.report(
            {
                "step": step,
                "kind": "train",
                "loss": stats.loss,
                "lr": cfg.lr * multiplier,  # --lr under the schedule; every group's rate is its base rate x this
                "grad_norm": stats.grad_norm,
                "tokens": (step + 1) * cfg.batch_tokens,
                "dt_ms": 1000 * dt,
                "tok_per_s": tok_per_s,
                "mfu": mfu(self.flops_per_token, tok_per_s / self.ctx.world_size, self.peak_flops),
                **({"peak_mem_gib": mem} if (mem := peak_memory_gib(self.ctx.device)) is not None else {}),
                **({"cropped": self.loader.cropped_fraction} if cfg.data_layout == "documents" else {}),
            }
        )
        if step == self.start_step:
            self._report_memory(step + 1)

    def _report_memory(self, step: int) -> None:
        """The memory plan and the peak measured over this process's first step, as the record of ``step`` (the
        state after that many steps, as evaluations are numbered: a resume from an earlier checkpoint drops it
        with the steps it follows, a resume from this step keeps it, so each attempt logs its own once)."""
        peak, how = memory.measured_peak_bytes(self.ctx.device)
        self.report(
            {"step": step, "kind": "memory", **self.memory_plan.record(), "measured_peak_gib": peak / memory.GIB,
             "measured": how}
        )  # fmt: skip

    def _last_good(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written"
        return f"the last good checkpoint {self.last_checkpoint} is untouched"

    def _agree_on_stop(self) -> str | None:
        """Why to stop after this step (None: go on), the same on every rank. The request is read once, here:
        a signal that lands later counts at the next step, on every rank alike, or ranks would part ways."""
        reason = self.stop.reason
        if not self.ctx.is_distributed:
            return reason
        # Every rank adopts the highest signal number seen, so that all exit with the same code.
        code = signal.Signals[reason].value if reason in signal.Signals.__members__ else OTHER_STOP * bool(reason)
        agreed = torch.tensor([code], device=self.ctx.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        code = int(agreed.item())
        if code == 0:
            return None
        if code == OTHER_STOP:
            return reason or "a stop request on another rank"
        return signal.Signals(code).name

    def _evaluate(self, step: int, last: bool) -> None:
        cfg, ctx = self.cfg, self.ctx

        def due(every: int) -> bool:
            return every > 0 and (step % every == 0 or last)

        val, hellaswag, sample = (
            self.val_loader is not None and due(cfg.eval_every),
            self.hellaswag_examples is not None and due(cfg.hellaswag_every),
            step > 0 and due(cfg.sample_every),
        )
        if not (val or hellaswag or sample):
            return
        if self.sharded:  # its ranks would have to run the same forward passes: evaluate a whole copy instead
            scoring = plain = gathered_copy(self.model, ctx.device)
        else:
            scoring, plain = self.compiled, self.model
        if val:
            val_loss = evaluate_loss(scoring, self.val_loader, ctx, cfg.dtype)
            if not math.isfinite(val_loss):
                raise NonFiniteLoss(
                    f"non-finite validation loss {val_loss} at step {step}; stopping ({self._last_good()})"
                )
            self.progress.val_loss = val_loss
            self.report({"step": step, "kind": "val", "loss": val_loss})
        if hellaswag:
            from gpt2.hellaswag import evaluate

            result = evaluate(scoring, self.hellaswag_examples, ctx, dtype=cfg.dtype)
            self.report(
                {"step": step, "kind": "hellaswag", "acc": result.acc, "acc_norm": result.acc_norm, "n": result.n}
            )
        if sample and ctx.is_main:
            # The plain module, not the compiled one: generation grows the sequence one token at a time.
            plain.eval()
            texts = sample_text(
                plain,
                cfg.sample_prompt,
                num_samples=cfg.num_samples,
                max_new_tokens=cfg.max_new_tokens,
                seed=cfg.seed,
                device=ctx.device,
                dtype=cfg.dtype,
            )
            plain.train()
            self.report({"step": step, "kind": "sample", "text": texts})

    def _save(self, step: int) -> None:
        # A step's loss is measured before its update, so an update that blows the weights up would only show
        # in the next loss: check the weights themselves before they can replace a good checkpoint.
        if not weights_finite(self.model, self.ctx):
            raise NonFiniteLoss(f"non-finite weights after step {step}; stopping ({self._last_good()})")
        # Every rank builds the payload: the RNG states are gathered with a collective.
        meta = {"config": self.model.config.to_dict(), "step": step, "train_config": self.cfg.to_dict()}
        if self.sharded:  # every rank writes its shards
            path = sharded_checkpoint_path(self.out, step)
            entries = {name: self.run_state[name].state_dict() for name in WHOLE_STATE}
            sharded_checkpoint.save(path, self.model, self.optimizer, {**entries, **meta}, self.ctx.is_main)
        else:
            path = checkpoint_path(self.out, step)
            state = {name: component.state_dict() for name, component in self.run_state.items()}
            if self.ctx.is_main:
                save_checkpoint(path, {**state, **meta})
        if self.ctx.is_main and self.cfg.keep_last:
            for _, old in find_checkpoints(self.out)[: -self.cfg.keep_last]:
                sharded_checkpoint.remove(old)
        self.last_checkpoint = path
        barrier(self.ctx)  # nobody moves on (or exits) before the checkpoint is complete


def train(cfg: TrainConfig, reporter: Reporter | None = None, stop: StopRequest | None = None) -> TrainResult:
    """Train according to ``cfg`` in this process (one rank of a torchrun job, or alone)."""
    ctx = init_distributed(cfg.device, timedelta(seconds=cfg.collective_timeout))
    try:
        with keep_freed_memory(ctx.device_type) as host_memory:  # CPU: no page re-zeroing every micro-step
            trainer = Trainer(cfg, ctx, reporter, stop or StopRequest(), host_memory)
            with trainer.trackers:  # closed (with the exit status) however the run ends
                result = trainer.run()
    except BaseException:
        destroy_distributed()
        raise
    del trainer  # its modules (DDP's reducer, FSDP's mesh) hold the process group: let it go first
    finish_distributed()
    return result
