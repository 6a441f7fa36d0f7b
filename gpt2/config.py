"""Typed configurations: the model's architecture (``GPTConfig``), the training run (``TrainConfig``) and the recipes.

A recipe is a function returning a complete ``TrainConfig``: the block, the optimizer and its rates, the schedule,
the model size. ``train_config(**flags)`` is what ``train.py`` runs: the recipe's config, with the pieces a flag
selects bringing their own defaults (``--model`` its architecture, and for ``demo`` the run that fits it;
``--optimizer`` its learning rate; ``--warmup-frac`` in place of ``--warmup-steps``), then the flags themselves.
Every field ``foo_bar`` is the command-line flag ``--foo-bar`` whose default ``--help`` shows is the recipe's
(``gpt2.cli``), so a run's configuration, its flags and the ``train_config`` saved in its checkpoints all spell
things one way. Nothing here builds a model or touches a tracker: validation is of the values alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from gpt2.cli import flag, option
from gpt2.distributed import DEVICES, DTYPES
from gpt2.errors import UserError
from gpt2.tokenizer import N_VOCAB


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
    # The speedrun's second generation, piece by piece (defaults: off, so the blocks above are unchanged).
    split_qkv: bool = False  # separate query, key and value matrices (c_q, c_k, c_v): Muon orthogonalises each
    doc_mask: bool = False  # a token attends only within its document; a document starts at each eot_id token
    eot_id: int = 50256  # the id that starts a document (GPT-2's <|endoftext|>)
    window_pattern: str = ""  # S (short window) / L (full context) per layer, tiled, the last layer L; "": all L
    short_window: int = 0  # the keys an S layer's query sees, itself included; 0: a quarter of block_size
    value_embeds: int = 0  # k tables of value embeddings, added (gated) to V in the first k and the last k layers
    unet_skips: bool = False  # block i's output is added, with a learned weight, to the input of block n_layer-1-i
    x0_mix: bool = False  # block i's input is a_i x + b_i x0, x0 the first block's input; a_i, b_i learned (nanochat)
    smear: bool = False  # each token's embedding plus a learned, gated share of the previous token's (nanochat)

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
        if not isinstance(self.window_pattern, str) or set(self.window_pattern.upper()) - set("SL"):
            raise ValueError(f"window_pattern is a string of S and L (short, long), got {self.window_pattern!r}")
        if self.short_window < 0 or self.value_embeds < 0 or self.eot_id < 0:
            raise ValueError("short_window, value_embeds and eot_id must not be negative")
        if 2 * self.value_embeds > self.n_layer:
            raise ValueError(
                f"value_embeds={self.value_embeds} tables serve the first and the last {self.value_embeds} layers: "
                f"at most n_layer // 2 = {self.n_layer // 2}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def windows(self) -> list[int | None]:
        """Each layer's attention window: how many keys (itself included) a query may see, None for the full
        context. ``window_pattern`` is tiled over the layers and the last layer always sees the full context
        (as nanochat does), so the output is never limited to the short range."""
        pattern = self.window_pattern.upper() or "L"
        short = self.short_window or max(1, self.block_size // 4)
        windows = [short if pattern[i % len(pattern)] == "S" else None for i in range(self.n_layer)]
        windows[-1] = None
        return windows

    @property
    def value_embed_layers(self) -> dict[int, int]:
        """``{layer: table}``: table ``j`` serves layer ``j`` and layer ``n_layer - value_embeds + j`` (the
        speedrun's 012...012 layout)."""
        k, n = self.value_embeds, self.n_layer
        return {**{j: j for j in range(k)}, **{n - k + j: j for j in range(k)}}

    def gpt2_compatible(self) -> list[str]:
        """What keeps this architecture from being OpenAI's GPT-2 (empty: it is GPT-2)."""
        defaults = GPTConfig()
        return [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name in MODERN_FIELDS + SPEEDRUN_FIELDS and getattr(self, f.name) != getattr(defaults, f.name)
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
# The second generation's switches (not in the v1 recipes; eot_id matters only with doc_mask).
SPEEDRUN_FIELDS = ("split_qkv", "doc_mask", "window_pattern", "short_window", "value_embeds", "unet_skips", "x0_mix",
                   "smear")  # fmt: skip


PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),  # 1558M
    "demo": dict(n_layer=4, n_head=4, n_embd=64, block_size=64),  # 3.5M, mostly embedding: `make demo` on a CPU
}


