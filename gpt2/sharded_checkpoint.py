"""Sharded checkpoints: ``torch.distributed.checkpoint`` (DCP) directories, what ``--parallel fsdp`` writes.

A sharded checkpoint is the directory ``<run>/ckpt_<step:06d>.dcp`` holding the same entries as a one-file
checkpoint (``gpt2.checkpoint``): ``format``, ``model`` (the weights under their GPT-2 names), ``optimizer``
(``{name: state}``, as ``torch.distributed.checkpoint.state_dict`` spells it: keyed by parameter name, not by
index), ``config``, ``step``, ``train_config``, ``loader``, ``rng`` and ``progress``.

- **Written in parallel:** every rank writes its own shards (``__<rank>_0.distcp``) and rank 0 the index
  (``.metadata``), into ``ckpt_<step>.dcp.tmp``; once all ranks are done, rank 0 renames the directory into
  place. A crash leaves a ``.tmp`` directory (removed by the next save) or an older checkpoint, never a
  partial directory under a checkpoint's name.
- **Resharded on load:** ``load_into`` reads the checkpoint into the model and optimizers of the current run,
  whatever their layout: FSDP over any number of ranks, or whole (DDP or one process). So a run moves between
  world sizes, and from ``--parallel fsdp`` to ``--parallel ddp``.
- **Consolidated on load for readers:** ``read_consolidated`` gathers the entries into whole tensors in one
  process, without a process group; ``gpt2.checkpoint.load_checkpoint`` uses it, so the evaluator, sampling and
  export read a sharded checkpoint as they read a file (no conversion step). Nothing else is unpickled:
  non-tensor entries are read with ``torch.load(weights_only=True)``, as checkpoint files are.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from gpt2.checkpoint import FORMAT_VERSION
from gpt2.errors import UserError
from gpt2.files import fsync_dir
from gpt2.optim import Optimizers, _regrouped

SHARDED = ("model", "optimizer")  # the entries that are sharded like the model; the others are small and whole


def save(path: Path, model: nn.Module, optimizers: Optimizers, entries: dict[str, Any], is_main: bool) -> None:
    """Write the model's and optimizers' state (each rank its shards) and ``entries`` (the same on every rank)
    to the directory ``path``, atomically. A collective: every rank calls it."""
    tmp = path.with_name(path.name + ".tmp")
    if is_main:  # left by a crash; no rank writes into it before dcp.save's first collective, which waits for us
        shutil.rmtree(tmp, ignore_errors=True)
    state = {
        "format": FORMAT_VERSION,
        "model": get_model_state_dict(model),
        "optimizer": {name: get_optimizer_state_dict(model, opt) for name, opt in optimizers.optimizers.items()},
        **entries,
    }
    dcp.save(
        state, checkpoint_id=tmp, no_dist=not dist.is_initialized()
    )  # returns on every rank once rank 0 has written the index after all shards
    if is_main:
        if path.exists():  # a step saved again (resumed from an earlier checkpoint): the new one replaces it
            remove(path)
        os.replace(tmp, path)
        fsync_dir(path.parent)


def remove(path: Path) -> None:
    """Delete a checkpoint, file or directory; a directory is renamed first, so that a crash while deleting
    never leaves part of one under a checkpoint's name."""
    if not path.is_dir():
        path.unlink()
        return
    trash = path.with_name(path.name + ".deleting")
    os.replace(path, trash)
    shutil.rmtree(trash)


def read_consolidated(path: str | Path, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The checkpoint's entries but ``skip``, consolidated into whole tensors on the CPU, in this process alone
    (no process group is used, even where one exists). A directory that is not a readable checkpoint is a
    ``UserError``."""
    reader = FileSystemReader(path)
    try:
        entries = {key[0] for key in reader.read_metadata().planner_data.values()} - set(skip)
        state: dict[str, Any] = {}
        _load_state_dict(state, storage_reader=reader, planner=_WeightsOnlyEmpty(keys=entries), no_dist=True)
    except (Exception, CheckpointException) as e:  # DCP wraps errors in a BaseException
        raise UserError(f"{path} cannot be loaded ({_first_line(e)})") from None
    return state


def load_into(path: Path, model: nn.Module, optimizers: Optimizers) -> None:
    """Read the checkpoint's model and optimizer state into this run's ``model`` (plain, DDP's or FSDP-sharded)
    and ``optimizers``, resharding as needed. A collective where a process group exists."""
    state = {
        "model": get_model_state_dict(model),
        "optimizer": {name: get_optimizer_state_dict(model, opt) for name, opt in optimizers.optimizers.items()},
    }
    try:
        dcp.load(state, checkpoint_id=path, planner=_WeightsOnly(), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:  # DCP wraps errors in a BaseException
        raise UserError(f"checkpoint {path} does not fit this run's model and optimizers ({_first_line(e)})") from None
    set_model_state_dict(model, state["model"])
    with optimizers.own_settings():
        for name, opt in optimizers.optimizers.items():
            set_optimizer_state_dict(model, opt, state["optimizer"][name])


def load_whole_into(ckpt: dict[str, Any], model: nn.Module, optimizers: Optimizers, names: dict[int, str]) -> None:
    """Read a one-file checkpoint (whole tensors, optimizer state keyed by parameter index; loaded on every rank)
    into this run's sharded ``model`` and ``optimizers``; ``names`` maps ``id(parameter)`` to its clean name."""
    weights = dict(ckpt["model"])
    weights.setdefault("lm_head.weight", weights.get("transformer.wte.weight"))  # checkpoints of tied models
    whole = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=whole)
    saved = ckpt["optimizer"]  # {name: state} (load_checkpoint upgraded older layouts)
    if saved.keys() != optimizers.optimizers.keys():
        raise UserError(f"checkpoint holds optimizers {sorted(saved)}, this run uses {sorted(optimizers.optimizers)}")
    with optimizers.own_settings():
        for name, opt in optimizers.optimizers.items():
            by_index = _regrouped(saved[name], opt)
            order = [names[id(p)] for group in opt.param_groups for p in group["params"]]
            by_name = {
                "state": {order[i]: s for i, s in by_index["state"].items()},
                "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in by_index["param_groups"]],
            }
            set_optimizer_state_dict(model, opt, by_name, options=whole)


class _RefusePickles:
    """DCP reads non-tensor entries with ``torch.load(weights_only=False)``: refuse anything a weights-only
    load would refuse (code named by the file) before it does."""

    def load_bytes(self, read_item: Any, value: Any) -> None:  # noqa: ANN401 - DCP's types
        torch.load(value, weights_only=True)
        value.seek(0)
        super().load_bytes(read_item, value)  # type: ignore[misc]


class _WeightsOnly(_RefusePickles, DefaultLoadPlanner):
    pass


class _WeightsOnlyEmpty(_RefusePickles, _EmptyStateDictLoadPlanner):
    pass


def _first_line(e: BaseException) -> str:
    """The cause in one line; of a ``CheckpointException``, its first rank's error's."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__
