"""Parallelism (gpt2.parallel) and sharded checkpoints (gpt2.sharded_checkpoint): activation checkpointing trains
exactly as without it; FSDP on 2 gloo ranks trains as DDP and as one process accumulating the same batch, resumes
bit for bit on 2 ranks and onto 1, and its checkpoints are read by the evaluator; Muon on shards is Muon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import ONE_THREAD, ROOT, SAMPLE_HELLASWAG, Capture, cli_flags, losses, read_log, tiny, tiny_model

from gpt2 import sharded_checkpoint
from gpt2.checkpoint import load_checkpoint, load_model
from gpt2.distributed import DistContext
from gpt2.errors import UserError
from gpt2.memory import TensorMemory, activation_bytes
from gpt2.optim import Optimizers
from gpt2.parallel import checkpoint_blocks
from gpt2.rundir import find_checkpoints, sharded_checkpoint_path
from gpt2.trainer import train

# the recipe's own rates and schedule (TINY warms up for 2 steps), at its least depth (two value-embedding tables)
MODERN = dict(recipe="modern", warmup_steps=0, n_layer=4)


def torchrun(*args: str | Path, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)})  # fmt: skip


def close(a: dict[int, float], b: dict[int, float], rel: float) -> bool:
    return sorted(a) == sorted(b) and all(a[s] == pytest.approx(b[s], rel=rel) for s in a)


# ----------------------------------------------------------------------------------------------------------------------
# Activation checkpointing


@pytest.mark.parametrize("recipe", [{}, MODERN], ids=["gpt2", "modern"])
def test_activation_checkpointing_trains_exactly_as_without(synthetic: Path, tmp_path: Path, recipe: dict):
    run = dict(max_steps=4, eval_every=2, val_tokens=512, save_every=4, **recipe)
    plain, checkpointed = Capture(), Capture()
    train(tiny(synthetic, tmp_path / "plain", **run), plain)
    train(tiny(synthetic, tmp_path / "ac", activation_checkpointing=True, **run), checkpointed)
    assert any("+ activation checkpointing" in m for m in checkpointed.messages)
    for kind in ("train", "val"):
        assert close(losses(checkpointed.records, kind), losses(plain.records, kind), rel=1e-6)
    # The checkpoint is the same model under the same names (no wrapper prefix), readable by every reader.
    a, b = (load_checkpoint(tmp_path / run_dir / "ckpt_000004.pt")["model"] for run_dir in ("plain", "ac"))
    assert list(a) == list(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_activation_checkpointing_keeps_only_each_blocks_input(dtype: str):
    """What autograd holds after forward: with checkpointing, the blocks keep their fp32 inputs (4 bytes x tokens x
    n_embd each) instead of all their activations; both as gpt2.memory's formula says."""
    from gpt2.distributed import autocast

    arch = dict(n_layer=4, vocab_size=256)  # a small head: the blocks' share shows

    def saved(checkpointing: bool) -> int:
        model = tiny_model(**arch)
        if checkpointing:
            checkpoint_blocks(model)
        x = torch.randint(0, 256, (2, 64))
        with TensorMemory() as memory, autocast("cpu", dtype):
            _, loss = model(x, x)
            return memory.live

    config, tokens = tiny_model(**arch).config, 2 * 64
    compute_copies = 2 * sum(p.numel() for p in tiny_model(**arch).transformer.h.parameters()) * (dtype == "bf16")
    for checkpointing in (False, True):
        expected = activation_bytes(config, tokens, dtype, checkpointing) + compute_copies
        assert saved(checkpointing) == pytest.approx(expected, rel=0.01), checkpointing
    assert saved(True) < 0.5 * saved(False)


