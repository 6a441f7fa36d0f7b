"""The GPT-2 model: pre-LayerNorm transformer blocks with causal flash attention (SDPA).

Parameter names follow OpenAI's GPT-2 as Hugging Face spells them (``transformer.h.0.attn.c_attn``...),
so weights move in and out with nothing but a transpose of the Conv1D matrices (see ``gpt2.hf``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    """Architecture of a GPT-2 model.

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

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{f.name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

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

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "demo": dict(n_layer=4, n_head=4, n_embd=64, block_size=64),  # 3.5M, mostly embedding: `make demo` on a CPU
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_scaled_init = True

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if attn_mask is None:
            # is_causal lets SDPA pick a flash/memory-efficient kernel and skip the masked half; no mask buffer.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual_scaled_init = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 was trained with the tanh approximation of GELU; the exact erf form changes the logits.
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: token + position embeddings, ``n_layer`` blocks, final LayerNorm, tied LM head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_scaled_init", False):
                # Each block adds two residual branches; scaling keeps the residual stream's variance flat.
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, tied weights once; ``non_embedding`` drops the position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden(
        self, idx: torch.Tensor, pos: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final hidden states ``(B, T, n_embd)`` of token ids ``idx`` ``(B, T)``: embeddings, blocks, final norm.

        By default token ``t`` sits at position ``t`` and attends causally. A scorer that packs several
        sequences into one row passes each token's position ``pos`` ``(B, T)`` and a boolean ``attn_mask``
        ``(B, 1, T, T)`` (True: may attend) instead; this is the only forward pass there is.
        """
        T = idx.size(1)
        if pos is None:
            if T > self.config.block_size:
                raise ValueError(
                    f"sequence of {T} tokens is longer than the model's block size {self.config.block_size}"
                )
            pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x, attn_mask)
        return self.transformer.ln_f(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head on hidden states ``h`` (any leading shape), cut to ``vocab_size`` columns: a padded
        id can never be sampled, and never soaks up probability mass."""
        return self.lm_head(h)[..., : self.config.vocab_size]

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(B, T, vocab_size)`` for token ids ``idx`` ``(B, T)``, and the mean cross-entropy
        against ``targets`` when given (target -1 is ignored)."""
        logits = self.logits(self.hidden(idx))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B:
        6N for the matmuls with the weights, plus 12·L·H·Q·T for attention scores and values."""
        cfg = self.config
        head_dim = cfg.n_embd // cfg.n_head
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * head_dim * seq_len
