"""Patches that let DeepSpeed and megatron-core run on a CPU over gloo (tests, CPU machines).

Only applied when CUDA is absent (``distributed.prepare_environment``). Measured needs (DESIGN.md §4):
- DeepSpeed's CPU communication backend compiles a shared-memory op with gcc on first use (~24 s);
  gloo needs none of it, so the build is skipped.
- megatron-core's tensor-parallel layers run unpatched with ``use_cpu_initialization=True``,
  ``perform_initialization=False`` (weights are copied from the single-process model) and
  ``gradient_accumulation_fusion=False``; nothing here touches its CUDA RNG tracker because no
  tensor-parallel code path on ours draws random numbers (no dropout).
"""

from __future__ import annotations

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
