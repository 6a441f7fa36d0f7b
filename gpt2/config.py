"""The training run's configuration: one typed dataclass whose fields are also ``train.py``'s flags.

Every field ``foo_bar`` is the command-line flag ``--foo-bar`` with the same default (``gpt2.cli``), so a
run's configuration, its flags and the ``train_config`` saved in its checkpoints all spell things one way.
The defaults are the GPT-2 124M recipe of the GPT-3 paper as build-nanogpt runs it on FineWeb-Edu 10B.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gpt2.cli import flag, option
from gpt2.distributed import DEVICES, DTYPES
from gpt2.errors import UserError
from gpt2.model import PRESETS, GPTConfig
from gpt2.tokenizer import N_VOCAB
from gpt2.tracking import check_available

PADDED_VOCAB_MULTIPLE = 64  # 50257 -> 50304 rows: aligned matmuls on GPUs, never predicted (logits are cut)


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` means "the model's or device's own value"."""

    data: str = option("data/fineweb_edu10B", "directory of token shards written by prepare_fineweb.py")
    out: str = option("runs/gpt2-124m", "run directory: checkpoints and log.jsonl")
    model: str = option("gpt2", "architecture preset", choices=list(PRESETS))
    n_layer: int | None = option(None, "override the preset's number of layers")
    n_head: int | None = option(None, "override the preset's number of attention heads")
    n_embd: int | None = option(None, "override the preset's width")
    vocab_size: int | None = option(
        None, "override the vocabulary size (GPT-2 BPE: 50257; the embedding is padded to a multiple of 64)"
    )
    block_size: int | None = option(None, "override the context length the model supports (preset: 1024)")
    init_from: str | None = option(None, "start from pretrained weights: a hub id (gpt2 ... gpt2-xl) or a HF directory")
    seq_len: int = option(1024, "tokens per training sequence")
    micro_batch: int = option(64, "sequences per forward/backward on each process")
    batch_tokens: int = option(524288, "tokens per optimizer step over all processes (2**19, as in GPT-3 Small)")
    max_steps: int = option(19073, "optimizer steps (19073 x 524288 tokens = one epoch of FineWeb-Edu 10B)")
    warmup_steps: int = option(715, "steps of linear learning-rate warmup")
    lr: float = option(6e-4, "peak learning rate")
    min_lr: float = option(6e-5, "learning rate at the end of the cosine decay")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices and embeddings (>= 2-D)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    seed: int = option(1337, "seed for the model's initialization and the data order")
    device: str = option("auto", "auto: CUDA when present, else CPU", choices=DEVICES)
    dtype: str = option("bf16", "compute dtype of forward/backward under autocast", choices=list(DTYPES))
    compile: bool | None = option(None, "torch.compile the model (default: on for CUDA, off elsewhere)")
    eval_every: int = option(250, "validation loss every N steps and at the end (0: never)")
    val_tokens: int = option(10485760, "tokens of the validation shard scored at each evaluation")
    sample_every: int = option(1000, "print text samples every N steps and at the end (0: never)")
    sample_prompt: str = option("Hello, I'm a language model,", "prompt of the text samples")
    num_samples: int = option(4, "text samples per sampling")
    max_new_tokens: int = option(32, "tokens generated per text sample")
    hellaswag_every: int = option(0, "HellaSwag accuracy every N steps and at the end (0: never)")
    hellaswag_data: str | None = option(
        None, "HellaSwag JSONL (default: download the val set into data/hellaswag/, as eval_hellaswag.py does)"
    )
    hellaswag_limit: int | None = option(None, "score only the first N HellaSwag examples")
    save_every: int = option(5000, "write a checkpoint every N steps (and always at the end; 0: only at the end)")
    keep_last: int = option(0, "keep only the newest N checkpoints (0: keep all)")
    resume: str = option(
        "auto",
        "auto: continue from the newest checkpoint in --out; never: refuse a non-empty --out; "
        "or a checkpoint file to start from",
    )
    tensorboard: str | None = option(
        None, "mirror log.jsonl to TensorBoard event files in DIR (given alone: <out>/tb; needs the [track] extra)",
        bare="", metavar="DIR",
    )  # fmt: skip
    wandb: str | None = option(None, "mirror log.jsonl to this Weights & Biases project (needs [track])",
                               metavar="PROJECT")  # fmt: skip
    wandb_run: str | None = option(None, "the W&B run's display name (default: W&B's)", metavar="NAME")
    peak_tflops: str = option(
        "auto", "device bf16 peak for MFU: auto (known GPUs; measured once on CPU), none, or a number in TFLOP/s"
    )

    def __post_init__(self) -> None:
        positive = ("seq_len", "micro_batch", "batch_tokens", "max_steps", "num_samples", "max_new_tokens")
        non_negative = (
            "warmup_steps",
            "eval_every",
            "val_tokens",
            "sample_every",
            "hellaswag_every",
            "save_every",
            "keep_last",
            "seed",
            "grad_clip",
            "weight_decay",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise UserError(f"{flag(name)} must not be negative, got {getattr(self, name)}")
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "hellaswag_limit"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        if not 0 < self.min_lr <= self.lr:
            raise UserError(f"need 0 < --min-lr <= --lr, got --min-lr {self.min_lr} and --lr {self.lr}")
        if self.warmup_steps > self.max_steps:
            raise UserError(f"--warmup-steps {self.warmup_steps} exceeds --max-steps {self.max_steps}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0):
            raise UserError("AdamW needs 0 <= --beta1, --beta2 < 1 and --eps > 0")
        if self.model not in PRESETS:
            raise UserError(f"unknown --model {self.model!r}; choose one of {', '.join(PRESETS)}")
        if self.device not in DEVICES:
            raise UserError(f"unknown --device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise UserError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.init_from is not None and any(getattr(self, n) is not None for n in ARCH_OVERRIDES):
            raise UserError("--init-from takes the pretrained model's architecture; drop the architecture overrides")
        self.peak_flops()  # validates --peak-tflops
        check_available(wandb=self.wandb is not None, tensorboard=self.tensorboard is not None)
        if self.init_from is None:
            self.model_config()  # validates the architecture (e.g. --n-embd divisible by --n-head)

    def model_config(self) -> GPTConfig:
        """The architecture to train from scratch: the preset, the overrides, the vocabulary padded to 64."""
        overrides = {n: getattr(self, n) for n in ARCH_OVERRIDES if getattr(self, n) is not None}
        try:
            config = GPTConfig.preset(self.model, vocab_multiple=PADDED_VOCAB_MULTIPLE, **overrides)
        except ValueError as e:
            raise UserError(f"invalid architecture: {e}") from None
        return config.limit_vocab(N_VOCAB)  # ids past the tokenizer's would be padding: never predicted

    def tensorboard_dir(self) -> Path | None:
        """Where ``--tensorboard`` writes: its DIR, or ``<out>/tb`` when given alone; None when off."""
        if self.tensorboard is None:
            return None
        return Path(self.tensorboard) if self.tensorboard else Path(self.out) / "tb"

    def use_compile(self, device_type: str) -> bool:
        return self.compile if self.compile is not None else device_type == "cuda"

    def peak_flops(self) -> float | str | None:
        """``--peak-tflops`` as FLOP/s, ``"auto"``, or None (no MFU)."""
        if self.peak_tflops in ("auto", "none"):
            return None if self.peak_tflops == "none" else "auto"
        try:
            value = float(self.peak_tflops)
        except ValueError:
            value = -1.0
        if value <= 0:
            raise UserError(f"--peak-tflops must be auto, none or a positive number, got {self.peak_tflops!r}")
        return value * 1e12

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ARCH_OVERRIDES = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")
