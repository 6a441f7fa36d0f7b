"""Hugging Face interop: OpenAI GPT-2 weights in (hub id or local directory) and our checkpoints out.

Hugging Face's GPT-2 stores its four projection matrices as ``Conv1D`` weights of shape (in, out);
ours are ``nn.Linear`` (out, in), so those four are transposed both ways. Everything else matches by name.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from gpt2.config import GPTConfig
from gpt2.errors import UserError
from gpt2.files import atomic_write, atomic_write_text
from gpt2.model import GPT
from gpt2.tokenizer import EOT_ID, EOT_TOKEN, N_VOCAB, get_encoding

HUB_IDS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_hub_id(name: str) -> bool:
    return name in HUB_IDS or name in HUB_IDS.values()


def load_hf_model(name_or_path: str | Path, vocab_multiple: int = 1) -> GPT:
    """Build a ``GPT`` from a Hugging Face GPT-2 directory, or from a hub id downloaded into the HF cache."""
    path = Path(name_or_path)
    if not (path / "config.json").is_file():  # a hub id, even where a folder of that name exists
        path = _download(str(name_or_path))
    # Output rows beyond the tokenizer's ids (a vocab_size of 50304) are read as padding.
    config = replace(_read_config(path), vocab_multiple=vocab_multiple).limit_vocab(N_VOCAB)
    model = GPT(config)
    model.load_state_dict(from_hf_state_dict(_read_weights(path), config))
    return model


def _download(name: str) -> Path:
    if not is_hub_id(name):
        raise UserError(f"{name!r} is neither a Hugging Face model directory nor a GPT-2 hub id ({', '.join(HUB_IDS)})")
    from huggingface_hub import snapshot_download

    repo_id = HUB_IDS.get(name, name)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["config.json", "model.safetensors"]))
    except Exception as e:  # offline, hub down, gated: all the same to the user
        raise UserError(
            f"cannot download {name!r} ({repo_id}) from the Hugging Face hub ({type(e).__name__}); "
            f"on a machine with network run `hf download {repo_id} config.json model.safetensors "
            f"--local-dir DIR`, then pass DIR instead of {name!r}"
        ) from None


def _read_config(path: Path) -> GPTConfig:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read config.json of a Hugging Face GPT-2 model ({e})") from None
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{path}: model_type is {cfg.get('model_type')!r}, not gpt2")
    if cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"{path}: activation {cfg['activation_function']!r} is not GPT-2's tanh GELU")
    return GPTConfig(
        block_size=cfg["n_positions"],
        vocab_size=cfg["vocab_size"],
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"],
        n_embd=cfg["n_embd"],
    )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").exists():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError("reading model.safetensors needs safetensors: pip install 'gpt2[hf]'") from None
        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise UserError(f"{path}: no {' or '.join(WEIGHT_FILES)}")


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Map a ``GPT2LMHeadModel``/``GPT2Model`` state dict onto our names and layouts."""
    state = {}
    for key, value in hf.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
            continue
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        state[name] = value.t() if name.endswith(CONV1D_SUFFIXES) else value
    wte = state["transformer.wte.weight"]
    if config.padded_vocab_size != wte.shape[0]:
        wte = torch.cat([wte, wte.new_zeros(config.padded_vocab_size - wte.shape[0], wte.shape[1])])
    state["transformer.wte.weight"] = state["lm_head.weight"] = wte
    return state


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face names and layouts, vocabulary padding removed, ``lm_head`` left tied."""
    state = {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name == "transformer.wte.weight":
            value = value[: model.config.vocab_size]
        state[name] = (value.t() if name.endswith(CONV1D_SUFFIXES) else value).contiguous()
    return state


def hf_config(config: GPTConfig) -> dict:
    """A ``transformers.GPT2Config`` as JSON for our architecture (GPT-2's own hyperparameters otherwise)."""
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "tie_word_embeddings": True,
    }


def export_hf(model: GPT, out_dir: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``GPT2LMHeadModel.from_pretrained`` loads,
    and GPT-2's ``vocab.json`` + ``merges.txt`` for ``AutoTokenizer``."""
    if differences := model.config.gpt2_compatible():
        raise UserError(
            f"transformers.GPT2LMHeadModel cannot hold this architecture ({', '.join(differences)}): only "
            "checkpoints of GPT-2's own block (--recipe gpt2) export to Hugging Face"
        )
    try:
        from safetensors.torch import save
    except ImportError:
        raise UserError("export needs safetensors: pip install 'gpt2[hf]'") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().float().cpu() for k, v in to_hf_state_dict(model).items()}
    atomic_write(out / "model.safetensors", lambda f: f.write(save(weights, metadata={"format": "pt"})))
    atomic_write_text(out / "config.json", json.dumps(hf_config(model.config), indent=2) + "\n")
    write_hf_tokenizer(out)
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, used by vocab.json and merges.txt."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The last merge that builds ``token``: run BPE on its bytes with only the merges ranked before it."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pair_ranks = [ranks.get(a + b, len(ranks)) for a, b in zip(parts[:-1], parts[1:])]
        i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def write_hf_tokenizer(out_dir: Path) -> None:
    """GPT-2's ``vocab.json`` and ``merges.txt``, rebuilt from the vendored BPE ranks."""
    ranks = get_encoding()._mergeable_ranks
    to_unicode = _bytes_to_unicode()
    spell = lambda token: "".join(to_unicode[b] for b in token)
    vocab = {spell(token): rank for token, rank in ranks.items()} | {EOT_TOKEN: EOT_ID}
    merges = [_merge_of(token, ranks) for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(token) > 1]
    atomic_write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2", *(f"{spell(a)} {spell(b)}" for a, b in merges)]
    atomic_write_text(out_dir / "merges.txt", "\n".join(lines) + "\n")
    tokenizer_config = {
        "model_max_length": 1024,
        "tokenizer_class": "GPT2Tokenizer",
        "eos_token": EOT_TOKEN,
        "bos_token": EOT_TOKEN,
        "unk_token": EOT_TOKEN,
        "add_prefix_space": False,
    }
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")