@pytest.mark.slow
def test_activation_checkpointing_under_compile(synthetic: Path, tmp_path: Path):
    compiled, eager = Capture(), Capture()
    run = dict(n_layer=2, max_steps=3)
    train(tiny(synthetic, tmp_path / "compiled", compile=True, activation_checkpointing=True, **run), compiled)
    train(tiny(synthetic, tmp_path / "eager", **run), eager)
    assert any("compile on" in m for m in compiled.messages)
    assert close(losses(compiled.records), losses(eager.records), rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# FSDP


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [{}, MODERN], ids=["gpt2", "modern"])
def test_fsdp_trains_as_ddp_and_resumes_on_two_ranks_and_on_one(synthetic: Path, tmp_path: Path, recipe: dict):
    """2 FSDP ranks vs 2 DDP ranks vs 1 process accumulating 2 micro-batches: the same losses within 1e-5 (fp32).
    Resumed from its step-3 checkpoint on 2 ranks it repeats itself bit for bit; on 1 process (DDP's code path,
    whole tensors) it continues as the single process did. The GPT-2 recipe's run also scores HellaSwag and
    samples text in the loop, on the gathered model, and the evaluator scores its checkpoint the same."""
    gpt2_recipe = not recipe
    run = dict(max_steps=6, eval_every=3, val_tokens=1024, save_every=3, **recipe)
    if gpt2_recipe:  # the real vocabulary, for HellaSwag and text samples
        run.update(vocab_size=50257, hellaswag_every=3, hellaswag_data=str(SAMPLE_HELLASWAG), hellaswag_limit=8,
                   sample_every=3, sample_prompt="a", num_samples=2, max_new_tokens=4)  # fmt: skip
    for parallel in ("ddp", "fsdp"):
        r = torchrun("train.py", *cli_flags(synthetic, tmp_path / parallel, parallel=parallel, **run))
        assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for _, p in find_checkpoints(tmp_path / "fsdp")] == ["ckpt_000003.dcp", "ckpt_000006.dcp"]
    single = Capture()
    train(tiny(synthetic, tmp_path / "single", **run), single)

    ddp, fsdp = read_log(tmp_path / "ddp"), read_log(tmp_path / "fsdp")
    for kind in ("train", "val"):
        assert sorted(losses(fsdp, kind)) == ([0, 1, 2, 3, 4, 5] if kind == "train" else [0, 3, 6])
        assert close(losses(fsdp, kind), losses(ddp, kind), rel=1e-5), kind
        assert close(losses(fsdp, kind), losses(single.records, kind), rel=1e-5), kind
    if gpt2_recipe:
        for kind in ("hellaswag", "sample"):
            assert [r for r in fsdp if r["kind"] == kind] == [r for r in ddp if r["kind"] == kind]
        # The evaluator reads the sharded checkpoint as it reads a file: the same model, the same HellaSwag score.
        from gpt2.hellaswag import evaluate, load_examples

        model, info = load_model(tmp_path / "fsdp")  # the run directory: its newest checkpoint
        assert info == {"source": str(tmp_path / "fsdp" / "ckpt_000006.dcp"), "step": 6}
        result = evaluate(model, load_examples(SAMPLE_HELLASWAG, limit=8), DistContext(), dtype="fp32")
        (in_loop,) = [r for r in fsdp if r["kind"] == "hellaswag" and r["step"] == 6]
        assert (result.acc, result.acc_norm) == (in_loop["acc"], in_loop["acc_norm"])
        whole = load_checkpoint(tmp_path / "ddp" / "ckpt_000006.pt")["model"]
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, whole[name], rtol=1e-4, atol=1e-6)

    # Resumed on 2 ranks from the sharded step-3 checkpoint: steps 3-5 again, bit for bit.
    step3 = tmp_path / "fsdp" / "ckpt_000003.dcp"
    r = torchrun("train.py", *cli_flags(synthetic, tmp_path / "again", parallel="fsdp", resume=step3, **run))
    assert r.returncode == 0, r.stderr[-3000:]
    again = read_log(tmp_path / "again")
    assert losses(again) == {s: v for s, v in losses(fsdp).items() if s >= 3}
    assert losses(again, "val") == {s: v for s, v in losses(fsdp, "val").items() if s > 3}

    # ... and in one process, which holds the whole model (resharded from 2 ranks to 1, FSDP to DDP's path).
    one = Capture()
    train(tiny(synthetic, tmp_path / "one", resume=str(step3), **run), one)
    assert close(losses(one.records), {s: v for s, v in losses(single.records).items() if s >= 3}, rel=1e-5)


@pytest.mark.slow
def test_fsdp_continues_a_ddp_checkpoint_and_trains_compiled_in_bf16(synthetic: Path, tmp_path: Path):
    """A one-file checkpoint cut into shards (weights and optimizer state) continues as the run it came from;
    and FSDP with torch.compile, activation checkpointing and bf16 mixed precision trains like DDP in bf16."""
    run = dict(max_steps=6, save_every=3)
    single = Capture()
    train(tiny(synthetic, tmp_path / "single", **run), single)
    step3 = tmp_path / "single" / "ckpt_000003.pt"
    r = torchrun("train.py", *cli_flags(synthetic, tmp_path / "sharded", parallel="fsdp", resume=step3, **run))
    assert r.returncode == 0, r.stderr[-3000:]
    assert close(losses(read_log(tmp_path / "sharded")), {s: v for s, v in losses(single.records).items() if s >= 3},
                 rel=1e-5)  # fmt: skip

    bf16 = dict(max_steps=4, dtype="bf16", n_layer=2)
    flags = ["--compile", "--activation-checkpointing"]
    r = torchrun("train.py", *cli_flags(synthetic, tmp_path / "fsdp_bf16", parallel="fsdp", **bf16), *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compile on | fsdp + activation checkpointing" in r.stdout
    ddp = Capture()
    train(tiny(synthetic, tmp_path / "ddp_bf16", **bf16), ddp)
    # The same arithmetic (bf16 matmul weights, fp32 norms and residual stream): equal but for reduction order and
    # what compile fuses.
    assert close(losses(read_log(tmp_path / "fsdp_bf16")), losses(ddp.records), rel=1e-4)


@pytest.mark.slow
def test_muon_on_shards_is_muon_bit_for_bit():
    r = torchrun(ROOT / "tests" / "fsdp_muon_check.py")
    assert r.returncode == 0, r.stderr[-3000:]
    [results] = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("[")]
    assert sorted(result["rank"] for result in results) == [0, 1]
    for result in results:
        for step in result["steps"]:
            assert step["weights"] == 0.0 and step["momentum"] == 0.0 and step["moved"] > 1e-3


