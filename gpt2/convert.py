"""``python -m gpt2.convert SRC OUT``: a nanoGPT or build-nanogpt checkpoint in this project's format.

nanoGPT (``ckpt.pt``) stores the architecture as a ``model_args`` dict; build-nanogpt stores its
``GPTConfig`` dataclass pickled, which only full unpickling can read. Full unpickling runs code named by
the file, so it happens only with ``--trust-pickle`` (classes that cannot be imported here are read as plain
attribute holders). Both use GPT-2's parameter names; their ``vocab_size`` is usually the padded 50304,
whose extra rows are read as padding. nanoGPT's ``bias=False`` becomes zero biases, which compute the same.
"""

from __future__ import annotations

import pickle
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt2.checkpoint import PickledObjects, clean_state_dict, model_payload, read_torch_file, save_checkpoint
from gpt2.cli import option, parse
from gpt2.config import GPTConfig
from gpt2.errors import UserError, run_cli
from gpt2.model import GPT
from gpt2.tokenizer import N_VOCAB

ARCH_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")


class _Permissive(pickle.Unpickler):
    """Reads classes that are not importable here (``train_gpt2.GPTConfig``) as empty attribute holders."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (), {"__module__": module})


_PERMISSIVE_PICKLE = types.SimpleNamespace(Unpickler=_Permissive, load=pickle.load, __name__="permissive_pickle")


def read_foreign(path: str | Path, trust_pickle: bool = False) -> dict[str, Any]:
    """The raw dict of a nanoGPT-family checkpoint; pickled objects only with ``trust_pickle``."""
    try:
        return read_torch_file(path)
    except PickledObjects as e:
        if not trust_pickle:
            raise UserError(
                f"{e}; reading them runs code named by the file: pass --trust-pickle if you trust where it came from"
            ) from None
    warnings.warn(f"unpickling {path} in full (--trust-pickle): only do this with files you trust", stacklevel=2)
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PERMISSIVE_PICKLE)
    except Exception as e:
        raise UserError(f"{path} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def convert(raw: dict[str, Any], source: str | Path = "checkpoint") -> dict[str, Any]:
    """Our checkpoint payload (``model``, ``config``, ``step``) for a nanoGPT or build-nanogpt checkpoint dict."""
    if not isinstance(raw, dict) or "model" not in raw:
        raise UserError(f"{source} is not a nanoGPT-style checkpoint (no 'model' state dict)")
    arch = raw.get("model_args") or raw.get("config")
    arch = arch if isinstance(arch, dict) else vars(arch) if arch is not None else {}
    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise UserError(f"{source}: the architecture lacks {', '.join(missing)} (expected nanoGPT's model_args)")
    config = GPTConfig(**{k: int(arch[k]) for k in ARCH_KEYS}).limit_vocab(N_VOCAB)
    model = GPT(config)
    state = {k: v for k, v in clean_state_dict(raw["model"]).items() if not k.endswith(".attn.bias")}
    for name, value in model.state_dict().items():
        if name.endswith(".bias") and name not in state:  # nanoGPT with bias=False
            state[name] = torch.zeros_like(value)
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{source}: the weights do not fit the architecture {arch} ({e})") from None
    step = raw.get("step", raw.get("iter_num", 0))
    return model_payload(model, int(step))


@dataclass
class ConvertConfig:
    """``python -m gpt2.convert``'s arguments (``gpt2.cli``)."""

    source: str = option(help="nanoGPT or build-nanogpt checkpoint file", positional=True)
    out: str = option(help="checkpoint file to write (ckpt_<step>.pt in a run directory, say)", positional=True)
    trust_pickle: bool = option(False, "allow full unpickling (build-nanogpt pickles its GPTConfig)")


def main(argv: list[str] | None = None) -> None:
    cfg = parse(ConvertConfig, argv, prog="python -m gpt2.convert", description=__doc__)
    payload = convert(read_foreign(cfg.source, cfg.trust_pickle), cfg.source)
    save_checkpoint(cfg.out, payload)
    print(f"wrote {cfg.out}: step {payload['step']}, {payload['config']}")


if __name__ == "__main__":
    run_cli(main)
