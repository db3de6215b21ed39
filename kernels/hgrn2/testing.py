"""Helpers for tests of the Triton kernels: interpreter set-up, poisoned buffers, error measures.

Triton decides between compiling and interpreting when ``@triton.jit`` runs, reading TRITON_INTERPRET from
the environment (triton 3.7: ``knobs.runtime.interpret``, looked up on every decoration). If our kernel
modules were imported before the variable was set, ``interpreted_kernels`` sets it and re-imports them, so a
test on a machine without a GPU works whichever module of a pytest session imported triton first.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import torch


def interpreted_kernels():
    """(chunk module, decode module), interpreted on the CPU when no GPU is present."""
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    from kernels.hgrn2 import chunk, decode

    if os.environ.get("TRITON_INTERPRET") == "1":
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(chunk._fwd_scan_kernel, InterpretedFunction):
            for name in ("kernels.hgrn2.utils", "kernels.hgrn2.chunk", "kernels.hgrn2.decode", "kernels.hgrn2"):
                importlib.reload(sys.modules[name])
            from kernels.hgrn2 import chunk, decode
        patch_interpreter_bf16_dot()
        chunk.BF16_DOT_IN_INTERPRETER = True
    return chunk, decode


def patch_interpreter_bf16_dot() -> None:
    """Make Triton's interpreter (3.7.1) multiply bf16 operands as numbers.

    It stores bf16 as uint16 bit patterns and hands them to np.matmul as they are, so tl.dot on bf16 returns
    garbage. Upcasting both operands to fp32 first (exact) gives bf16 products with fp32 accumulation, as the
    GPU's tensor cores do; with it the tests run the kernels' real bf16 operand path on the CPU. Idempotent.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_bf16_upcast", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = interpreter.TensorHandle(
                interpreter._convert_float(a.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = interpreter.TensorHandle(
                interpreter._convert_float(b.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._bf16_upcast = True
    builder.create_dot = create_dot


@contextlib.contextmanager
def poisoned_buffers(chunk_module, allocated: list | None = None):
    """Every buffer the chunk kernels allocate starts as NaN (integer buffers as -1): an element a kernel fails
    to write shows. ``allocated``: a list that receives every buffer, in allocation order."""
    original = chunk_module.empty

    def nan_empty(shape, dtype, device):
        buffer = torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)
        if allocated is not None:
            allocated.append(buffer)
        return buffer

    chunk_module.empty = nan_empty
    try:
        yield
    finally:
        chunk_module.empty = original


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64; NaN anywhere gives inf."""
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def stub_compiled_launches(calls: list | None = None) -> None:
    """Every compiled Triton launch becomes a stand-in that runs nothing, for host-side checks and profiles on
    a machine without a GPU: ``kernel[grid](*args, **kwargs)`` returns a stand-in compiled kernel (so
    kernels.launch keeps it and later launches take its shortcut), and the device queries answer device 0,
    stream 0. ``calls`` receives ("jit", kernel id, args, kwargs) per launch through Triton's path and
    ("direct", kernel id, launcher arguments) per shortcut launch. For a process of its own (not undone); the
    kernels must have been decorated without TRITON_INTERPRET."""
    from types import SimpleNamespace

    from triton.runtime.jit import JITFunction

    from kernels import launch

    record = calls.append if calls is not None else lambda call: None

    def jit_launch(kernel, grid):
        def run_jit(*args, **kwargs):
            ident = len(stand_ins)
            stand_ins.append(SimpleNamespace(packed_metadata=None, function=ident,
                                             run=lambda *launcher_args: record(("direct", ident, launcher_args))))
            record(("jit", ident, args, kwargs))
            return stand_ins[-1]
        return run_jit

    stand_ins: list = []
    JITFunction.__getitem__ = jit_launch
    launch._current_device = lambda: 0
    launch.driver = SimpleNamespace(active=SimpleNamespace(get_current_stream=lambda device: 0))
