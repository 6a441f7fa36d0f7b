"""Checkpoints: one format shared by the trainer, the evaluator, export and sampling.

A checkpoint is a ``torch.save`` dict that ``torch.load(..., weights_only=True)`` reads: ``"format"`` (the layout's
version, ``FORMAT_VERSION``), ``"model"`` (state dict with GPT-2 names, no ``_orig_mod.``/``module.`` prefixes),
``"config"`` (the ``GPTConfig`` fields as a plain dict) and ``"step"`` (optimizer steps taken), plus the trainer's
run state: one entry per stateful component (``optimizer``, ``loader``, ``rng``, ``progress``), each its
``state_dict()``, and ``train_config``. Files are ``<run>/ckpt_<step:06d>.pt``, written atomically.
``--parallel fsdp`` writes the same entries as a sharded directory ``<run>/ckpt_<step:06d>.dcp``
(``gpt2.sharded_checkpoint``), which every reader here reads too.

``load_checkpoint`` reads every layout there has been and hands back today's: it dispatches on ``format`` (the
two releases before formats were numbered are told apart once, in ``checkpoint_format``) and upgrades one
version at a time. A model whose output has more rows than the tokenizer has ids (nanoGPT writes ``vocab_size``
50304) is read with the extra rows as padding (``GPTConfig.limit_vocab``).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gpt2.config import GPTConfig
from gpt2.errors import UserError
from gpt2.files import atomic_write
from gpt2.hf import is_hub_id, load_hf_model
from gpt2.model import GPT
from gpt2.rundir import find_checkpoints, is_sharded_checkpoint
from gpt2.tokenizer import N_VOCAB

FORMAT_VERSION = 3


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
    """Write ``payload`` (and this release's ``format``) with ``torch.save`` atomically: a reader sees the old file
    or the whole new one."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT_VERSION, **payload}, f))


def model_payload(model: nn.Module, step: int) -> dict[str, Any]:
    """The part of a checkpoint every reader needs: clean weights, architecture and step."""
    model = unwrap(model)
    return {"model": clean_state_dict(model.state_dict()), "config": model.config.to_dict(), "step": step}


class PickledObjects(UserError):
    """The file holds pickled Python objects, which only a full unpickling (running code the file names) reads."""


def read_torch_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with one-line errors of our own: a missing file, a file
    ``torch.save`` did not write, one holding Python objects (``PickledObjects``). torch's own message for those
    advises loading with ``weights_only=False``, which runs code named by the file: never the advice here."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        with open(path, "rb") as f:
            head = f.read(2)
        bare_pickle = len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # PROTO opcode, protocols 2-5
        if not (zipfile.is_zipfile(path) or bare_pickle):  # what torch.save writes: a zip, or (legacy) a pickle
            raise UserError(f"{path} is not a file written by torch.save") from None
        named = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({named.group(1)})" if named else ""
        raise PickledObjects(f"{path} holds pickled Python objects{what} that a weights-only load refuses") from None
    except Exception as e:  # a truncated or corrupt file
        raise UserError(f"{path} cannot be loaded ({type(e).__name__}: {_first_line(e)})") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint of any format, in today's layout: a file, or a sharded checkpoint's directory but its
    optimizer state (consolidated, in this process). A missing, truncated or foreign one, or one written by a
    newer release, is a ``UserError``."""
    path = Path(path)
    try:
        if is_sharded_checkpoint(path):
            from gpt2.sharded_checkpoint import read_consolidated  # torch.distributed.checkpoint: 1-2 s to import

            ckpt = read_consolidated(path, skip=("optimizer",))
        else:
            ckpt = read_torch_file(path)
    except PickledObjects as e:
        raise UserError(f"checkpoint {e}; a nanoGPT or build-nanogpt checkpoint converts with: "
                        f"python -m gpt2.convert {path} OUT --trust-pickle") from None  # fmt: skip
    except UserError as e:
        raise UserError(f"checkpoint {e}") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= ckpt.keys():
        raise UserError(f"checkpoint {path} is not a gpt2 checkpoint (needs 'model', 'config' and 'step')")
    version = checkpoint_format(ckpt)
    if version > FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format {version}, from a newer release (this one reads formats up "
                        f"to {FORMAT_VERSION}): upgrade gpt2 to read it")  # fmt: skip
    for upgrade in _UPGRADES[version - 1 :]:
        ckpt = upgrade(ckpt)
    return ckpt


def checkpoint_format(ckpt: dict[str, Any]) -> int:
    """The layout version of a checkpoint dict. Releases before formats were numbered wrote none; they are told
    apart by the one key that changed between them (v0.2 added ``progress``)."""
    if "format" in ckpt:
        return int(ckpt["format"])
    return 2 if "progress" in ckpt else 1


def _from_format_1(ckpt: dict[str, Any]) -> dict[str, Any]:
    """v0.1: progress as top-level ``step``/``val_loss``; ``optimizer`` the state of one unnamed AdamW (whose groups
    ``Optimizers.load_state_dict`` splits into today's role groups)."""
    ckpt = {**ckpt, "format": 2, "progress": {"step": int(ckpt["step"]), "val_loss": ckpt.get("val_loss")}}
    if "optimizer" in ckpt:
        ckpt["optimizer"] = {"adamw": ckpt["optimizer"]}
    return ckpt


def _from_format_2(ckpt: dict[str, Any]) -> dict[str, Any]:
    """v0.2: today's layout without the ``format`` key."""
    return {**ckpt, "format": 3}


_UPGRADES = (_from_format_1, _from_format_2)  # _UPGRADES[v - 1] turns format v into v + 1


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