PADDED_VOCAB_MULTIPLE = 64  # 50257 -> 50304 rows: aligned matmuls on GPUs, never predicted (logits are cut)
OPTIMIZERS = ("adamw", "muon")
DATA_LAYOUTS = ("windows", "documents")
SCHEDULES = ("cosine", "wsd")
PARALLEL = ("ddp", "fsdp")  # how the model is spread over the processes (gpt2.parallel)
ADAMW_LR = 6e-4  # GPT-3 Small's AdamW rate (the hidden matrices under --optimizer adamw)
MUON_LR = 0.02  # torch.optim.Muon's rate for the hidden matrices (the modern recipe's, bench/bench_recipe.py)
SIZE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")  # with the block: the architecture
# Recipe name -> the function returning its complete config (defined below TrainConfig, which they build).
RECIPES: dict[str, Callable[[], TrainConfig]] = {}
# What a preset brings besides its architecture: for the demo's tiny model, a run that fits it on a CPU.
PRESET_RUNS: dict[str, dict[str, int]] = {
    "demo": dict(seq_len=64, micro_batch=16, batch_tokens=2048, max_steps=200, warmup_steps=10, eval_every=50,
                 val_tokens=16384, save_every=50, sample_every=100),
}  # fmt: skip


def int_or_auto(text: str) -> int | None:
    """A ``--micro-batch`` argument: a number, or ``auto`` (None: the largest that fits, found at start)."""
    return None if text == "auto" else int(text)


