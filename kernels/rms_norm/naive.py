"""The plain-PyTorch RMSNorm the Triton kernels must reproduce (fp32 arithmetic, output in x's dtype)."""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.to(x32.dtype)).to(x.dtype)
