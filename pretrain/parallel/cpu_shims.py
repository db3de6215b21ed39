"""Patches that let DeepSpeed and megatron-core run on a CPU over gloo (tests, CPU machines).

Only applied when CUDA is absent (``distributed.prepare_environment``). Measured needs (DESIGN.md §4):
- DeepSpeed's CPU communication backend compiles a shared-memory op with gcc on first use (~24 s);
  gloo needs none of it, so the build is skipped.
- megatron-core's tensor-parallel layers run unpatched with ``use_cpu_initialization=True``,
  ``perform_initialization=False`` (weights are copied from the single-process model) and
  ``gradient_accumulation_fusion=False``; nothing here touches its CUDA RNG tracker because no
  tensor-parallel code path on ours draws random numbers (no dropout).
- megatron-core's sequence-parallel collectives (``tensor_parallel/mappings.py``: all-gather and
  reduce-scatter along the sequence; ``layers.py``; the global memory buffer in ``core/utils.py``) allocate
  their output buffers with ``device=torch.cuda.current_device()``, which fails without CUDA. Those three
  modules get a ``torch`` whose ``cuda.current_device()`` is the CPU; everything else is the real torch
  (gloo has ``all_gather_into_tensor`` and ``reduce_scatter_tensor``).
"""

from __future__ import annotations

import torch

_applied = False


def apply_deepspeed_cpu_shims() -> None:
    global _applied
    if _applied:
        return
    _applied = True
    import importlib

    try:
        # importlib: the attribute ``deepspeed.comm.torch`` is the torch package, not the submodule
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    except Exception:  # pragma: no cover - deepspeed missing: the caller reports it
        return
    ds_torch_comm.build_shm_op = lambda: None


class _CpuCuda:
    """``torch.cuda`` as megatron's buffer code sees it on a CPU run: the current device is the CPU."""

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)


class _TorchOnCpu:
    """The ``torch`` module, but with ``_CpuCuda`` as ``torch.cuda``."""

    cuda = _CpuCuda()

    def __getattr__(self, name: str):
        return getattr(torch, name)


_megatron_applied = False


def apply_megatron_cpu_shims() -> None:
    """Redirect megatron-core's sequence-parallel buffer allocations to the CPU (call only without CUDA)."""
    global _megatron_applied
    if _megatron_applied:
        return
    _megatron_applied = True
    import importlib

    try:
        modules = [
            importlib.import_module(name)
            for name in ("megatron.core.tensor_parallel.mappings", "megatron.core.tensor_parallel.layers",
                         "megatron.core.utils")
        ]
    except Exception:  # pragma: no cover - megatron-core missing: the caller reports it
        return
    for module in modules:
        module.torch = _TorchOnCpu()
