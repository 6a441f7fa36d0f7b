"""``python -m gpt2.export CKPT OUT_DIR``: a checkpoint as a Hugging Face ``GPT2LMHeadModel`` directory."""

from __future__ import annotations

from dataclasses import dataclass

from gpt2.checkpoint import load_model
from gpt2.cli import option, parse
from gpt2.errors import run_cli
from gpt2.hf import export_hf


@dataclass
class ExportConfig:
    """``python -m gpt2.export``'s arguments (``gpt2.cli``)."""

    checkpoint: str = option(help="checkpoint file or run directory (its newest checkpoint)", positional=True)
    out_dir: str = option(help="directory to write the Hugging Face model into", positional=True)


def main(argv: list[str] | None = None) -> None:
    cfg = parse(ExportConfig, argv, prog="python -m gpt2.export", description=__doc__)
    model, info = load_model(cfg.checkpoint)
    out = export_hf(model, cfg.out_dir)
    print(
        f"exported {info['source']} (step {info['step']}) to {out}; load it with "
        f"transformers.GPT2LMHeadModel.from_pretrained({str(out)!r})"
    )


if __name__ == "__main__":
    run_cli(main)
