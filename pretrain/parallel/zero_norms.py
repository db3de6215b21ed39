"""ZeRO-1/2's per-step gradient checks as multi-tensor kernels.

DeepSpeed 0.19.8's ZeRO-1/2 optimizer walks its gradient partition one tensor at a time twice a step: the
overflow check (``has_overflow_partitioned_grads_serial``: an amax and an amin per tensor, run for bf16) and
the gradient norm for clipping (``get_grad_norm_direct``: an fp64 copy and a ``vector_norm`` per tensor).
At 385m that is ~260 tensors per rank and about a thousand small kernels launched from Python, work the GPU
waits for whenever the host is slower than the step's compute (docs/perf.md, "Scaling"). ``torch._foreach_norm``
does each walk in a few multi-tensor kernels. The norm accumulates in fp32, as torch's ``clip_grad_norm_``
does (DeepSpeed copies every gradient to fp64 first; the two agree to ~1e-7), and a gradient holds a NaN or
an infinity exactly when its 2-norm is not finite, barring squares beyond fp32's range: a gradient entry above
1.8e19 counts as an overflow here (the step is skipped) and not in DeepSpeed, a diverged run either way.

``install(optimizer)`` replaces the two methods on that optimizer instance when it is DeepSpeed's ZeRO-1/2
optimizer with the attributes they read and this torch computes the norms on its device; otherwise (ZeRO-3,
another DeepSpeed version) it leaves DeepSpeed's own loops in place.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

NEEDED = ("get_grad_norm_direct", "has_overflow_partitioned_grads_serial", "averaged_gradients", "bit16_groups",
          "dp_process_group", "model_parallel_rank", "_model_parallel_all_reduce", "device")


def _partition_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The fp32 2-norms of ``tensors`` (fp32 or bf16) as one vector."""
    return torch.stack(torch._foreach_norm([t.detach() for t in tensors], 2.0, dtype=torch.float32))


def _supported(device: torch.device) -> bool:
    """Whether this torch computes fp32 norms of bf16 and fp32 tensors together on ``device``."""
    try:
        probe = [torch.ones(3, dtype=torch.bfloat16, device=device), torch.ones(4, device=device)]
        return torch.allclose(_partition_norms(probe).cpu(), torch.tensor([3.0, 4.0]).sqrt())
    except (RuntimeError, TypeError):
        return False


def install(optimizer) -> bool:
    """Swap in the multi-tensor versions on this ZeRO-1/2 optimizer; False (nothing changed) if it is not one."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or not all(hasattr(optimizer, n) for n in NEEDED):
        return False
    if not _supported(torch.device(optimizer.device)):
        return False
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.utils import is_model_parallel_parameter, mask_nan_or_inf_with_val_inplace

    deepspeed_norm = optimizer.get_grad_norm_direct

    def grad_norm_direct(gradients, params, norm_type=2):
        if float(norm_type) != 2.0:
            return deepspeed_norm(gradients, params, norm_type)
        counted = []
        real_gradients = (g for g in gradients if not getattr(g, "_zero_padding", False))
        for gradient, param in zip(real_gradients, params, strict=False):  # as DeepSpeed pairs them
            if hasattr(param, PIPE_REPLICATED) and param.ds_pipe_replicated:
                continue  # replicated across pipeline stages: counted on one of them
            if is_model_parallel_parameter(param) or optimizer.model_parallel_rank == 0:
                counted.append(gradient)
        if counted:
            total = _partition_norms(counted).pow(2).sum()
        else:
            total = torch.zeros((), dtype=torch.float32, device=optimizer.device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=optimizer.dp_process_group)
        optimizer._model_parallel_all_reduce(tensor=total, op=dist.ReduceOp.SUM)
        total = total.pow(0.5)
        mask_nan_or_inf_with_val_inplace(total, device=optimizer.device)
        return total

    def has_overflow_partitioned_grads_serial():
        gradients = [g for i in range(len(optimizer.bit16_groups)) for g in (optimizer.averaged_gradients[i] or [])
                     if g is not None and g.numel()]
        if not gradients:
            return torch.zeros(1, dtype=torch.bool, device=optimizer.device)
        return ~torch.isfinite(_partition_norms(gradients).sum()).reshape(1)

    optimizer.get_grad_norm_direct = grad_norm_direct
    optimizer.has_overflow_partitioned_grads_serial = has_overflow_partitioned_grads_serial
    return True