@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run depends on. The fields without a default are the recipe's: build a config with
    a recipe (``RECIPES``) or ``train_config``, not by hand."""

    data: str = option("data/fineweb_edu10B", "directory of token shards written by prepare_fineweb.py")
    out: str = option("runs/gpt2-124m", "run directory: checkpoints and log.jsonl")
    recipe: str = option(
        "gpt2", "named defaults for every flag below marked 'recipe': gpt2 (GPT-3 Small's recipe: AdamW, cosine) or "
        "modern (Muon, rotary, QK-norm, ReLU², untied head, zero-initialised projections, warmup-stable-decay); "
        "'--recipe NAME --help' shows NAME's defaults", choices=RECIPES,
    )  # fmt: skip
    model: str = option(
        "gpt2", "architecture preset: sets --n-layer, --n-head, --n-embd and --block-size (demo: also a run that "
        "fits it on a CPU: --seq-len, --micro-batch, --batch-tokens, --max-steps, ...)", choices=list(PRESETS),
    )  # fmt: skip
    n_layer: int = option(help="transformer blocks (model)")
    n_head: int = option(help="attention heads (model)")
    n_embd: int = option(help="width of the residual stream (model)")
    block_size: int = option(help="the longest context the model supports (model)")
    vocab_size: int = option(N_VOCAB, "ids the model reads and predicts (the embedding is padded to a multiple of 64)")
    rope_theta: float = option(help="rotary position embeddings with this base; 0: learned positions (recipe)")
    norm: str = option(help="layernorm, or rmsnorm (parameter-free, also on the embedding) (recipe)", choices=NORMS)
    qk_norm: bool = option(help="RMS-normalise queries and keys per head (recipe)")
    mlp: str = option(help="MLP activation: gelu (tanh) or relu2 (recipe)", choices=MLPS)
    tie_embeddings: bool = option(help="the output head shares the token embedding (recipe)")
    zero_init: bool = option(help="zero-initialise the residual output projections and an untied head (recipe)")
    logit_softcap: float = option(help="logits = cap * tanh(logits / cap); 0: off (recipe)")
    bias: bool = option(help="biases in linear layers and LayerNorms (recipe)")
    split_qkv: bool = option(
        help="separate query, key and value matrices, which Muon orthogonalises one by one (recipe)"
    )
    doc_mask: bool = option(help="a token attends only within its document (from its <|endoftext|> on) (recipe)")
    window_pattern: str = option(
        help="attention window per layer: S short, L full context, tiled over the layers (the last always L); "
        "empty: all L (recipe)"
    )
    short_window: int = option(help="the keys an S layer's query sees, itself included; 0: --block-size / 4 (recipe)")
    value_embeds: int = option(
        help="value-embedding tables, each added (gated) to the values of one of the first and one of the last "
        "layers (recipe)"
    )
    unet_skips: bool = option(help="block i's output, with a learned weight, into block n_layer-1-i's input (recipe)")
    x0_mix: bool = option(
        help="block i's input is a_i x + b_i x0, x0 the first block's input (the embedding, RMS-normed in the modern "
        "block), a_i and b_i learned from 1 and 0.1 (recipe)"
    )
    smear: bool = option(
        help="each token's embedding plus lambda * sigmoid(gate) of the previous token's in its sequence (and "
        "document, with --doc-mask); lambda learned from 0, the gate from the token's own first channels (recipe)"
    )
    init_from: str | None = option(None, "start from pretrained weights: a hub id (gpt2 ... gpt2-xl) or a HF directory")
    seq_len: int = option(1024, "tokens per training sequence")
    data_layout: str = option(
        help="training rows: windows of the token stream, or documents: rows that each start at a document, "
        "packed best-fit from a buffer (nanochat) (recipe)", choices=DATA_LAYOUTS,
    )  # fmt: skip
    buffer_docs: int = option(1000, "documents layout: documents in the best-fit buffer")
    micro_batch: int | None = option(
        64, "sequences per forward/backward on each process; auto: the largest that divides the process's share of "
        "the batch and fits in memory, found at start (the results do not depend on it)",
        convert=int_or_auto, metavar="N|auto",
    )  # fmt: skip
    batch_tokens: int = option(524288, "tokens per optimizer step over all processes (2**19, as in GPT-3 Small)")
    max_steps: int = option(19073, "optimizer steps (19073 x 524288 tokens = one epoch of FineWeb-Edu 10B)")
    optimizer: str = option(
        help=f"adamw: AdamW for everything; muon: Muon for the hidden matrices, AdamW for the rest; one other than "
        f"the recipe's brings its own --lr (adamw {ADAMW_LR:g}, muon {MUON_LR:g}; --min-lr keeps its fraction of "
        f"--lr, and AdamW's other groups keep their rates) (recipe)", choices=OPTIMIZERS,
    )  # fmt: skip
    muon_ns_steps: int = option(help="Newton-Schulz steps of Muon's orthogonalisation (recipe)")
    muon_polar_express: bool = option(help="Muon orthogonalises with Polar Express's per-step coefficients (recipe)")
    normuon_beta2: float = option(
        help="NorMuon: each neuron's share of a Muon update divided by the root of an EMA (this beta2) of its mean "
        "square; 0: off (recipe)"
    )
    lr: float = option(help="peak learning rate of the hidden matrices (recipe)")
    embed_lr: float | None = option(help="peak learning rate of the embeddings (recipe; unset: --lr)")
    head_lr: float | None = option(help="peak learning rate of an untied head (recipe; unset: --lr)")
    lr_width: int = option(
        help="the width (--n-embd) at which --embed-lr and --head-lr are meant; at another width both (the "
        "value-embedding tables' with the embedding's) are scaled by sqrt(lr_width / n_embd), as nanochat scales "
        "them; 0: the same at every width (recipe)"
    )
    gains_lr: float | None = option(help="peak learning rate of biases and norm gains (recipe; unset: --lr)")
    min_lr: float = option(help="--lr at the end of the schedule; other groups end at the same fraction (recipe)")
    schedule: str = option(
        help="cosine: warmup then cosine decay; wsd: warmup, constant, linear cooldown (recipe)", choices=SCHEDULES
    )
    warmup_steps: int | None = option(help="steps of linear learning-rate warmup (recipe)")
    warmup_frac: float | None = option(help="warmup as a fraction of --max-steps, in place of --warmup-steps (recipe)")
    cooldown_frac: float = option(help="wsd: the last fraction of --max-steps decays to --min-lr (recipe)")
    weight_decay: float = option(help="decoupled weight decay on matrices and embeddings (recipe)")
    beta1: float = option(help="AdamW beta1 (recipe)")
    beta2: float = option(help="AdamW beta2 (recipe)")
    eps: float = option(help="AdamW epsilon (recipe)")
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
        positive = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "seq_len", "batch_tokens",
                    "max_steps", "num_samples", "max_new_tokens", "lr", "buffer_docs", "muon_ns_steps",
                    "collective_timeout")  # fmt: skip
        non_negative = ("warmup_steps", "eval_every", "val_tokens", "sample_every", "hellaswag_every",
                        "save_every", "keep_last", "seed", "grad_clip", "weight_decay", "min_lr", "rope_theta",
                        "logit_softcap", "short_window", "value_embeds", "normuon_beta2", "lr_width")  # fmt: skip
        for name in positive + ("micro_batch", "embed_lr", "head_lr", "gains_lr", "hellaswag_limit"):  # None: unset
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"{flag(name)} must be positive, got {value}")
        for name in non_negative:
            if (getattr(self, name) or 0) < 0:
                raise UserError(f"{flag(name)} must not be negative, got {getattr(self, name)}")
        for name, allowed in (("recipe", RECIPES), ("model", PRESETS), ("norm", NORMS), ("mlp", MLPS),
                              ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("data_layout", DATA_LAYOUTS),
                              ("parallel", PARALLEL), ("device", DEVICES),
                              ("dtype", DTYPES)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise UserError(f"unknown {flag(name)} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.min_lr > self.lr:
            raise UserError(f"need --min-lr <= --lr, got --min-lr {self.min_lr} and --lr {self.lr}")
        if (self.warmup_steps is None) == (self.warmup_frac is None):
            raise UserError("give the warmup as --warmup-steps or as --warmup-frac, not both")
        if not (0 <= (self.warmup_frac or 0) <= 1 and 0 <= self.cooldown_frac <= 1):
            raise UserError("--warmup-frac and --cooldown-frac are fractions of --max-steps: between 0 and 1")
        if self.warmup() > self.max_steps:
            raise UserError(f"--warmup-steps {self.warmup()} exceeds --max-steps {self.max_steps}")
        if self.normuon_beta2 >= 1:
            raise UserError(f"--normuon-beta2 must be below 1, got {self.normuon_beta2}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0):
            raise UserError("AdamW needs 0 <= --beta1, --beta2 < 1 and --eps > 0")
        if self.init_from is not None and self.architecture() != GPT2_BLOCK:
            raise UserError("--init-from loads OpenAI's GPT-2 architecture; use --recipe gpt2 without block changes")
        self.peak_flops()  # validates --peak-tflops

    def warmup(self) -> int:
        """Warmup steps of this run: ``--warmup-steps``, or ``--warmup-frac`` of ``--max-steps``."""
        return self.warmup_steps if self.warmup_steps is not None else round(self.warmup_frac * self.max_steps)

    def architecture(self) -> dict[str, Any]:
        """The block's switches (rotary, norm, ..., windows, ...) as ``GPTConfig`` fields."""
        return {name: getattr(self, name) for name in BLOCK_FIELDS}

    def model_config(self) -> GPTConfig:
        """The architecture to train from scratch, its vocabulary padded to 64 (the rows past the tokenizer's ids
        are padding: never predicted)."""
        size = {name: getattr(self, name) for name in SIZE_FIELDS}
        try:
            config = GPTConfig(**size, **self.architecture(), vocab_multiple=PADDED_VOCAB_MULTIPLE)
        except ValueError as e:
            raise UserError(f"invalid architecture: {e}") from None
        return config.limit_vocab(N_VOCAB)

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


