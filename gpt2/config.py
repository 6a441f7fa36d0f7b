"""The training run's configuration: one typed dataclass whose fields are also ``train.py``'s flags.

Every field ``foo_bar`` is the command-line flag ``--foo-bar`` with the same default (``gpt2.cli``), so a
run's configuration, its flags and the ``train_config`` saved in its checkpoints all spell things one way.
The defaults are the GPT-2 124M recipe of the GPT-3 paper as build-nanogpt runs it on FineWeb-Edu 10B.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from gpt2.cli import flag, option
from gpt2.distributed import DEVICES, DTYPES
from gpt2.errors import UserError
from gpt2.tokenizer import N_VOCAB
from gpt2.tracking import check_available


@dataclass
class GPTConfig:
    """Architecture of a GPT model.

    ``vocab_size`` is the number of ids the model may read, emit and score (50257 for GPT-2 BPE).
    The embedding table is rounded up to a multiple of ``vocab_multiple`` (64 gives 50304, which
    keeps the output matmul aligned on GPUs); the padded rows are never sampled or scored because
    the logits are cut back to ``vocab_size``.
    """

    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_multiple: int = 1
    # The modern block, piece by piece (defaults: GPT-2).
    rope_theta: float = 0.0  # rotary position embeddings with this base (e.g. 10000); 0: learned positions
    norm: str = "layernorm"  # or "rmsnorm": parameter-free RMSNorm, also applied to the token embedding
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    mlp: str = "gelu"  # or "relu2": relu(x)^2
    tie_embeddings: bool = True  # the output head shares the token embedding's weights
    zero_init: bool = False  # zero-initialise the residual output projections (and an untied head)
    logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap); 0: no cap
    bias: bool = True  # biases in the linear layers (and LayerNorms)

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "vocab_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.rope_theta < 0 or self.logit_softcap < 0:
            raise ValueError("rope_theta and logit_softcap must not be negative (0: off)")
        if self.rope_theta and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {self.n_embd // self.n_head}")
        if self.norm not in NORMS or self.mlp not in MLPS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)} and mlp one of {', '.join(MLPS)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def gpt2_compatible(self) -> list[str]:
        """What keeps this architecture from being OpenAI's GPT-2 (empty: it is GPT-2)."""
        defaults = GPTConfig()
        return [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name in MODERN_FIELDS and getattr(self, f.name) != getattr(defaults, f.name)
        ]

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    def limit_vocab(self, n_ids: int) -> GPTConfig:
        """This architecture reading and emitting only ids below ``n_ids`` (the tokenizer's): output rows
        beyond it stay in the weights as padding, never sampled, scored or counted in the softmax. This is
        how a nanoGPT-style ``vocab_size`` of 50304 (padding included) is read."""
        if self.vocab_size <= n_ids:
            return self
        rows = self.padded_vocab_size
        multiple = 64 if rows % 64 == 0 and math.ceil(n_ids / 64) * 64 == rows else rows
        return replace(self, vocab_size=n_ids, vocab_multiple=multiple)

    @classmethod
    def preset(cls, name: str, **overrides: int) -> GPTConfig:
        """The architecture of an OpenAI GPT-2 size (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``), or the
        demo's tiny model (``demo``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, int | float | str | bool]:
        return asdict(self)


NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "relu2")
MODERN_FIELDS = ("rope_theta", "norm", "qk_norm", "mlp", "tie_embeddings", "zero_init", "logit_softcap", "bias")


PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "demo": dict(n_layer=4, n_head=4, n_embd=64, block_size=64),  # 3.5M, mostly embedding: `make demo` on a CPU
}


PADDED_VOCAB_MULTIPLE = 64  # 50257 -> 50304 rows: aligned matmuls on GPUs, never predicted (logits are cut)
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
PARALLEL = ("ddp", "fsdp")  # how the model is spread over the processes (gpt2.parallel)


def int_or_auto(text: str) -> int | None:
    """A ``--micro-batch`` argument: a number, or ``auto`` (None: the largest that fits, found at start)."""
    return None if text == "auto" else int(text)


@dataclass(frozen=True)
class Recipe:
    """A named set of defaults: the block, the optimizer and the schedule. ``None`` learning rates of the
    embeddings, head and gains mean "the same as ``lr``"."""

    rope_theta: float
    norm: str
    qk_norm: bool
    mlp: str
    tie_embeddings: bool
    zero_init: bool
    logit_softcap: float
    bias: bool
    optimizer: str
    lr: float
    embed_lr: float | None
    head_lr: float | None
    gains_lr: float | None
    min_lr: float
    schedule: str
    warmup_steps: int
    warmup_frac: float | None
    cooldown_frac: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float

    def architecture(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in MODERN_FIELDS}


RECIPES = {
    # GPT-3 Small's recipe as build-nanogpt runs it on FineWeb-Edu: GPT-2's block, AdamW, warmup + cosine to 10%.
    "gpt2": Recipe(
        rope_theta=0.0, norm="layernorm", qk_norm=False, mlp="gelu", tie_embeddings=True, zero_init=False,
        logit_softcap=0.0, bias=True, optimizer="adamw", lr=6e-4, embed_lr=None, head_lr=None, gains_lr=None,
        min_lr=6e-5, schedule="cosine", warmup_steps=715, warmup_frac=None, cooldown_frac=0.4, weight_decay=0.1,
        beta1=0.9, beta2=0.95, eps=1e-8,
    ),
    # The modded-nanogpt speedrun's main ingredients (see README "Two recipes"; rates from bench/bench_recipe.py).
    "modern": Recipe(
        # The logit soft-cap is off: at the measured scale it gained nothing (val 6.4380 with a cap of 15 vs 6.4385
        # without, 40% budget) and cost 30% of a CPU step (a tanh over every logit); --logit-softcap 15 turns it on.
        rope_theta=10000.0, norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=False, zero_init=True,
        logit_softcap=0.0, bias=False, optimizer="muon", lr=0.02, embed_lr=0.3, head_lr=0.006, gains_lr=None,
        min_lr=0.0, schedule="wsd", warmup_steps=0, warmup_frac=0.0, cooldown_frac=0.4, weight_decay=0.0,
        beta1=0.8, beta2=0.95, eps=1e-10,
    ),
}  # fmt: skip
RECIPE_FIELDS = tuple(f.name for f in fields(Recipe) if f.name not in ("warmup_steps", "warmup_frac"))


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``None`` means "the model's or device's own value"."""

    data: str = option("data/fineweb_edu10B", "directory of token shards written by prepare_fineweb.py")
    out: str = option("runs/gpt2-124m", "run directory: checkpoints and log.jsonl")
    recipe: str = option(
        "gpt2", "named defaults: gpt2 (GPT-3 Small's recipe: AdamW, cosine) or modern (Muon, rotary, QK-norm, ReLU², "
        "untied head, zero-initialised projections, warmup-stable-decay); a flag marked 'recipe' overrides one piece",
        choices=list(RECIPES),
    )  # fmt: skip
    model: str = option("gpt2", "architecture preset (size)", choices=list(PRESETS))
    n_layer: int | None = option(None, "override the preset's number of layers")
    n_head: int | None = option(None, "override the preset's number of attention heads")
    n_embd: int | None = option(None, "override the preset's width")
    vocab_size: int | None = option(
        None, "override the vocabulary size (GPT-2 BPE: 50257; the embedding is padded to a multiple of 64)"
    )
    block_size: int | None = option(None, "override the context length the model supports (preset: 1024)")
    rope_theta: float | None = option(None, "rotary position embeddings with this base; 0: learned positions (recipe)")
    norm: str | None = option(None, "layernorm or rmsnorm (parameter-free, also on the embedding) (recipe)",
                              choices=NORMS)  # fmt: skip
    qk_norm: bool | None = option(None, "RMS-normalise queries and keys per head (recipe)")
    mlp: str | None = option(None, "MLP activation: gelu (tanh) or relu2 (recipe)", choices=MLPS)
    tie_embeddings: bool | None = option(None, "the output head shares the token embedding (recipe)")
    zero_init: bool | None = option(None, "zero-initialise the residual output projections and an untied head (recipe)")
    logit_softcap: float | None = option(None, "logits = cap * tanh(logits / cap); 0: off (recipe)")
    bias: bool | None = option(None, "biases in linear layers and LayerNorms (recipe)")
    init_from: str | None = option(None, "start from pretrained weights: a hub id (gpt2 ... gpt2-xl) or a HF directory")
    seq_len: int = option(1024, "tokens per training sequence")
    micro_batch: int | None = option(
        64, "sequences per forward/backward on each process; auto: the largest that divides the process's share of "
        "the batch and fits in memory, found at start (the results do not depend on it)",
        convert=int_or_auto, metavar="N|auto",
    )  # fmt: skip
    batch_tokens: int = option(524288, "tokens per optimizer step over all processes (2**19, as in GPT-3 Small)")
    max_steps: int = option(19073, "optimizer steps (19073 x 524288 tokens = one epoch of FineWeb-Edu 10B)")
    optimizer: str | None = option(
        None, "adamw: AdamW for everything; muon: Muon for the hidden matrices, AdamW for the rest (recipe)",
        choices=OPTIMIZERS,
    )  # fmt: skip
    lr: float | None = option(None, "peak learning rate of the hidden matrices (recipe: gpt2 6e-4, modern 0.02)")
    embed_lr: float | None = option(None, "peak learning rate of the embeddings (recipe: gpt2 --lr, modern 0.3)")
    head_lr: float | None = option(None, "peak learning rate of an untied head (recipe: gpt2 --lr, modern 0.006)")
    gains_lr: float | None = option(None, "peak learning rate of biases and norm gains (recipe: --lr, modern 0.02)")
    min_lr: float | None = option(
        None, "--lr at the end of the schedule; other groups end at the same fraction (recipe: 6e-5, modern 0)"
    )
    schedule: str | None = option(
        None, "cosine: warmup then cosine decay; wsd: warmup, constant, linear cooldown (recipe)", choices=SCHEDULES
    )
    warmup_steps: int | None = option(None, "steps of linear learning-rate warmup (recipe: gpt2 715)")
    warmup_frac: float | None = option(None, "warmup as a fraction of --max-steps, unless --warmup-steps (modern 0)")
    cooldown_frac: float | None = option(None, "wsd: the last fraction of --max-steps decays to --min-lr (0.4)")
    weight_decay: float | None = option(None, "decoupled weight decay on matrices and embeddings (recipe: 0.1, 0)")
    beta1: float | None = option(None, "AdamW beta1 (recipe: 0.9, modern 0.8)")
    beta2: float | None = option(None, "AdamW beta2 (recipe: 0.95)")
    eps: float | None = option(None, "AdamW epsilon (recipe: 1e-8, modern 1e-10)")
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
    activation_checkpointing: bool = option(
        False, "recompute each block's activations during backward instead of keeping them: the same results "
        "with less activation memory, for about one more forward pass of compute"
    )  # fmt: skip
    parallel: str = option(
        "ddp", "ddp: every process holds the whole model, gradients and optimizer state; fsdp: they are sharded over "
        "the processes (FSDP2), checkpoints are sharded directories (torch.distributed.checkpoint)", choices=PARALLEL,
    )  # fmt: skip
    collective_timeout: float = option(
        1800.0, "seconds a collective waits for the other processes before the job fails (a process that stopped "
        "answering ends the job instead of hanging it)"
    )  # fmt: skip

    def __post_init__(self) -> None:
        self._apply_recipe()
        positive = ("seq_len", "batch_tokens", "max_steps", "num_samples", "max_new_tokens", "collective_timeout")
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
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "hellaswag_limit", "micro_batch"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("lr", "embed_lr", "head_lr", "gains_lr"):
            if getattr(self, name) <= 0:
                raise UserError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"need 0 <= --min-lr <= --lr, got --min-lr {self.min_lr} and --lr {self.lr}")
        if not (0 <= (self.warmup_frac or 0) <= 1 and 0 <= self.cooldown_frac <= 1):
            raise UserError("--warmup-frac and --cooldown-frac are fractions of --max-steps: between 0 and 1")
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
        if self.parallel not in PARALLEL:
            raise UserError(f"unknown --parallel {self.parallel!r}; choose one of {', '.join(PARALLEL)}")
        if self.init_from is not None and any(getattr(self, n) is not None for n in ARCH_OVERRIDES):
            raise UserError("--init-from takes the pretrained model's architecture; drop the architecture overrides")
        if self.init_from is not None and self.architecture() != RECIPES["gpt2"].architecture():
            raise UserError("--init-from loads OpenAI's GPT-2 architecture; use --recipe gpt2 without block changes")
        self.peak_flops()  # validates --peak-tflops
        check_available(wandb=self.wandb is not None, tensorboard=self.tensorboard is not None)
        if self.init_from is None:
            self.model_config()  # validates the architecture (e.g. --n-embd divisible by --n-head)

    def _apply_recipe(self) -> None:
        """Fill every field left at None with the recipe's value (warmup: steps, or a fraction of the run)."""
        if self.recipe not in RECIPES:
            raise UserError(f"unknown --recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        recipe = RECIPES[self.recipe]
        for name in RECIPE_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, getattr(recipe, name))
        for name in ("embed_lr", "head_lr", "gains_lr"):  # None in a recipe: the same as --lr
            if getattr(self, name) is None:
                setattr(self, name, self.lr)
        if self.warmup_steps is None:
            self.warmup_steps = (
                recipe.warmup_steps if self.warmup_frac is None else round(self.warmup_frac * self.max_steps)
            )

    def architecture(self) -> dict[str, Any]:
        """The block's switches (rotary, norm, ...) as ``GPTConfig`` fields."""
        return {name: getattr(self, name) for name in MODERN_FIELDS}

    def model_config(self) -> GPTConfig:
        """The architecture to train from scratch: the preset, the overrides, the recipe's block, the vocabulary
        padded to 64."""
        overrides = {n: getattr(self, n) for n in ARCH_OVERRIDES if getattr(self, n) is not None}
        try:
            config = GPTConfig.preset(
                self.model, vocab_multiple=PADDED_VOCAB_MULTIPLE, **overrides, **self.architecture()
            )
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
