"""Text generation with top-k sampling, and ``python -m gpt2.sample TARGET`` on the command line."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from gpt2.checkpoint import load_model, unwrap
from gpt2.cli import option, parse
from gpt2.distributed import DEVICES, DTYPES, autocast, resolve_device
from gpt2.errors import UserError, run_cli
from gpt2.model import GPT
from gpt2.tokenizer import get_encoding


@torch.no_grad()
def generate(
    model: GPT,
    prompt_ids: list[int],
    num_samples: int,
    max_new_tokens: int,
    top_k: int | None = 50,
    temperature: float = 1.0,
    seed: int = 42,
    device: str = "cpu",
    dtype: str = "bf16",
) -> list[list[int]]:
    """Continue ``prompt_ids`` ``num_samples`` times; the same seed gives the same tokens.

    ``model`` may be the plain or the compiled module: the context grows one token at a time, so a
    compiled model sees a new length per step (inductor handles that with dynamic shapes). The model's
    logits stop at ``vocab_size``, so padded vocabulary ids are never drawn.
    """
    block_size = unwrap(model).config.block_size
    if not prompt_ids:
        raise UserError("the prompt is empty")
    if len(prompt_ids) + max_new_tokens > block_size:
        raise UserError(
            f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new tokens "
            f"exceeds the model's block size {block_size}"
        )
    if temperature <= 0:
        raise UserError(f"--temperature must be positive, got {temperature}")
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        with autocast(torch.device(device).type, dtype):
            logits, _ = model(idx)
        probs = F.softmax(logits[:, -1, :].float() / temperature, dim=-1)
        if top_k is not None and top_k < probs.size(-1):
            top_probs, top_ids = torch.topk(probs, top_k, dim=-1)
            choice = torch.multinomial(top_probs, 1, generator=generator)
            next_id = torch.gather(top_ids, -1, choice)
        else:
            next_id = torch.multinomial(probs, 1, generator=generator)
        idx = torch.cat([idx, next_id], dim=1)
    return idx[:, len(prompt_ids) :].tolist()


def sample_text(model: GPT, prompt: str, **kwargs) -> list[str]:
    """``generate`` on text: the prompt followed by each continuation, decoded."""
    enc = get_encoding()
    ids = enc.encode_ordinary(prompt)
    return [prompt + enc.decode(tokens) for tokens in generate(model, ids, **kwargs)]


@dataclass
class SampleConfig:
    """``python -m gpt2.sample``'s arguments (``gpt2.cli``)."""

    target: str = option(
        help="checkpoint file, run directory, Hugging Face directory or hub id (gpt2 ... gpt2-xl)", positional=True
    )
    prompt: str = option("Hello, I'm a language model,", "text to continue")
    num_samples: int = option(5, "continuations to draw")
    max_new_tokens: int = option(30, "tokens per continuation")
    top_k: int = option(50, "sample among the k most likely tokens (0: all)")
    temperature: float = option(1.0, "softmax temperature")
    seed: int = option(42, "the same seed draws the same text")
    device: str = option("auto", "auto: CUDA when present, else CPU", choices=DEVICES)
    dtype: str = option("bf16", "autocast dtype", choices=list(DTYPES))
    compile: bool = option(False, "run the model through torch.compile")


def main(argv: list[str] | None = None) -> None:
    cfg = parse(SampleConfig, argv, prog="python -m gpt2.sample", description=__doc__)
    device = resolve_device(cfg.device)
    model, _ = load_model(cfg.target, device)
    if cfg.compile:
        model = torch.compile(model, dynamic=True)
    texts = sample_text(
        model,
        cfg.prompt,
        num_samples=cfg.num_samples,
        max_new_tokens=cfg.max_new_tokens,
        top_k=cfg.top_k or None,
        temperature=cfg.temperature,
        seed=cfg.seed,
        device=device,
        dtype=cfg.dtype,
    )
    for i, text in enumerate(texts):
        print(f"sample {i}: {text}")


if __name__ == "__main__":
    run_cli(main)