# ----------------------------------------------------------------------------------------------------------------------
# Recipes and the pieces a flag selects

BLOCK_FIELDS = MODERN_FIELDS + SPEEDRUN_FIELDS  # the block's switches, GPT-2's by default
GPT2_BLOCK = {f.name: f.default for f in fields(GPTConfig) if f.name in BLOCK_FIELDS}
MODERN_BLOCK = dict(rope_theta=10000.0, norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=False,
                    zero_init=True, logit_softcap=0.0, bias=False)  # fmt: skip


def gpt2_recipe() -> TrainConfig:
    """GPT-3 Small's recipe as build-nanogpt runs it on FineWeb-Edu 10B: GPT-2's block (learned positions,
    LayerNorm, GELU, tied head, biases); AdamW (0.9, 0.95, eps 1e-8, weight decay 0.1) at 6e-4 on every group;
    715 warmup steps, then cosine to 10%."""
    return TrainConfig(
        recipe="gpt2", **PRESETS["gpt2"], **GPT2_BLOCK, data_layout="windows", optimizer="adamw", muon_ns_steps=5,
        muon_polar_express=False, normuon_beta2=0.0, lr=ADAMW_LR, embed_lr=None, head_lr=None, lr_width=0,
        gains_lr=None, min_lr=6e-5, schedule="cosine", warmup_steps=715, warmup_frac=None, cooldown_frac=0.4,
        weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8,
    )  # fmt: skip


