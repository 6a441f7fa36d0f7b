"""The language-model loss without materialising the logits: the output projection, the optional logit soft-cap
and the cross-entropy fused, row chunk by row chunk.

Computed the plain way, ``F.cross_entropy(lm_head(h)[..., :V].float(), y)`` holds a (tokens x vocabulary) bf16
logit tensor, an fp32 copy of it and a gradient of the same size (13 GB at GPT-2 124M with 64 x 1024 tokens per
micro-step), and the slice past the padded rows is a strided view that log-softmax handles slowly. Here each
chunk of rows computes its logits against the first ``V`` rows of the head only, the softmax in fp32, the loss,
and at once (when a gradient is wanted) the chunk's gradients with respect to the hidden states and the head
weight, which is all backward needs: the largest temporary is one chunk's (rows x vocabulary) fp32 block.

The matmuls run in the dtype autocast would use (bf16 under bf16 autocast), the softmax in fp32: each logit is
rounded once, as in the plain computation. Sums over chunks change the order of fp32 additions, so results
agree with the plain computation to rounding, not bit for bit (``GPT.forward`` keeps the plain computation for
fp32 runs without a soft-cap, which the previous release's checkpoints and losses are tested against).
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -1  # the targets of padding rows
# Rows per chunk. With gradients every chunk also adds into the (vocabulary x C) fp32 weight gradient, so chunks
# are few and large; without, nothing accumulates, and a (128 x vocabulary) fp32 block stays in the CPU's cache
# through the softmax's passes over it (2.3x faster than 1,024 rows at 64 wide, measured; bench/bench_val.py).
GRAD_CHUNK_ROWS = 1024
LOSS_CHUNK_ROWS = 128


def fused_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    softcap: float = 0.0,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``softcap * tanh((h @ weight[:vocab_size].T) / softcap)`` (no cap when 0) against
    ``targets`` (``IGNORE_INDEX`` skipped), for hidden states ``h`` (..., C) and a head ``weight`` (rows >= V, C).

    Whether gradients are computed is decided here, from grad mode, before any autograd function is entered:
    inside one, ``needs_input_grad`` follows ``requires_grad`` and would say yes under ``torch.no_grad()`` too,
    so a validation pass would pay for the gradients of every chunk (3x the time of the loss alone)."""
    dtype = torch.get_autocast_dtype("cpu" if h.device.type == "cpu" else h.device.type)
    compute_dtype = dtype if torch.is_autocast_enabled(h.device.type) else h.dtype
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    rows = chunk_rows or (GRAD_CHUNK_ROWS if need_grad else LOSS_CHUNK_ROWS)
    args = (h.reshape(-1, h.size(-1)), weight, targets.reshape(-1), vocab_size, softcap, rows, compute_dtype)
    with torch.autocast(h.device.type, enabled=False):
        if need_grad:
            return _FusedCrossEntropy.apply(*args)
        loss, _, _ = _chunked_loss(*args, need_grad=False)
        return loss


def _chunked_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    softcap: float,
    chunk_rows: int,
    compute_dtype: torch.dtype,
    *,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The mean loss over the rows of ``h`` (N, C), and with ``need_grad`` its gradients with respect to ``h`` and
    ``weight``, chunk by chunk of ``chunk_rows`` rows."""
    w = weight[:vocab_size].to(compute_dtype)  # the padded rows never enter the softmax
    hc = h.to(compute_dtype)
    valid = targets != IGNORE_INDEX
    count = valid.sum().clamp(min=1)
    loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if need_grad else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_grad else None
    rows_index = torch.arange(min(chunk_rows, h.size(0)), device=h.device)
    for start in range(0, h.size(0), chunk_rows):
        rows = slice(start, start + chunk_rows)
        h_chunk, y, keep = hc[rows], targets[rows].clamp(min=0), valid[rows]
        # Each pass over the (rows x vocabulary) fp32 block costs about as much as a matmul here, so the
        # softmax is written to make as few passes as it can, in place, into one extra buffer.
        z = (h_chunk @ w.T).float()
        if softcap:
            t = z.mul_(1.0 / softcap).tanh_()  # z now holds tanh(z / cap); the capped logits are cap * t
            picked = t.gather(1, y.unsqueeze(1)).squeeze(1) * softcap
            # |capped logit| <= cap, so for caps up to 80 exp cannot overflow in fp32: no max to subtract.
            shift = torch.full_like(picked, softcap if softcap > 80 else 0.0)
            e = torch.mul(t, softcap)
            e = (e.sub_(softcap) if softcap > 80 else e).exp_()
        else:
            picked = z.gather(1, y.unsqueeze(1)).squeeze(1)
            shift = z.amax(dim=1)
            e = z.sub_(shift.unsqueeze(1)).exp_()
        total = e.sum(dim=1)
        loss_sum += ((shift + total.log() - picked) * keep).sum()
        if need_grad:
            # d loss / d logits = (softmax - onehot(y)) / count on the rows that count, 0 on the others
            scale = keep / count
            dz = e.mul_((scale / total).unsqueeze(1))
            dz[rows_index[: len(y)], y] -= scale
            if softcap:  # through the cap: d(c tanh(x / c))/dx = 1 - tanh^2, i.e. dz -= dz * t^2
                dz.addcmul_(dz, t.square_(), value=-1.0)
            dz = dz.to(compute_dtype)
            grad_h[rows] = (dz @ w).to(h.dtype)
            grad_w[:vocab_size] += (dz.T @ h_chunk).float()
    return loss_sum / count, grad_h, None if grad_w is None else grad_w.to(weight.dtype)


class _FusedCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and the gradients of ``h`` and ``weight`` at once; backward scales them by the
    incoming gradient."""

    @staticmethod
    def forward(ctx: Any, *args: Any) -> torch.Tensor:  # type: ignore[override]
        loss, grad_h, grad_w = _chunked_loss(*args, need_grad=True)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None, None, None
