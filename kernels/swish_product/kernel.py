"""swish(gate) * up in Triton, saving only gate and up: one elementwise pass forward and one backward.

Arithmetic in fp32, results rounded once to the inputs' dtype (PyTorch's silu-then-multiply rounds twice in
bf16). Backward: d up = dy * swish(gate); d gate = dy * up * s * (1 + gate * (1 - s)), s = sigmoid(gate).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import cdiv, launch

BLOCK = 2048


@triton.jit
def _swish_product_fwd_kernel(gate_ptr, up_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swish_product_bwd_kernel(gate_ptr, up_ptr, dy_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(gate)
    tl.store(dup_ptr + offsets, (dy * gate * s).to(dup_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_ptr + offsets, (dy * up * s * (1 + gate * (1 - s))).to(dgate_ptr.dtype.element_ty), mask=mask)


class SwishProductTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        y = torch.empty_like(gate)
        n = gate.numel()
        launch(_swish_product_fwd_kernel, (cdiv(n, BLOCK),), (gate, up, y, n), BLOCK=BLOCK, num_warps=8)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        launch(_swish_product_bwd_kernel, (cdiv(n, BLOCK),), (gate, up, dy.contiguous(), dgate, dup, n),
               BLOCK=BLOCK, num_warps=8)
        return dgate, dup


def swish_product(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """swish(gate) * up for two contiguous tensors of one shape and dtype."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swish_product: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} "
                         f"{up.dtype} must match")
    return SwishProductTritonFunction.apply(gate.contiguous(), up.contiguous())