def modern_v1_recipe() -> TrainConfig:
    """The 2024 subset of the modded-nanogpt speedrun (README "Recipes"; rates from bench/bench_recipe.py):
    rotary, RMSNorm (also on the embedding), QK-norm, ReLU², an untied zero-initialised head, zero-initialised
    output projections, no biases; ``torch.optim.Muon`` at 0.02 for the hidden matrices, AdamW (0.8, 0.95, eps
    1e-10, no weight decay) at 0.3 for the embedding and 0.006 for the head; no warmup, constant, and a linear
    cooldown to 0 over the last 40% of the run. The logit soft-cap is off: at the measured scale it gained nothing
    (val 6.4380 with a cap of 15 vs 6.4385 without, 40% budget) and cost 30% of a CPU step."""
    return replace(
        gpt2_recipe(), recipe="modern-v1", **MODERN_BLOCK, optimizer="muon", lr=MUON_LR, embed_lr=0.3, head_lr=0.006,
        min_lr=0.0, schedule="wsd", warmup_steps=0, weight_decay=0.0, beta1=0.8, eps=1e-10,
    )  # fmt: skip


def modern_recipe() -> TrainConfig:
    """modern-v1 plus the second-generation pieces that lowered its loss at p < 0.05 (seed-paired, 5 seeds where
    the first 3 were close; README "Recipes", bench/bench_recipe.py): Muon with Polar Express coefficients and
    NorMuon's neuron-wise normalisation (beta2 0.95), on q, k and v as three matrices; document-masked attention
    with short/long windows alternating (short: a quarter of the context); then, tuned on that combination, two
    value-embedding tables (the first two and the last two layers: it needs --n-layer >= 4) and the x0 mix. Left
    out as measured: U-net skips and document-aligned rows (worse), the smear, a soft-cap and --lr-width (not
    better at p < 0.05)."""
    return replace(
        modern_v1_recipe(), recipe="modern", muon_polar_express=True, normuon_beta2=0.95, split_qkv=True,
        doc_mask=True, window_pattern="SL", short_window=0, value_embeds=2, x0_mix=True,
    )  # fmt: skip


RECIPES.update({"gpt2": gpt2_recipe, "modern": modern_recipe, "modern-v1": modern_v1_recipe})


def with_model(cfg: TrainConfig, model: str) -> TrainConfig:
    """``cfg`` with the preset's architecture, and the run a preset like ``demo`` brings."""
    if model not in PRESETS:
        raise UserError(f"unknown --model {model!r}; choose one of {', '.join(PRESETS)}")
    return replace(cfg, model=model, **PRESETS[model], **PRESET_RUNS.get(model, {}))


def with_optimizer(cfg: TrainConfig, optimizer: str) -> TrainConfig:
    """``cfg`` with the hidden matrices under ``optimizer`` at that optimizer's own rate; the schedule ends at the
    same fraction of it, and the groups AdamW keeps (embeddings, head, gains) keep the rates they had."""
    if optimizer == cfg.optimizer:
        return cfg
    if optimizer not in OPTIMIZERS:
        raise UserError(f"unknown --optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    lr = {"adamw": ADAMW_LR, "muon": MUON_LR}[optimizer]
    kept = {name: getattr(cfg, name) or cfg.lr for name in ("embed_lr", "head_lr", "gains_lr")}
    return replace(cfg, optimizer=optimizer, lr=lr, min_lr=cfg.min_lr / cfg.lr * lr, **kept)


def train_config(**flags: Any) -> TrainConfig:
    """The configuration of ``train.py`` with these flags (config field names): the recipe's (``recipe``, default
    gpt2), then the pieces the flags select with their own defaults (``model``: the preset; ``optimizer``: its
    rate; ``warmup_frac`` or ``warmup_steps``: the other is unset), then the flags themselves."""
    recipe = flags.get("recipe", "gpt2")
    if recipe not in RECIPES:
        raise UserError(f"unknown --recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    cfg = RECIPES[recipe]()
    if "model" in flags:
        cfg = with_model(cfg, flags["model"])
    if "optimizer" in flags:
        cfg = with_optimizer(cfg, flags["optimizer"])
    if flags.get("init_from") is not None:
        given = [flag(name) for name in ("model", *SIZE_FIELDS) if name in flags]
        if given:
            raise UserError(f"--init-from takes the pretrained model's architecture; drop {', '.join(given)}")
    for given, other in (("warmup_frac", "warmup_steps"), ("warmup_steps", "warmup_frac")):
        if flags.get(given) is not None and other not in flags:
            flags = {**flags, other: None}
    return replace(cfg, **flags)
