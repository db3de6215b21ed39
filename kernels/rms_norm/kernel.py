"""RMSNorm in Triton: one row per step, fp32 arithmetic, saving the input and one fp32 scale per row.

Forward y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps). Backward, with x^ = x * rstd and
g = dy * w: dx = rstd * (g - x^ * mean(g * x^)), dw = sum over rows of dy * x^ (per-program partial sums in
fp32, added up in torch). Each is one pass over the rows: the PyTorch version takes about ten elementwise
kernels for the backward (docs/perf.md, "Training").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import cdiv, launch, next_power_of_2

ROWS_PER_PROGRAM = 16  # backward: rows per program, so the weight-gradient partials stay few


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, eps, N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(y_ptr + row * N + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(x_ptr, w_ptr, rstd_ptr, dy_ptr, dx_ptr, dw_ptr, rows, N: tl.constexpr,
                         BLOCK: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], tl.float32)
    for r in range(ROWS):
        row = (pid * ROWS + r).to(tl.int64)
        ok = mask & (row < rows)
        x = tl.load(x_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * N + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=row < rows, other=0.0)
        normed = x * rstd
        dw += dy * normed
        g = dy * w
        dx = rstd * (g - normed * (tl.sum(g * normed, axis=0) / N))
        tl.store(dx_ptr + row * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    tl.store(dw_ptr + pid * N + cols, dw, mask=mask)


def _launch_width(n: int) -> dict:
    block = next_power_of_2(n)
    return {"BLOCK": block, "num_warps": min(16, max(1, block // 256))}


class RMSNormTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        n = x.shape[-1]
        x2 = x.reshape(-1, n)
        y = torch.empty_like(x2)
        rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        launch(_rms_norm_fwd_kernel, (x2.shape[0],), (x2, weight, y, rstd, eps), N=n, **_launch_width(n))
        ctx.save_for_backward(x2, weight, rstd)
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n = x2.shape[-1]
        rows = x2.shape[0]
        programs = cdiv(rows, ROWS_PER_PROGRAM)
        dx = torch.empty_like(x2)
        dw = torch.empty((programs, n), dtype=torch.float32, device=x2.device)
        launch(_rms_norm_bwd_kernel, (programs,), (x2, weight, rstd, dy.reshape(-1, n).contiguous(), dx, dw, rows), N=n,
               ROWS=ROWS_PER_PROGRAM, **_launch_width(n))
        return dx.reshape(dy.shape), dw.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., N] (contiguous, fp32/bf16/fp16) with weight [N]; the output has x's dtype."""
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    return RMSNormTritonFunction.apply(x.contiguous(), weight.contiguous(), float(eps))
