"""A first-use check of the compiled chunk kernels against the float64 reference.

A compiler can get one launch configuration wrong without any error: Triton 3.6 did for the 4-warp bf16
forward scan at head dim 64 (outputs 9% off, NaN at some lengths; docs/kernels.md). So the first time
``chunk_hgrn2`` runs on a GPU with a given dtype, head count, head dims, bound and launch settings, it runs
the same compiled kernels (they are specialised on exactly those) on a small random problem — two chunks and
a partial one, with and without autograd — against ``hgrn2_chunk_torch`` in float64, and raises if they
disagree. After compilation this costs milliseconds, once per configuration and process.
``HGRN2_SKIP_KERNEL_CHECK=1`` turns it off.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.hgrn2.naive import hgrn2_chunk_torch
from kernels.hgrn2.testing import relative_error

SEQ_LEN = 2 * 64 + 7
# bf16: measured errors are ~3e-3 (d lower_bound ~2e-2, a sum over all positions); the miscompile this guards
# against gave 9e-2 on the output. fp32: measured <= 3e-6.
TOLERANCES = {torch.bfloat16: {"default": 3e-2, "d lower_bound": 1e-1}, torch.float32: {"default": 1e-4}}
_verified: set[tuple] = set()


def kernel_errors(chunk_fn: Callable, dtype: torch.dtype, heads: int, key_dim: int, value_dim: int,
                  has_bound: bool, device: torch.device | str, swish_q: bool = False) -> dict[str, float]:
    """Relative errors of ``chunk_fn`` against the float64 reference on a small random problem (with
    ``swish_q``, chunk_fn takes pre-swish q and the reference its swish)."""
    gen = torch.Generator(device=device).manual_seed(0)
    draw = lambda dim: torch.randn(1, SEQ_LEN, heads, dim, device=device, generator=gen)
    q = draw(key_dim)
    inputs = {"q": (q if swish_q else F.silu(q)).to(dtype), "f_logit": (2 * draw(key_dim)).to(dtype),
              "i": draw(value_dim).to(dtype)}
    if has_bound:
        inputs["lower_bound"] = 0.9 * torch.rand(heads, key_dim, device=device, generator=gen)
    do = torch.randn(1, SEQ_LEN, heads, value_dim, device=device, generator=gen)
    with torch.enable_grad(), torch.autocast(torch.device(device).type, enabled=False):
        results = []
        ours = (lambda q, **rest: chunk_fn(q, **rest, swish_q=True)) if swish_q else chunk_fn
        reference = (lambda q, **rest: hgrn2_chunk_torch(F.silu(q), **rest)) if swish_q else hgrn2_chunk_torch
        for fn, cast in ((ours, lambda x: x), (reference, torch.Tensor.double)):
            leaves = {name: cast(x).detach().requires_grad_() for name, x in inputs.items()}
            out, _ = fn(**leaves)
            out.backward(cast(do).to(out.dtype))
            results.append((out.detach(), {name: x.grad for name, x in leaves.items()}))
        with torch.no_grad():
            no_grad_out, _ = ours(**inputs)
    (out, grads), (ref_out, ref_grads) = results
    errors = {"output": relative_error(out, ref_out), "output without autograd": relative_error(no_grad_out, ref_out)}
    errors.update({f"d {name}": relative_error(grads[name], ref_grads[name]) for name in inputs})
    return errors


def verify(chunk_fn: Callable, dtype: torch.dtype, heads: int, key_dim: int, value_dim: int, has_bound: bool,
           device: torch.device | str, launch: tuple = (), swish_q: bool = False) -> None:
    """Check one configuration once per process; raise a RuntimeError that names it if it is wrong.

    ``launch``: the kernels' launch settings (they change the compiled code too)."""
    key = (dtype, heads, key_dim, value_dim, has_bound, str(device), launch, swish_q)
    if key in _verified:
        return
    _verified.add(key)  # first: the check calls chunk_fn, which calls back here
    try:
        errors = kernel_errors(chunk_fn, dtype, heads, key_dim, value_dim, has_bound, device, swish_q)
    except BaseException:
        _verified.discard(key)
        raise
    tolerances = TOLERANCES[dtype]
    wrong = {name: e for name, e in errors.items() if not e <= tolerances.get(name, tolerances["default"])}
    if wrong:
        _verified.discard(key)
        import triton

        where = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else str(device)
        found = ", ".join(f"{name} {error:.1e}" for name, error in wrong.items())
        raise RuntimeError(
            f"kernels.hgrn2: the compiled chunk kernels give wrong results for {str(dtype).replace('torch.', '')} "
            f"inputs, {heads} heads, head dims {key_dim}/{value_dim}, {'with' if has_bound else 'no'} lower bound"
            f"{', swish_q' if swish_q else ''}, "
            f"on {where} with Triton {triton.__version__} (relative error against the float64 reference: "
            f"{found}; tolerance {tolerances}). Use model.backend=chunk_torch meanwhile and report this "
            "configuration (HGRN2_SKIP_KERNEL_CHECK=1 skips this check)."
        )


def verify_once(chunk_fn: Callable, q: torch.Tensor, i: torch.Tensor, lower_bound: torch.Tensor | None,
                launch: tuple = (), swish_q: bool = False) -> bool:
    """``verify`` for the configuration of these inputs, on CUDA, outside graph capture and compilation. Returns
    whether that is settled for good: checked, or nothing to check (not on CUDA); False while the check is
    deferred (capture, compilation, HGRN2_SKIP_KERNEL_CHECK=1), so that the caller asks again."""
    if not q.is_cuda:
        return True
    if os.environ.get("HGRN2_SKIP_KERNEL_CHECK") == "1":
        return False
    if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
        return False
    verify(chunk_fn, q.dtype, q.shape[2], q.shape[3], i.shape[3], lower_bound is not None, q.device, launch,
           swish_q)
    return True
