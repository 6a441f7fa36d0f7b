"""The GPT model: pre-norm transformer blocks with causal flash attention (SDPA).

By default it is exactly OpenAI's GPT-2 (learned positions, LayerNorm, GELU, tied head, biases). The fields
of ``GPTConfig`` (``gpt2.config``) after ``vocab_multiple`` switch on the modern block one piece at a time (rotary
positions, RMSNorm, QK-norm, ReLU², an untied head, zero-initialised output projections, a logit soft-cap, no
biases); ``--recipe modern`` turns them all on. Parameter names follow GPT-2 as Hugging Face spells them
(``transformer.h.0.attn.c_attn``...), so GPT-2 weights move in and out with nothing but a transpose of the
Conv1D matrices (see ``gpt2.hf``).

The fields after ``bias`` add the speedrun's second generation, each off by default: separate q/k/v matrices,
attention within documents only, short/long attention windows per layer, value embeddings, U-net skips, the x0
mix (each block's input mixed, with learned weights, with the embedding) and the smear (each embedding plus a
gated share of the previous token's).
Document and window masks are built once per forward pass and shared by the layers (see ``attention_masks``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from gpt2.config import GPTConfig
from gpt2.loss import IGNORE_INDEX, fused_cross_entropy

VE_GATE_CHANNELS = 12  # a value embedding's gate reads this many channels of the attention input (nanochat)
SMEAR_GATE_CHANNELS = 24  # the smear's gate reads this many channels of the token's embedding (nanochat)
# How a masked (document or windowed) forward without a caller's mask attends: "auto" takes flex_attention where
# it is fast (under torch.compile on CUDA) and an SDPA boolean mask elsewhere (see bench/bench_masks.py);
# "sdpa" and "flex" force one (tests and benchmarks).
MASKED_ATTENTION = "auto"
FLEX_DEVICES = ("cuda",)  # where "auto" compiles flex_attention


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


Mask = torch.Tensor | BlockMask | None  # see attend()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask) -> torch.Tensor:
    """Attention of ``(B, n_head, T, head_dim)`` queries, keys and values under ``mask``: None is plain causal
    attention, a boolean ``(B, 1, T, T)`` tensor says where a query may attend (True), a flex_attention
    ``BlockMask`` says the same in blocks, so that a compiled kernel skips the blocks nobody sees."""
    if mask is None:
        # is_causal lets SDPA pick a flash/memory-efficient kernel and skip the masked half; no mask buffer.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if isinstance(mask, BlockMask):
        return flex_attention(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, value_embed: bool = False) -> None:
        super().__init__()
        self.n_head, self.qk_norm, self.split_qkv = config.n_head, config.qk_norm, config.split_qkv
        C = config.n_embd
        if config.split_qkv:  # three matrices, which Muon orthogonalises one by one (as nanochat and the speedrun)
            self.c_q, self.c_k, self.c_v = (nn.Linear(C, C, bias=config.bias) for _ in range(3))
        else:
            self.c_attn = nn.Linear(C, 3 * C, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(C, C, bias=config.bias)
        self.c_proj.residual_out = True
        if value_embed:  # one gate per head, from the first channels of the input; 2 * sigmoid(0) = 1 at init
            self.ve_gate = nn.Linear(min(VE_GATE_CHANNELS, C), config.n_head, bias=False)
            self.ve_gate.gate = True

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: Mask = None,
        ve: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        if self.split_qkv:
            q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        else:
            q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, T, n_head, head_dim)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in (q, k, v))
        if ve is not None:  # value embedding: token identity added straight to the values, gated per head
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))  # (B, T, n_head)
            v = v + (gate.unsqueeze(-1) * ve.view_as(v)).to(v.dtype)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, n_head, T, head_dim)
        if self.qk_norm:  # unit-RMS queries and keys keep the attention logits bounded as weights grow
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        y = attend(q, k, v, mask)
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
    def __init__(self, config: GPTConfig, value_embed: bool = False) -> None:
        super().__init__()
        self.ln_1 = norm_layer(config)
        self.attn = CausalSelfAttention(config, value_embed)
        self.ln_2 = norm_layer(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: Mask = None,
        ve: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, mask, ve)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------------------------------------------
# Attention masks: which keys a query sees, built once per forward pass for each distinct window of the layers.


def same_document(idx: torch.Tensor, pos: torch.Tensor, visible: torch.Tensor, eot_id: int) -> torch.Tensor:
    """``(B, 1, T, T)``: where a key belongs to the query's document, given what the query already sees
    (``visible``, ``(B, 1, T, T)``) and the positions ``pos`` ``(B, T)``. A query's document starts at the latest
    ``eot_id`` token it sees (position 0 if none), and the key must not lie before that start. Stated with
    ``visible`` and ``pos``, this holds in the scorer's packed rows too, where a continuation follows the context
    but not the continuations packed before it."""
    is_start = visible & (idx == eot_id)[:, None, None, :]
    start = torch.where(is_start, pos[:, None, None, :], 0).amax(dim=-1, keepdim=True)  # (B, 1, T, 1)
    return pos[:, None, None, :] >= start


def within_window(pos: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, 1, T, T)``: keys fewer than ``window`` positions behind the query (the query itself included)."""
    distance = pos[:, None, :, None] - pos[:, None, None, :]  # query position - key position
    return distance < window


