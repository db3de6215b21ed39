"""Memory-lean autograd functions: the model's RMSNorms, the GLU's swish product, the LM head with its loss.

Written with plain autograd, ``(x32 * rsqrt(mean(x32²) + eps) * w).to(dtype)`` keeps an fp32 copy of the
input and the fp32 normalised tensor for the backward (8 bytes per element on top of the input), and
``silu(gate) * up`` keeps the gate, its swish and ``up``. These functions compute the same forward values
with the same operations, save only the inputs (and, for the norm, one fp32 scale per row) and recompute the
rest in the backward: at the 150m preset that is about 15 KB less per token and layer (docs/model.md). On
CUDA the norm (unsharded) and the swish product run as Triton kernels (``kernels.rms_norm``,
``kernels.swish_product``) that save the same tensors.
``linear_cross_entropy_sum`` forms the LM head's logits, the loss and both gradients a chunk of tokens at a
time, so the [tokens, vocab] logits never exist whole.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import kernels.rms_norm
import kernels.swish_product


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 tensors, float64 for float64 ones."""
    return torch.promote_types(x.dtype, torch.float32)


class RMSNormFunction(torch.autograd.Function):
    """y = x / rms(x) * w, computed in fp32 (float64 for float64 x) and returned in x's dtype.

    With ``group``, x is this rank's shard of a hidden dim of ``full_size`` sharded across the group: the sum
    of squares (forward) and the sum of g·x̂ (backward) are all-reduced over it.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, group=None, full_size=None):
        x32 = x.to(compute_dtype(x))
        if group is None:
            mean_sq = x32.pow(2).mean(-1, keepdim=True)
        else:
            sum_sq = x32.pow(2).sum(-1, keepdim=True)
            dist.all_reduce(sum_sq, group=group)
            mean_sq = sum_sq / full_size
        rstd = torch.rsqrt(mean_sq + eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.group, ctx.size = group, x.shape[-1] if group is None else full_size
        return (x32 * rstd * weight.to(x32.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        grad32 = grad_out.to(rstd.dtype)
        grad_weight = (grad32 * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
        scaled = grad32 * weight.to(rstd.dtype)
        dot = (scaled * normed).sum(-1, keepdim=True)
        if ctx.group is not None:
            dist.all_reduce(dot, group=ctx.group)
        grad_x = rstd * (scaled - normed * (dot / ctx.size))
        return grad_x.to(x.dtype), grad_weight, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, group=None, full_size: int | None = None):
    """On CUDA (unsharded, fp32/bf16/fp16) the Triton kernels of ``kernels.rms_norm``: same saved tensors, one
    pass each way instead of about ten elementwise kernels in the backward."""
    if x.is_cuda and group is None and x.dtype != torch.float64:
        return kernels.rms_norm.rms_norm(x, weight, eps)
    return RMSNormFunction.apply(x, weight, eps, group, full_size)


class SwishProductFunction(torch.autograd.Function):
    """silu(gate) * up, saving only gate and up."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        gate32, grad32 = gate.to(compute_dtype(gate)), grad_out.to(compute_dtype(gate))
        sig = torch.sigmoid(gate32)
        grad_up = grad32 * gate32 * sig
        grad_gate = grad32 * up.to(gate32.dtype) * sig * (1 + gate32 * (1 - sig))
        return grad_gate.to(gate.dtype), grad_up.to(up.dtype)


def swish_product(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """On CUDA (fp32/bf16/fp16) the Triton kernels of ``kernels.swish_product`` (one pass each way)."""
    if gate.is_cuda and gate.dtype == up.dtype and gate.dtype != torch.float64:
        return kernels.swish_product.swish_product(gate, up)
    return SwishProductFunction.apply(gate, up)


IGNORE_INDEX = -100  # labels not counted (PyTorch's convention)


def _product_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give a matmul here (the tensor's own without autocast)."""
    device_type = tensor.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else tensor.dtype


class LinearCrossEntropySumFunction(torch.autograd.Function):
    """sum over labelled rows of cross_entropy(hidden @ weight.T, labels), ``chunk_rows`` rows at a time.

    The [rows, vocab] logits exist one chunk at a time: the forward also forms both gradients (softmax minus
    one-hot, times hidden or weight), so nothing is recomputed and the backward only scales them. The products
    take autocast's dtype and the softmax fp32, as ``F.cross_entropy(lm_head(hidden).float(), ...)`` does.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows):
        dtype = _product_dtype(hidden)
        want_grads = any(ctx.needs_input_grad[:2])
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if want_grads else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_grads else None
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                h, target = hidden[rows].to(dtype), labels[rows]
                logits = (h @ w.T).float()
                counted = target != IGNORE_INDEX
                safe_target = torch.where(counted, target, 0)
                log_norm = torch.logsumexp(logits, -1)
                picked = logits.gather(1, safe_target[:, None])[:, 0]
                total += torch.where(counted, log_norm - picked, 0.0).sum()
                if want_grads:
                    grad_logits = torch.exp(logits - log_norm[:, None])
                    grad_logits[torch.arange(len(target), device=h.device), safe_target] -= 1
                    grad_logits = (grad_logits * counted[:, None]).to(dtype)
                    grad_hidden[rows] = (grad_logits @ w).to(hidden.dtype)
                    grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden * grad_total.to(grad_hidden.dtype), grad_weight, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             chunk_rows: int = 4096) -> torch.Tensor:
    """Summed token cross-entropy of ``hidden @ weight.T`` against ``labels`` (-100: ignored), fp32, without
    materialising all the logits; hidden [..., d], labels [...]."""
    return LinearCrossEntropySumFunction.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                               chunk_rows)
