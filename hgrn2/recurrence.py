"""Backend dispatch for the HGRN2 recurrence: the token mixer calls these, whatever computes them.

Backends (``HGRN2Config.backend``):
- ``naive``: the step-by-step reference (slow; the definition).
- ``chunk_torch``: the chunkwise form in plain PyTorch (CPU training of small models).
- ``triton``: the Triton chunkwise and decode kernels in ``kernels.hgrn2`` (CUDA, or the CPU under
  ``TRITON_INTERPRET=1``).
- ``auto``: ``triton`` for CUDA tensors, ``chunk_torch`` otherwise.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from kernels.hgrn2 import naive


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" else "chunk_torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the kernels on the CPU; "
            "use backend 'chunk_torch' or 'auto' on a CPU"
        )
    return backend


def _triton_ops():
    try:
        from kernels.hgrn2 import chunk_hgrn2, decode_hgrn2
    except ImportError as error:  # pragma: no cover - depends on the installed kernels
        raise RuntimeError(f"the Triton HGRN2 kernels could not be imported: {error}") from error
    return chunk_hgrn2, decode_hgrn2


def hgrn2_recurrence(
    backend: str,
    q: torch.Tensor,
    f_logit: torch.Tensor,
    i: torch.Tensor,
    lower_bound: torch.Tensor | None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o [B, T, H, V] (and the final state [N, H, K, V]) for pre-swish q, f_logit [B, T, H, K], i: the Triton
    kernels apply swish to q themselves, the torch backends first."""
    backend = resolve_backend(backend, q.device)
    if backend == "triton":
        chunk_hgrn2, _ = _triton_ops()
        return chunk_hgrn2(q, f_logit, i, lower_bound, None, initial_state, output_final_state, cu_seqlens,
                           swish_q=True)
    args = (F.silu(q), f_logit, i, lower_bound, None, initial_state, output_final_state, cu_seqlens)
    if backend == "naive":
        return naive.hgrn2_recurrent_reference(*args)
    return naive.hgrn2_chunk_torch(*args, chunk_size=chunk_size)


def hgrn2_decode(
    backend: str,
    q: torch.Tensor,
    f_logit: torch.Tensor,
    i: torch.Tensor,
    state: torch.Tensor,
    lower_bound: torch.Tensor | None,
) -> torch.Tensor:
    """One recurrent step (pre-swish q, f_logit [B, H, K], i [B, H, V]); updates ``state`` [B, H, K, V] in
    place."""
    q = F.silu(q)
    if resolve_backend(backend, q.device) == "triton":
        _, decode_hgrn2 = _triton_ops()
        return decode_hgrn2(q, f_logit, i, state, lower_bound)
    return naive.hgrn2_decode_reference(q, f_logit, i, state, lower_bound)
