"""One recurrent HGRN2 step for inference in Triton, updating the fp32 state [B, H, K, V] in place.

Host work is shape checks and one torch.empty for the output: no syncs, so the step can be captured in a
CUDA graph (torch's caching allocator serves allocations made during capture from the graph's pool).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.hgrn2.utils import check_decode_inputs, gate_log_f_and_k
from kernels.launch import cdiv, launch


@triton.jit
def _decode_kernel(q_ptr, x_ptr, v_ptr, beta_ptr, state_ptr, o_ptr, scale, H: tl.constexpr, K: tl.constexpr,
                   V: tl.constexpr, BV: tl.constexpr, HAS_BETA: tl.constexpr):
    """S = Diag(f) S + k i^T; o = (scale q) S, for one (batch, head) and BV value columns."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_h = i_bh % H
    cols_k, cols_v = tl.arange(0, K), i_v * BV + tl.arange(0, BV)
    x = tl.load(x_ptr + i_bh * K + cols_k).to(tl.float32)
    beta = 0.0
    if HAS_BETA:
        beta = tl.load(beta_ptr + i_h * K + cols_k).to(tl.float32)
    log_f, k = gate_log_f_and_k(x, beta, HAS_BETA)
    q = tl.load(q_ptr + i_bh * K + cols_k).to(tl.float32) * scale
    v = tl.load(v_ptr + i_bh * V + cols_v).to(tl.float32)
    state_ptrs = state_ptr + i_bh * K * V + cols_k[:, None] * V + cols_v[None, :]
    state = tl.load(state_ptrs)
    state = tl.exp(log_f)[:, None] * state + k[:, None] * v[None, :]
    tl.store(state_ptrs, state)
    o = tl.sum(q[:, None] * state, axis=0)
    tl.store(o_ptr + i_bh * V + cols_v, o.to(o_ptr.dtype.element_ty))


def decode_hgrn2(
    q: torch.Tensor,
    f_logit: torch.Tensor,
    i: torch.Tensor,
    state: torch.Tensor,
    lower_bound: torch.Tensor | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One step: q (post-swish), f_logit [B, H, K]; i [B, H, V]; state fp32 [B, H, K, V], updated in place.

    Returns o [B, H, V] in i's dtype (written into ``out`` when given). Same contract as
    ``hgrn2_decode_reference``; inputs fp32 or bf16, contiguous; K, V in {16, 32, 64, 128}.
    """
    check_decode_inputs(q, f_logit, i, state, lower_bound)
    batch, heads, key_dim = q.shape
    value_dim = i.shape[-1]
    scale = key_dim**-0.5 if scale is None else float(scale)
    if out is None:
        out = torch.empty_like(i)
    elif out.shape != i.shape or out.dtype != i.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {i.dtype} tensor of shape {tuple(i.shape)}")
    # Small value blocks spread a small batch over more programs; the state is read once either way.
    block_v = min(value_dim, 32)
    beta = lower_bound if lower_bound is not None else q
    launch(
        _decode_kernel, (cdiv(value_dim, block_v), batch * heads),
        (q, f_logit, i, beta, state, out, scale), H=heads, K=key_dim, V=value_dim, BV=block_v,
        HAS_BETA=lower_bound is not None, num_warps=4,
    )
    return out
