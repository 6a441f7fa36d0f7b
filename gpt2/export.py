"""``python -m gpt2.export CKPT OUT_DIR``: a checkpoint as a Hugging Face ``GPT2LMHeadModel`` directory."""

from __future__ import annotations

import argparse

from gpt2.checkpoint import load_model
from gpt2.errors import run_cli
from gpt2.hf import export_hf


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gpt2.export", description=__doc__)
    p.add_argument("checkpoint", help="checkpoint file or run directory (its newest checkpoint)")
    p.add_argument("out_dir", help="directory to write config.json and model.safetensors into")
    args = p.parse_args(argv)
    model, info = load_model(args.checkpoint)
    out = export_hf(model, args.out_dir)
    print(
        f"exported {info['source']} (step {info['step']}) to {out}; load it with "
        f"transformers.GPT2LMHeadModel.from_pretrained({str(out)!r})"
    )


if __name__ == "__main__":
    run_cli(main)
