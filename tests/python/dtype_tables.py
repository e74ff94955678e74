"""The dtype tables the op tests share: what each dtype is checked against, and how closely."""

from __future__ import annotations

import torch

# float32/float64 are checked against float64, the half types against float32 (same values).
REF_DTYPE = {
    torch.float64: torch.float64,
    torch.float32: torch.float64,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
}
# Tolerances of the half types against their float32 reference (one rounding of the output).
HALF_TOL = {
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}
FLOATS = [torch.float32, torch.float64]
HALVES = [torch.float16, torch.bfloat16]


def vendor_conv_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether PyTorch's own convolution has fast kernels for dtype on device, as the conv route
    rule expects: cuDNN on CUDA; on the CPU oneDNN, for bfloat16 and float16 only where PyTorch
    says oneDNN supports them on this CPU (its slow fallback runs them elsewhere)."""
    if torch.device(device).type == "cuda":
        return torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return True
