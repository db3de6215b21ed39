"""The plain-PyTorch swish(gate) * up that the Triton kernels reproduce."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swish_product_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
