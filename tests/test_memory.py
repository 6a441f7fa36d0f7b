"""The memory plan (gpt2.memory) against what autograd really saves and what a step really peaks at, its record in
log.jsonl (once per attempt, also across resumes), --micro-batch auto (which never changes the results) on CPU
and, with CUDA faked, on GPUs, and the table of GPT-2 sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import Capture, losses, read_log, tiny, tiny_model

from gpt2 import memory
from gpt2.cli import parse
from gpt2.config import GPTConfig, TrainConfig, train_config
from gpt2.distributed import autocast
from gpt2.errors import UserError
from gpt2.memory import TensorMemory, plan
from gpt2.optim import params_by_role
from gpt2.parallel import checkpoint_blocks
from gpt2.trainer import train

MODERN = dict(rope_theta=10000.0, norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=False, zero_init=True,
              bias=False)  # fmt: skip
ARCHS = {"gpt2": {}, "modern": MODERN, "modern + x0 mix": {**MODERN, "x0_mix": True},
         "modern + smear": {**MODERN, "smear": True}}  # fmt: skip
CASES = [(arch, dtype, ac) for arch in ARCHS for dtype in ("fp32", "bf16") for ac in (False, True)]


def measure(config: GPTConfig, micro_batch: int, seq_len: int, dtype: str, checkpointing: bool, micro_steps: int = 1):
    """(bytes held after the first forward, peak bytes over ``micro_steps`` forward-backward passes) of the tensors
    a training step creates (weights and optimizer state are not created there)."""
    torch.manual_seed(0)
    model = tiny_model(**config.to_dict())
    if checkpointing:
        checkpoint_blocks(model)
    x = torch.randint(0, config.vocab_size, (micro_batch, seq_len))
    with TensorMemory() as tracked, autocast("cpu", dtype):
        saved = None
        for _ in range(micro_steps):
            _, loss = model(x, x)
            saved = saved or tracked.live
            loss.backward()
            del loss
    return saved, tracked.peak


@pytest.mark.parametrize("arch, dtype, checkpointing", CASES)
def test_planned_activations_are_what_autograd_saves(arch: str, dtype: str, checkpointing: bool):
    """Held after forward: the activations the formula counts, plus autocast's bf16 copies of the block weights.
    Within 1% for every block variant, dtype and checkpointing setting (the formula is exact but for a few
    scalars and index tensors)."""
    config = GPTConfig(n_layer=3, n_head=4, n_embd=64, block_size=64, vocab_size=512, **ARCHS[arch])
    saved, _ = measure(config, 4, 64, dtype, checkpointing)
    p = plan(config, micro_batch=4, seq_len=64, dtype=dtype, optimizer="adamw", activation_checkpointing=checkpointing)
    assert saved == pytest.approx(p.activations + p.compute_copies, rel=0.01)
    assert p.activations == (p.activations_with_checkpointing if checkpointing else p.activations_without_checkpointing)


@pytest.mark.parametrize("arch, dtype, checkpointing", CASES)
def test_planned_peak_is_the_measured_peak_within_15_percent(arch: str, dtype: str, checkpointing: bool):
    """The peak of a step's own tensors over two accumulated micro-steps (the second forward runs while the first's
    gradients are held) against gradients + compute copies + activations + temporaries: measured within 0.89-1.08
    of the plan over these cases (tests/test_memory.py; bench/RESULTS.md for GPT-2 124M's process RSS)."""
    config = GPTConfig(n_layer=4, n_head=6, n_embd=384, block_size=256, vocab_size=512, **ARCHS[arch])
    _, peak = measure(config, 4, 256, dtype, checkpointing, micro_steps=2)
    p = plan(config, micro_batch=4, seq_len=256, dtype=dtype, optimizer="adamw", activation_checkpointing=checkpointing)
    assert peak == pytest.approx(p.gradients + p.compute_copies + p.activations + p.temporaries, rel=0.15)


def test_plan_parts_per_process():
    xl = train_config(model="gpt2-xl").model_config()
    n = sum(p.numel() for p in memory._meta_model(xl).parameters())
    ddp = plan(xl, micro_batch=1, seq_len=1024, dtype="bf16", optimizer="adamw")
    # The figure: GPT-2 XL's fp32 weights, gradients and AdamW state need ~25 GB on every DDP process.
    assert ddp.weights + ddp.gradients + ddp.optimizer_state == 16 * n and 24e9 < 16 * n < 26e9
    assert ddp.compute_copies == 2 * sum(p.numel() for p in memory._meta_model(xl).transformer.h.parameters())
    fsdp = plan(xl, micro_batch=1, seq_len=1024, dtype="bf16", optimizer="adamw", parallel="fsdp", world_size=8)
    assert fsdp.weights == fsdp.gradients and n / 8 <= fsdp.weights / 4 < n / 8 * 1.001  # rows padded to 8
    assert fsdp.optimizer_state == 2 * fsdp.weights and fsdp.activations == ddp.activations
    muon = plan(xl, micro_batch=1, seq_len=1024, dtype="bf16", optimizer="muon")
    matrices = sum(p.numel() for p in params_by_role(memory._meta_model(xl))["matrices"])
    assert muon.optimizer_state == 4 * matrices + 8 * (n - matrices)
    fp32 = plan(xl, micro_batch=1, seq_len=1024, dtype="fp32", optimizer="adamw")
    assert fp32.compute_copies == 0 and fp32.activations > ddp.activations
    ac = plan(xl, micro_batch=8, seq_len=1024, dtype="bf16", optimizer="adamw", activation_checkpointing=True)
    assert ac.activations == ac.activations_with_checkpointing < 0.2 * ac.activations_without_checkpointing
    record = ac.record()
    assert record["micro_batch"] == 8 and record["activation_checkpointing"] is True
    assert record["total_gib"] == pytest.approx(ac.total / 2**30) and "GiB" in ac.describe()


def test_memory_table_of_gpt2_sizes(tmp_path: Path):
    memory.main(["--out", str(tmp_path / "table.md")])
    text = (tmp_path / "table.md").read_text()
    assert text.startswith("## Which GPT-2 fits which GPU (estimates)") and "FSDP shards over 8 GPUs" in text
    rows = text[text.index("| model |") :].splitlines()
    assert rows[0] == "| model | setting | 24 GB | 40 GB | 80 GB |" and len(rows) == 2 + 4 * 4
    cells = {tuple(c.strip() for c in row.split("|")[1:3]): row.split("|")[3:6] for row in rows[2:]}
    assert cells["gpt2-xl (1558M)", "DDP"][0].strip().startswith("no (")  # 25 GB of state alone
    assert not cells["gpt2-xl (1558M)", "FSDP"][0].strip().startswith("no")
    assert cells["gpt2 (124M)", "DDP"][2].strip().startswith("64 (")  # the 124M recipe's micro-batch fits 80 GB


# ----------------------------------------------------------------------------------------------------------------------
# The memory record


def test_memory_record_once_per_attempt_also_across_resumes(synthetic: Path, tmp_path: Path):
    """The first attempt logs its record after its first step (as step 1); a resume from step 2 after a crash
    keeps it, drops what the crash left after step 2 and logs its own (as step 3): each step's train record once."""
    cap = Capture()
    train(tiny(synthetic, tmp_path, max_steps=4, save_every=2), cap)
    (record,) = [r for r in cap.records if r["kind"] == "memory"]
    assert record["step"] == 1 and record["micro_batch"] == 2 and record["parallel"] == "ddp"
    assert record["measured"] == "peak RSS" and record["measured_peak_gib"] > record["total_gib"] > 0
    assert any(
        m.startswith("memory plan per process (ddp on 1, fp32, adamw, micro-batch 2 x 32)") for m in cap.messages
    )
    (tmp_path / "ckpt_000004.pt").unlink()  # as if the run had crashed after step 3
    train(tiny(synthetic, tmp_path, max_steps=4, save_every=2))
    log = read_log(tmp_path)
    assert [r["step"] for r in log if r["kind"] == "memory"] == [1, 3]
    assert sorted(losses(log)) == [0, 1, 2, 3]  # (losses() also checks that no step appears twice)


# ----------------------------------------------------------------------------------------------------------------------
# --micro-batch auto


def test_micro_batch_flag_takes_auto():
    assert parse(TrainConfig, ["--micro-batch", "auto"], prog="t", factory=train_config).micro_batch is None
    assert parse(TrainConfig, ["--micro-batch", "8"], prog="t", factory=train_config).micro_batch == 8
    with pytest.raises(UserError, match="--micro-batch must be positive"):
        train_config(micro_batch=0)
    with pytest.raises(SystemExit):
        parse(TrainConfig, ["--micro-batch", "most"], prog="t", factory=train_config)


def test_micro_batch_auto_on_cpu_trains_exactly_as_the_size_it_picks(synthetic: Path, tmp_path: Path, monkeypatch):
    """8 sequences per step; the memory available is made to fit the plan of 4 but not of 8: auto picks 4, and
    trains bit for bit as --micro-batch 4 (global batch and results unchanged, accumulation makes up the rest)."""
    run = dict(batch_tokens=256, max_steps=3)
    config = tiny(synthetic, tmp_path / "x", **run).model_config()

    def needs(micro_batch: int) -> int:  # beyond the weights, which are held already when the size is chosen
        p = plan(config, micro_batch=micro_batch, seq_len=32, dtype="fp32", optimizer="adamw")
        return p.total - p.weights

    monkeypatch.setattr(memory, "available_bytes", lambda: (needs(4) + needs(8)) / 2 / memory.CPU_HEADROOM)
    auto, fixed = Capture(), Capture()
    train(tiny(synthetic, tmp_path / "auto", micro_batch=None, **run), auto)
    assert any(m.startswith("--micro-batch auto: 4 (from the memory plan") for m in auto.messages)
    assert any("256 tokens/step = 1 x 2 x 4 x 32" in m for m in auto.messages)
    train(tiny(synthetic, tmp_path / "fixed", micro_batch=4, **run), fixed)
    assert losses(auto.records) == losses(fixed.records)
    assert [r["micro_batch"] for r in auto.records if r["kind"] == "memory"] == [4]

    monkeypatch.setattr(memory, "available_bytes", lambda: needs(1) / 2)
    with pytest.raises(UserError, match="not even a micro-batch of 1 fits"):
        train(tiny(synthetic, tmp_path / "none", micro_batch=None, **run))


class FakeGPU:
    """torch.cuda's memory functions for a 10 GiB GPU whose allocator peak is what the last trial ``used``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.peak, self.emptied = 0, 0
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: setattr(self, "emptied", self.emptied + 1))
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: setattr(self, "peak", 0))
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: self.peak)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (0, 10 * 2**30))


class OutOfMemoryAbove(torch.nn.Module):
    """The tiny model, on a GPU that runs out of memory above ``limit`` sequences and uses 1 GiB per sequence."""

    def __init__(self, limit: int, gpu: FakeGPU) -> None:
        super().__init__()
        self.model, self.limit, self.gpu, self.tried = tiny_model(), limit, gpu, []

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        self.tried.append(x.size(0))
        if x.size(0) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (faked)")
        self.gpu.peak = x.size(0) * 2**30
        return self.model(x, y)


def test_micro_batch_auto_on_cuda_tries_sizes_until_one_fits(monkeypatch):
    gpu = FakeGPU(monkeypatch)
    model = OutOfMemoryAbove(limit=8, gpu=gpu)
    rng = torch.get_rng_state()

    def fits(micro_batch: int, reserve: int = 0) -> bool:
        return memory.cuda_fits(model, micro_batch, 16, "cpu", "fp32", reserve=reserve, sharded=False)

    assert memory.auto_micro_batch(memory.divisors(16), fits, agree=lambda ok: ok) == 8
    assert model.tried == [16, 8] and gpu.emptied >= 4  # the cache emptied before and after each trial
    assert all(p.grad is None for p in model.parameters())  # the trials leave no gradients behind
    assert torch.equal(torch.get_rng_state(), rng)  # nor draw random numbers
    # 8 GiB + the optimizer state not yet allocated must fit in 90% of 10 GiB: with 1.5 GiB more, 4 is the answer.
    model.tried.clear()
    assert memory.auto_micro_batch(memory.divisors(16), lambda b: fits(b, reserve=3 * 2**29), lambda ok: ok) == 4
    assert model.tried == [16, 8, 4]
    # Every rank agrees on the smallest: here another rank fits only 2.
    other_rank = {16: False, 8: False, 4: False, 2: True, 1: True}
    tried = []
    assert memory.auto_micro_batch(memory.divisors(16), lambda b: tried.append(b) or fits(b),
                                   lambda ok: ok and other_rank[tried[-1]]) == 2  # fmt: skip
    # A sharded model's ranks all-gather during the trial: running out of memory there cannot be recovered.
    with pytest.raises(UserError, match="micro-batch 16 ran out of GPU memory on this rank while the model is sharded"):
        memory.cuda_fits(model, 16, 16, "cpu", "fp32", reserve=0, sharded=True)


def test_auto_micro_batch_candidates_divide_the_share():
    assert memory.divisors(12) == [12, 6, 4, 3, 2, 1]
    assert memory.divisors(1) == [1]
