"""Checkpoints: one format shared by the trainer, the evaluator, export and sampling.

A checkpoint is a ``torch.save`` dict that ``torch.load(..., weights_only=True)`` reads:
``"model"`` (state dict with GPT-2 names, no ``_orig_mod.``/``module.`` prefixes), ``"config"``
(the ``GPTConfig`` fields as a plain dict) and ``"step"`` (optimizer steps taken), plus the trainer's
run state: one entry per stateful component (``optimizer``, ``loader``, ``rng``, ``progress``), each
its ``state_dict()``, and ``train_config``. Files are ``<run>/ckpt_<step:06d>.pt``, written atomically.
``--parallel fsdp`` writes the same entries as a sharded directory ``<run>/ckpt_<step:06d>.dcp``
(``gpt2.sharded_checkpoint``), which every reader here reads too.

A model whose output has more rows than the tokenizer has ids (nanoGPT writes ``vocab_size`` 50304) is
read with the extra rows as padding (``GPTConfig.limit_vocab``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gpt2.config import GPTConfig
from gpt2.errors import UserError
from gpt2.files import atomic_write
from gpt2.hf import is_hub_id, load_hf_model
from gpt2.model import GPT
from gpt2.tokenizer import N_VOCAB

CKPT_PATTERN = re.compile(r"^ckpt_(\d{6,})\.(?:pt|dcp)$")
SHARDED_SUFFIX = ".dcp"  # a sharded checkpoint's directory (gpt2.sharded_checkpoint)


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"ckpt_{step:06d}.pt"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A directory written by ``torch.distributed.checkpoint`` (it has the index, ``.metadata``)."""
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def find_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint in ``run_dir`` (files, and sharded checkpoints' directories), oldest
    first (temp files excluded)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CKPT_PATTERN.match(p.name))]
    return sorted(found)


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the prefixes that ``torch.compile`` (``_orig_mod.``) and DDP (``module.``) add to names, and the
    activation-checkpointing wrapper's (``_checkpoint_wrapped_module.``, in ``named_parameters()``' names)."""
    return {
        re.sub(r"^(?:_orig_mod\.|module\.)+", "", k)
        .replace("._orig_mod.", ".")
        .replace("_checkpoint_wrapped_module.", ""): v
        for k, v in state.items()
    }


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module"):  # DistributedDataParallel
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` with ``torch.save`` atomically: a reader sees the old file or the whole new one."""
    atomic_write(path, lambda f: torch.save(payload, f))


def model_payload(model: nn.Module, step: int) -> dict[str, Any]:
    """The part of a checkpoint every reader needs: clean weights, architecture and step."""
    model = unwrap(model)
    return {"model": clean_state_dict(model.state_dict()), "config": model.config.to_dict(), "step": step}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint file, or a sharded checkpoint's directory but its optimizer state (consolidated, in this
    process); a missing, truncated or foreign one is a ``UserError``."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        from gpt2.sharded_checkpoint import read_consolidated  # torch.distributed.checkpoint: 1-2 s to import

        return read_consolidated(path, skip=("optimizer",))
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= ckpt.keys():
        raise UserError(f"checkpoint {path} is not a gpt2 checkpoint (needs 'model', 'config' and 'step')")
    return ckpt


def config_from_checkpoint(ckpt: dict[str, Any], source: str | Path = "checkpoint") -> GPTConfig:
    """The architecture a checkpoint describes, reading any ids beyond the tokenizer's as padding."""
    try:
        return GPTConfig(**ckpt["config"]).limit_vocab(N_VOCAB)
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: invalid model config {ckpt['config']} ({e})") from None


def model_from_checkpoint(ckpt: dict[str, Any], source: str | Path = "checkpoint") -> GPT:
    """Rebuild the model a checkpoint describes; a config that does not fit the weights is a ``UserError``."""
    model = GPT(config_from_checkpoint(ckpt, source))
    ModelState(model, source).load_state_dict(ckpt["model"])
    return model


class ModelState:
    """The model as a stateful component of a run: clean weights out, weights in with a clear error."""

    def __init__(self, model: nn.Module, source: str | Path = "checkpoint") -> None:
        self.model, self.source = unwrap(model), source

    def state_dict(self) -> dict[str, torch.Tensor]:
        return clean_state_dict(self.model.state_dict())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = clean_state_dict(state)
        if "lm_head.weight" not in state and "transformer.wte.weight" in state:
            state["lm_head.weight"] = state["transformer.wte.weight"]
        try:
            self.model.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(
                f"{self.source}: config does not match the weights ({_first_line(e, skip_header=True)})"
            ) from None


def upgrade_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint in today's layout: v0.1 kept the progress as top-level ``step`` and ``val_loss``
    (its optimizer state is read by ``Optimizers.load_state_dict``)."""
    if "progress" not in ckpt:
        ckpt = {**ckpt, "progress": {"step": int(ckpt["step"]), "val_loss": ckpt.get("val_loss")}}
    return ckpt


def load_model(target: str | Path, device: str = "cpu") -> tuple[GPT, dict[str, Any]]:
    """The model behind ``target``: a checkpoint (file or sharded directory), a run directory (its newest checkpoint),
    a Hugging Face GPT-2 directory, or a hub id such as ``gpt2``.

    Returns the model in eval mode on ``device`` and ``{"source": ..., "step": ...}`` (step is None for HF weights).
    """
    path = Path(target)
    if path.is_dir() and not (path / "config.json").exists() and (checkpoints := find_checkpoints(path)):
        path = checkpoints[-1][1]
    if path.is_file() or is_sharded_checkpoint(path):
        ckpt = load_checkpoint(path)
        model, info = model_from_checkpoint(ckpt, path), {"source": str(path), "step": int(ckpt["step"])}
    elif (path / "config.json").is_file() or is_hub_id(str(target)):
        model, info = load_hf_model(target), {"source": str(target), "step": None}
    elif path.is_dir():
        raise UserError(f"{path} holds no ckpt_*.pt checkpoints and is not a Hugging Face model directory")
    else:
        raise UserError(
            f"{target} does not exist (expected a checkpoint, a run directory, an HF directory or a hub id)"
        )
    return model.to(device).eval(), info


def _first_line(e: BaseException, skip_header: bool = False) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if skip_header and len(lines) > 1:
        lines = lines[1:]
    return lines[0] if lines else type(e).__name__
