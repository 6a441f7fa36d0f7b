"""Model FLOPs utilization: the FLOPs a training step needs, per second, over what the device can do.

MFU = flops_per_token x tokens/s per device / peak, with the model's 6N + 12·L·H·Q·T FLOPs per token
(``GPT.flops_per_token``) and the device's dense bf16 peak: the datasheet value for known GPUs, otherwise
a peak measured once with a large bf16 matmul (what this machine's BLAS actually reaches).
"""

from __future__ import annotations

import time

import torch

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, in FLOP/s, matched against
# torch.cuda.get_device_name in this order (the PCIe and NVL H100s before the SXM one).
GPU_BF16_PEAK = {
    "A100": 312e12,  # A100 SXM and PCIe: 312 (624 with sparsity)
    "H100 PCIe": 756e12,  # 756 (1,513 with sparsity)
    "H100 NVL": 835e12,  # 835 (1,671 with sparsity), per GPU
    "H100": 989e12,  # H100 SXM ("NVIDIA H100 80GB HBM3"): 989 (1,979 with sparsity)
    "H200": 989e12,  # H200 SXM: 989 (1,979 with sparsity)
    "L4": 121e12,  # 121 (242 with sparsity)
    "A10G": 125e12,  # A10/A10G: 125 (250 with sparsity)
    "RTX 4090": 165e12,  # 165.2 with FP32 accumulate (Ada whitepaper; 330 with sparsity)
}


def datasheet_peak(device: str) -> float | None:
    """The bf16 peak of a known GPU (matched by name), else None (pass ``--peak-tflops`` for others)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((peak for key, peak in GPU_BF16_PEAK.items() if key in name), None)


def measure_matmul_peak(device: str, seconds: float = 2.0, sizes: tuple[int, ...] = (1024, 2048, 4096)) -> float:
    """The best bf16 matmul throughput (FLOP/s) over square sizes, spending about ``seconds`` in all."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        _sync(device)
        a @ b  # warm up the BLAS (thread pool, kernel selection)
        _sync(device)
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / len(sizes) or calls == 0:
            a @ b
            _sync(device)
            calls += 1
        best = max(best, 2 * n**3 * calls / elapsed)
    return best


def device_peak(device: str, setting: float | str | None = "auto") -> float | None:
    """Peak FLOP/s for MFU: ``setting`` if it is a number, None for None, and for ``"auto"`` the datasheet
    value of a known GPU or a measured matmul peak elsewhere."""
    if setting != "auto":
        return setting
    return datasheet_peak(device) or measure_matmul_peak(device)


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float | None) -> float | None:
    """Fraction of ``peak_flops`` used (per device: pass one device's tokens/s); None without a peak."""
    return flops_per_token * tokens_per_s / peak_flops if peak_flops else None


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
