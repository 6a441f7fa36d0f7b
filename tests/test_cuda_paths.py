"""The CUDA-only branches, executed here on the CPU with the CUDA side faked: the TF32 switch (also on a torch
without the 2.9-only ``fp32_precision`` attributes), process-group start-up, DDP's arguments, pinned-memory
copies in the loader, the datasheet peak, memory reporting and RNG capture. A GPU is not needed to read them
wrong; these tests run them."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from support import tiny_model

from gpt2 import distributed, metrics, parallel, trainer
from gpt2.config import train_config
from gpt2.data import TrainLoader
from gpt2.distributed import DistContext, enable_tf32, init_distributed, peak_memory_gib
from gpt2.errors import UserError
from gpt2.runlog import ConsoleReporter
from gpt2.trainer import RngState, Trainer


def test_tf32_switch_works_on_a_torch_without_fp32_precision(monkeypatch):
    old_matmul = types.SimpleNamespace(allow_tf32=False)  # what torch 2.4-2.8 have: no fp32_precision
    monkeypatch.setattr(torch.backends.cuda, "matmul", old_matmul)
    before = torch.get_float32_matmul_precision()
    try:
        enable_tf32("cuda")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    enable_tf32("cpu")  # nothing to do off CUDA
    assert torch.get_float32_matmul_precision() == before


def test_process_group_binds_the_local_gpu_before_it_starts(monkeypatch):
    calls = []
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    ctx = init_distributed("cuda")
    assert (ctx.rank, ctx.local_rank, ctx.world_size, ctx.device) == (3, 1, 4, "cuda:1")
    assert calls[0] == ("set_device", "cuda:1")  # before any CUDA allocation or NCCL communicator
    _, kwargs = calls[1]
    assert kwargs["backend"] == "nccl" and kwargs["device_id"] == torch.device("cuda:1")
    assert kwargs["timeout"] == distributed.COLLECTIVE_TIMEOUT and kwargs["timeout"].total_seconds() >= 1800
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for rank in ("0", "1"):  # every rank of the node sees it: the job reports it once
        monkeypatch.setenv("LOCAL_RANK", rank)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        with pytest.raises(UserError, match="torchrun starts 2 processes on this node but only 1 GPUs are visible"):
            init_distributed("cuda")


def test_ddp_gets_the_local_gpu_and_bucket_view_gradients(monkeypatch):
    seen = {}

    def fake_ddp(module, **kwargs):
        seen.update(kwargs, module=module)
        return module

    monkeypatch.setattr(parallel, "DDP", fake_ddp)
    monkeypatch.setattr(trainer, "enable_tf32", lambda device_type: seen.update(tf32=device_type))
    run = types.SimpleNamespace(
        cfg=train_config(compile=False), model=tiny_model(), ctx=DistContext(rank=1, local_rank=1, world_size=2,
                                                                            device="cuda:1"),
    )  # fmt: skip
    Trainer._wrap_model(run)
    assert seen["device_ids"] == [1] and seen["gradient_as_bucket_view"] is True and seen["tf32"] == "cuda"
    assert run.train_model is run.model and run.compiled is run.model


def test_loader_copies_from_pinned_memory_without_blocking(monkeypatch, synthetic: Path):
    pinned, copies = [], []
    empty = torch.empty

    def fake_empty(*shape, pin_memory=False, **kwargs):
        pinned.append(pin_memory)
        return empty(*shape, **kwargs)

    monkeypatch.setattr(torch, "empty", fake_empty)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: True)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, non_blocking=False: copies.append(
        (device, non_blocking)) or self)  # fmt: skip
    loader = TrainLoader(synthetic, 32, 128, 2, vocab_size=256, device="cuda:0")
    x, y = loader.next_batch()
    assert pinned == [True, True] and copies == [("cuda:0", True), ("cuda:0", True)]
    assert x.shape == y.shape == (2, 32)


@pytest.mark.parametrize(
    "name, tflops",
    [("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100-PCIE-40GB", 312), ("NVIDIA H100 80GB HBM3", 989),
     ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA L4", 121),
     ("NVIDIA A10G", 125), ("NVIDIA GeForce RTX 4090", 165), ("NVIDIA GeForce GTX 1080", None)],
)  # fmt: skip
def test_datasheet_peak_by_device_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: name)
    assert metrics.datasheet_peak("cuda:0") == (tflops * 1e12 if tflops else None)
    assert metrics.device_peak("cuda:0", 100e12) == 100e12  # --peak-tflops wins


def test_peak_memory_is_reported_on_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    assert peak_memory_gib("cuda:0") == 3.0 and peak_memory_gib("cpu") is None
    lines = []
    reporter = ConsoleReporter(10, types.SimpleNamespace(write=lines.append, flush=lambda: None))
    record = {"step": 0, "kind": "train", "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "dt_ms": 10.0,
              "tok_per_s": 1e5, "mfu": 0.4, "peak_mem_gib": 3.0}  # fmt: skip
    reporter.record(record)
    assert "mem 3.0 GiB" in "".join(lines)


def test_rng_capture_saves_and_restores_the_cuda_generator(monkeypatch):
    state = {"cuda": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: state["cuda"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda new: state.update(cuda=new.clone()))
    rng = RngState(DistContext(device="cuda:0"))
    saved = rng.state_dict()
    assert torch.equal(saved["cuda"][0], torch.tensor([1, 2, 3], dtype=torch.uint8))
    state["cuda"] = torch.tensor([9, 9, 9], dtype=torch.uint8)
    rng.load_state_dict(saved)
    assert torch.equal(state["cuda"], torch.tensor([1, 2, 3], dtype=torch.uint8))