def test_fsdp_without_torchrun_is_a_clear_error(synthetic: Path, tmp_path: Path):
    with pytest.raises(UserError, match="--parallel fsdp shards the model over torchrun's processes"):
        train(tiny(synthetic, tmp_path, parallel="fsdp"))


# ----------------------------------------------------------------------------------------------------------------------
# Sharded checkpoints (a whole model in one process: DCP without a process group)


def optimizers_of(model: torch.nn.Module) -> Optimizers:
    return Optimizers({"adamw": torch.optim.AdamW(model.parameters(), lr=1e-3)})


def test_sharded_checkpoint_round_trip_and_readers(tmp_path: Path):
    model = tiny_model(seed=1)
    optimizers = optimizers_of(model)
    model(torch.zeros((1, 4), dtype=torch.long), torch.zeros((1, 4), dtype=torch.long))[1].backward()
    optimizers.step()
    path = sharded_checkpoint_path(tmp_path, 7)
    entries = {"config": model.config.to_dict(), "step": 7, "progress": {"step": 7, "val_loss": None}}
    sharded_checkpoint.save(path, model, optimizers, entries, is_main=True)
    assert path.name == "ckpt_000007.dcp" and find_checkpoints(tmp_path) == [(7, path)]
    assert not path.with_name(path.name + ".tmp").exists()

    # Readers: the whole model in one process, its optimizer state left out.
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 7 and ckpt["progress"] == {"step": 7, "val_loss": None} and "optimizer" not in ckpt
    loaded, info = load_model(path)
    assert info == {"source": str(path), "step": 7}
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)

    # Into a fresh model and optimizer: the same weights and optimizer state.
    fresh = tiny_model(seed=2)
    fresh_optimizers = optimizers_of(fresh)
    sharded_checkpoint.load_into(path, fresh, fresh_optimizers)
    torch.testing.assert_close(fresh.state_dict(), model.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(
        fresh_optimizers.state_dict()["adamw"]["state"], optimizers.state_dict()["adamw"]["state"]
    )


def test_a_crash_while_saving_leaves_no_checkpoint_and_deleting_is_atomic(tmp_path: Path, monkeypatch):
    model = tiny_model()
    optimizers = optimizers_of(model)
    path = sharded_checkpoint_path(tmp_path, 3)

    def crash(state, checkpoint_id, no_dist):
        Path(checkpoint_id).mkdir()
        (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(sharded_checkpoint.dcp, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        sharded_checkpoint.save(path, model, optimizers, {"step": 3}, is_main=True)
    assert find_checkpoints(tmp_path) == [] and not path.exists()
    monkeypatch.undo()
    sharded_checkpoint.save(path, model, optimizers, {"step": 3, "config": model.config.to_dict()}, is_main=True)
    assert find_checkpoints(tmp_path) == [(3, path)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000003.dcp"]  # the crash's .tmp is gone

    removed = []
    monkeypatch.setattr(sharded_checkpoint.shutil, "rmtree", lambda p: removed.append(Path(p).name))
    sharded_checkpoint.remove(path)
    assert removed == ["ckpt_000003.dcp.deleting"] and find_checkpoints(tmp_path) == []


def test_a_sharded_checkpoint_holding_code_is_refused(tmp_path: Path):
    import torch.distributed.checkpoint as dcp

    dcp.save({"step": 1, "config": Path("not plain data")}, checkpoint_id=tmp_path / "ckpt_000001.dcp")
    with pytest.raises(UserError, match="ckpt_000001.dcp cannot be loaded .*Unpickl"):
        load_checkpoint(tmp_path / "ckpt_000001.dcp")
