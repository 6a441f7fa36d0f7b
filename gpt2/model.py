"""The GPT model: pre-norm transformer blocks with causal flash attention (SDPA).

By default it is exactly OpenAI's GPT-2 (learned positions, LayerNorm, GELU, tied head, biases). The fields
of ``GPTConfig`` (``gpt2.config``) after ``vocab_multiple`` switch on the modern block one piece at a time (rotary
positions, RMSNorm, QK-norm, ReLU², an untied head, zero-initialised output projections, a logit soft-cap, no
biases); ``--recipe modern`` turns them all on. Parameter names follow GPT-2 as Hugging Face spells them
(``transformer.h.0.attn.c_attn``...), so GPT-2 weights move in and out with nothing but a transpose of the
Conv1D matrices (see ``gpt2.hf``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F

from gpt2.config import GPTConfig
from gpt2.loss import IGNORE_INDEX, fused_cross_entropy


class RMSNorm(nn.Module):
    """x / rms(x), with no learnable gain or bias (as in modded-nanogpt and nanochat)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),))


def norm_layer(config: GPTConfig) -> nn.Module:
    return nn.LayerNorm(config.n_embd, bias=config.bias) if config.norm == "layernorm" else RMSNorm()


class Rotary(nn.Module):
    """Rotary position embeddings (RoFormer): each pair of channels (i, i + head_dim/2) of a query or key at
    position p is rotated by the angle p * theta^(-2i / head_dim), so attention scores depend on p_q - p_k."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        inv_freq = config.rope_theta ** (-torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim)
        angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq)  # (block, hd/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at positions ``pos`` ((T,) or (B, T)), shaped to broadcast over (B, n_head, T, hd/2)."""
        cos, sin = self.cos[pos], self.sin[pos]
        return (cos, sin) if pos.dim() == 1 else (cos.unsqueeze(1), sin.unsqueeze(1))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.qk_norm = config.n_head, config.qk_norm
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_out = True

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:  # unit-RMS queries and keys keep the attention logits bounded as weights grow
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
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
        self.relu2 = config.mlp == "relu2"
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(x)
        # GPT-2 was trained with the tanh approximation of GELU (the exact erf form changes the logits);
        # ReLU² is the modded-nanogpt speedrun's cheaper, sparser replacement.
        x = F.relu(x).square() if self.relu2 else F.gelu(x, approximate="tanh")
        return self.c_proj(x)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = norm_layer(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm_layer(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token embeddings (+ learned positions, or rotary ones inside attention), ``n_layer`` blocks, a final norm
    and the LM head (tied to the token embedding in GPT-2)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        positions = (
            {"rotary": Rotary(config)} if config.rope_theta else {"wpe": nn.Embedding(config.block_size, config.n_embd)}
        )
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                **positions,
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=norm_layer(config),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        else:
            self.lm_head.residual_out = True  # zero-initialised with the output projections (zero_init)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_out", False) and module is not self.lm_head:
                # Each block adds two residual branches; scaling keeps the residual stream's variance flat.
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if self.config.zero_init and getattr(module, "residual_out", False):
                # Every block starts as the identity and the head predicts uniformly (modded-nanogpt).
                nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, tied weights once; ``non_embedding`` leaves out the lookup tables (position
        embeddings, and the token embedding when the head is untied), which cost no matmul FLOPs."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

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
        x, rope = self.transformer.wte(idx), None
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)
        else:
            rope = self.transformer.rotary(pos)
        if self.config.norm == "rmsnorm":
            x = F.rms_norm(x, (x.size(-1),))
        for block in self.transformer.h:
            x = block(x, rope, attn_mask)
        return self.transformer.ln_f(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head on hidden states ``h`` (any leading shape), cut to ``vocab_size`` columns (a padded id can
        never be sampled, and never soaks up probability mass), soft-capped when the config says so."""
        logits = self.lm_head(h)[..., : self.config.vocab_size]
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(logits, None)``: logits ``(B, T, vocab_size)`` of token ids ``idx`` ``(B, T)``; or, given ``targets``,
        ``(None, loss)``: the mean cross-entropy (target -1 ignored), without materialising the logits.

        Under autocast, or with a soft-cap, the loss is ``gpt2.loss.fused_cross_entropy``. In plain fp32 it is
        computed the textbook way, which the previous release's losses are reproduced with bit for bit.
        """
        h = self.hidden(idx)
        if targets is None:
            return self.logits(h), None
        cfg = self.config
        if cfg.logit_softcap or torch.is_autocast_enabled(idx.device.type):
            return None, fused_cross_entropy(h, self.lm_head.weight, targets, cfg.vocab_size, cfg.logit_softcap)
        logits = self.logits(h)
        return None, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B:
        6N for the matmuls with the weights, plus 12·L·H·Q·T for attention scores and values."""
        cfg = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
