"""The fused, chunked output projection + cross-entropy (``gpt2/loss.py``): equal to the plain computation, with
and without a soft-cap, and free of gradient work when gradients are off."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from gpt2.loss import fused_cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [0.0, 15.0])
def test_fused_loss_equals_the_plain_cross_entropy(dtype, softcap):
    torch.manual_seed(0)
    h = torch.randn(300, 32, requires_grad=True)
    w = (torch.randn(50304, 32) * 0.3).requires_grad_()
    y = torch.randint(0, 50257, (300,))
    y[:7] = -1  # padding rows
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        z = (h @ w.T)[:, :50257].float()
        z = softcap * torch.tanh(z / softcap) if softcap else z
        plain = F.cross_entropy(z, y, ignore_index=-1)
        fused = fused_cross_entropy(h, w, y, 50257, softcap, chunk_rows=64)
    grads = [torch.autograd.grad(loss, (h, w)) for loss in (plain, fused)]
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-5)
    torch.testing.assert_close(fused, plain, **tol)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, **tol)
    assert grads[1][1][50257:].abs().sum() == 0  # the padding rows learn nothing


def test_a_loss_without_gradients_does_no_gradient_work():
    """Under ``torch.no_grad()`` (a validation pass) only the logits' matmul runs: 2·N·C·V FLOPs, not the 6·N·C·V
    of the loss with its gradients, though the inputs require gradients; the value is the same."""
    torch.manual_seed(0)
    n, c, v = 256, 32, 50257
    h = torch.randn(n, c, requires_grad=True)
    w = (torch.randn(50304, c) * 0.3).requires_grad_()
    y = torch.randint(0, v, (n,))

    def flops_and_loss(grad: bool) -> tuple[int, torch.Tensor]:
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            with FlopCounterMode(display=False) as counter:
                loss = fused_cross_entropy(h, w, y, v)
        return counter.get_total_flops(), loss

    with_grad, loss = flops_and_loss(True)
    without_grad, val_loss = flops_and_loss(False)
    assert with_grad == 3 * 2 * n * c * v and without_grad == 2 * n * c * v
    assert not val_loss.requires_grad
    torch.testing.assert_close(val_loss, loss.detach(), rtol=1e-6, atol=0)  # chunked differently: rounding only
