"""Text generation with top-k sampling, and ``python -m gpt2.sample TARGET`` on the command line."""

from __future__ import annotations

import argparse

import torch
from torch.nn import functional as F

from gpt2.checkpoint import load_model, unwrap
from gpt2.distributed import autocast, resolve_device
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
    dtype: str = "fp32",
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gpt2.sample", description=__doc__)
    p.add_argument("target", help="checkpoint file, run directory, Hugging Face directory or hub id (gpt2 ... gpt2-xl)")
    p.add_argument("--prompt", default="Hello, I'm a language model,")
    p.add_argument("--num-samples", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto", help="auto, cuda, cpu or mps")
    p.add_argument("--dtype", default="fp32", help="bf16 or fp32")
    p.add_argument("--compile", action="store_true", help="run the model through torch.compile")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    model, _ = load_model(args.target, device)
    if args.compile:
        model = torch.compile(model, dynamic=True)
    texts = sample_text(
        model,
        args.prompt,
        num_samples=args.num_samples,
        max_new_tokens=args.max_new_tokens,
        top_k=args.top_k or None,
        temperature=args.temperature,
        seed=args.seed,
        device=device,
        dtype=args.dtype,
    )
    for i, text in enumerate(texts):
        print(f"sample {i}: {text}")


if __name__ == "__main__":
    run_cli(main)