def flex_block_mask(docs: torch.Tensor | None, window: int | None, B: int, T: int, device: torch.device) -> BlockMask:
    """The causal (+ document, + window) mask as a flex_attention BlockMask; ``docs`` ``(B, T)`` numbers each
    token's document (None: no document mask)."""

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202 (flex passes index tensors)
        keep = q_idx >= kv_idx
        if docs is not None:
            keep = keep & (docs[b, q_idx] == docs[b, kv_idx])
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        return keep

    return create_block_mask(mask_mod, B if docs is not None else None, None, T, T, device=device)


def use_flex(idx: torch.Tensor) -> bool:
    """Whether the training forward attends through flex_attention (see ``MASKED_ATTENTION``)."""
    if MASKED_ATTENTION != "auto":
        return MASKED_ATTENTION == "flex"
    # Eager flex_attention materialises every score (SDPA's masked kernels are faster), and on CPU it has no
    # backward (torch 2.13): flex only where torch.compile turns it into a kernel that skips masked blocks.
    return torch.compiler.is_compiling() and idx.device.type in FLEX_DEVICES


class GPT(nn.Module):
    """Token embeddings (+ learned positions, or rotary ones inside attention), ``n_layer`` blocks, a final norm
    and the LM head (tied to the token embedding in GPT-2)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        positions = (
            {"rotary": Rotary(config)} if config.rope_theta else {"wpe": nn.Embedding(config.block_size, config.n_embd)}
        )
        ve_layers = config.value_embed_layers
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                **positions,
                h=nn.ModuleList(Block(config, i in ve_layers) for i in range(config.n_layer)),
                ln_f=norm_layer(config),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        else:
            self.lm_head.residual_out = True  # zero-initialised with the output projections (zero_init)
        if config.value_embeds:  # token -> value tables, each shared by an early and a late layer (speedrun)
            self.value_embeds = nn.ModuleList(
                nn.Embedding(config.padded_vocab_size, config.n_embd) for _ in range(config.value_embeds)
            )
        if config.unet_skips:  # weight of block i's output in the input of block n_layer - 1 - i (speedrun)
            self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2))
        if config.smear:  # a direct path for the previous token, closed at init (lambda 0)
            self.smear_gate = nn.Linear(min(SMEAR_GATE_CHANNELS, config.n_embd), 1, bias=False)
            self.smear_gate.gate = True
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.x0_mix:  # every block also sees the embedding directly, with its own weights (nanochat)
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.full((config.n_layer,), 0.1))
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
            if getattr(module, "gate", False):  # gates start neutral
                nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, tied weights once; ``non_embedding`` leaves out the lookup tables (position
        embeddings, value embeddings, and the token embedding when the head is untied), which cost no matmul
        FLOPs."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
            if self.config.value_embeds:
                n -= sum(table.weight.numel() for table in self.value_embeds)
        return n

    def attention_masks(
        self, idx: torch.Tensor, pos: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> dict[int | None, Mask]:
        """``{window: mask}`` for each distinct window of the layers (None: the full context).

        With neither a document mask nor windows nor a caller's ``attn_mask``, every layer is plain causal (None):
        GPT-2's and modern-v1's computation, unchanged. A caller's boolean ``attn_mask`` (the scorer's packed rows)
        is composed with the document mask and the windows, both read through ``pos``.
        """
        cfg = self.config
        windows = set(cfg.windows)
        if attn_mask is None and not cfg.doc_mask and windows == {None}:
            return {None: None}
        B, T = idx.shape
        if attn_mask is None and use_flex(idx):
            docs = (idx == cfg.eot_id).cumsum(dim=1) if cfg.doc_mask else None
            return {w: flex_block_mask(docs, w, B, T, idx.device) for w in windows}
        pos = pos.expand(B, T)
        if attn_mask is not None:
            mask = attn_mask & same_document(idx, pos, attn_mask, cfg.eot_id) if cfg.doc_mask else attn_mask
        else:
            mask = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()[None, None]  # (1, 1, T, T)
            if cfg.doc_mask:  # the same as same_document() in an unpacked row, without a (B, T, T) int temporary
                docs = (idx == cfg.eot_id).cumsum(dim=1)  # (B, T): the number of the document of each token
                mask = mask & (docs[:, None, :, None] == docs[:, None, None, :])
        return {w: mask if w is None else mask & within_window(pos, w) for w in windows}

    def hidden(
        self, idx: torch.Tensor, pos: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final hidden states ``(B, T, n_embd)`` of token ids ``idx`` ``(B, T)``: embeddings, blocks, final norm.

        By default token ``t`` sits at position ``t`` and attends causally (within its document, and within
        its layer's window, where the config says so). A scorer that packs several sequences into one row passes
        each token's position ``pos`` ``(B, T)`` and a boolean ``attn_mask`` ``(B, 1, T, T)`` (True: may attend)
        instead; document masks and windows apply on top of it. This is the only forward pass there is.
        """
        cfg = self.config
        T = idx.size(1)
        if pos is None:
            if T > cfg.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than the model's block size {cfg.block_size}")
            pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x, rope = self.transformer.wte(idx), None
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)
        else:
            rope = self.transformer.rotary(pos)
        if cfg.norm == "rmsnorm":
            x = F.rms_norm(x, (x.size(-1),))
        if cfg.smear:
            x = self.smeared(x, idx, pos, attn_mask)
        masks = self.attention_masks(idx, pos, attn_mask)
        tables = [table(idx) for table in self.value_embeds] if cfg.value_embeds else []
        ve_layers, windows, n = cfg.value_embed_layers, cfg.windows, cfg.n_layer
        n_skips = n // 2 if cfg.unet_skips else 0
        skips = []  # U-net: the outputs of the first n_skips blocks, fed to their mirror images
        x0 = x
        for i, block in enumerate(self.transformer.h):
            if i >= n - n_skips:
                x = x + self.skip_weights[n - 1 - i] * skips.pop()
            if cfg.x0_mix:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x = block(x, rope, masks[windows[i]], tables[ve_layers[i]] if i in ve_layers else None)
            if i < n_skips:
                skips.append(x)
        return self.transformer.ln_f(x)

    def smeared(
        self, x: torch.Tensor, idx: torch.Tensor, pos: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embeddings ``x`` with ``lambda * sigmoid(gate(x_t)) * x_prev`` added to each: a bigram path that needs no
        attention. ``x_prev`` is the token before in the row, or in a packed row (``attn_mask``, as ``hidden`` takes
        it) the one the token may attend to at the position before its own. The first token of a sequence has none,
        nor, with document masks, the first token of a document."""
        B, T, C = x.shape
        if attn_mask is None:
            prev, first = F.pad(x[:, :-1], (0, 0, 1, 0)), (pos == 0).expand(B, T)
        else:  # e.g. the scorer's: each continuation follows its context, not the continuation packed before it
            pos = pos.expand(B, T)
            before = attn_mask[:, 0] & (pos[:, None, :] == pos[:, :, None] - 1)  # (B, T, T): [b, t, j]
            prev = torch.gather(x, 1, before.int().argmax(-1, keepdim=True).expand(B, T, C))
            first = ~before.any(-1)
        if self.config.doc_mask:
            first = first | (idx == self.config.eot_id)
        prev = prev * ~first[..., None]  # (B, T, C)
        gate = torch.sigmoid(self.smear_gate(x[..., : self.smear_gate.in_features]))  # (B, T, 1)
        return x + self.smear_lambda * gate * prev

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
        6N for the matmuls with the weights (lookup tables excluded), plus 12·H·Q·T for attention scores and
        values in each layer, where a layer with a window of W keys attends over min(W, T) of them (as nanochat
        counts). Document masks are left out: what they save depends on the data."""
        cfg = self.config
        keys = sum(min(window or seq_len, seq_len) for window in cfg.windows)
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_head * cfg.head_dim * keys
