"""Triton RMSNorm and swish product (forward and backward) against float64 PyTorch references.

On the CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py). Shapes leave partial blocks: a
width that is not a power of two and row counts that are not a multiple of the backward's rows per program.
"""

from __future__ import annotations

import os

import pytest
import torch

from hgrn2 import fused
from kernels.hgrn2.testing import relative_error
from kernels.rms_norm import kernel as rms_kernel
from kernels.rms_norm import rms_norm, rms_norm_reference
from kernels.swish_product import swish_product, swish_product_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _seeded():
    seed = int.from_bytes(os.urandom(4), "little")
    return seed, torch.Generator().manual_seed(seed)


def _grads(fn, inputs, grad_out):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("rows,width,dtype", [(37, 96, torch.float32), (5, 768, torch.float32),
                                             (33, 200, torch.bfloat16)])
def test_rms_norm_matches_reference(rows, width, dtype):
    seed, gen = _seeded()
    x = (torch.randn(rows, width, generator=gen) * 3).to(dtype)
    weight = torch.randn(width, generator=gen)
    grad_out = torch.randn(rows, width, generator=gen)
    eps = 1e-6
    out, (dx, dw) = _grads(lambda a, w: rms_norm(a, w, eps), [x.to(DEVICE), weight.to(DEVICE)], grad_out.to(DEVICE))
    ref, (ref_dx, ref_dw) = _grads(lambda a, w: rms_norm_reference(a, w, eps), [x.double(), weight.double()],
                                   grad_out.double())
    assert out.dtype == dtype and dx.dtype == dtype and dw.dtype == weight.dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of the output / dx
    for name, got, want in (("y", out, ref), ("dx", dx, ref_dx), ("dw", dw, ref_dw)):
        assert relative_error(got.cpu(), want) <= tol, f"seed {seed}: {name}"
    assert rows % rms_kernel.ROWS_PER_PROGRAM != 0  # the last program's rows are partly masked


@pytest.mark.parametrize("shape,dtype", [((3, 7, 129), torch.float32), ((2, 1000), torch.bfloat16),
                                         ((4099,), torch.float32)])
def test_swish_product_matches_reference(shape, dtype):
    seed, gen = _seeded()
    gate, up, grad_out = ((torch.randn(*shape, generator=gen) * 4).to(dtype) for _ in range(3))
    out, (dgate, dup) = _grads(swish_product, [gate.to(DEVICE), up.to(DEVICE)], grad_out.to(DEVICE))
    ref, (ref_dgate, ref_dup) = _grads(swish_product_reference, [gate.double(), up.double()], grad_out.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, got, want in (("y", out, ref), ("dgate", dgate, ref_dgate), ("dup", dup, ref_dup)):
        assert got.dtype == dtype
        assert relative_error(got.cpu(), want) <= tol, f"seed {seed}: {name}"


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(2, 8, device=DEVICE), torch.ones(6, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="must match"):
        swish_product(torch.randn(2, 8, device=DEVICE), torch.randn(2, 7, device=DEVICE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the model takes the Triton path on CUDA only")
def test_model_functions_use_the_triton_kernels_on_cuda():
    x, weight = torch.randn(4, 64, device="cuda"), torch.ones(64, device="cuda")
    assert type(fused.rms_norm(x.requires_grad_(), weight, 1e-6).grad_fn).__name__.startswith("RMSNormTriton")
    gate, up = torch.randn(4, 64, device="cuda", requires_grad=True), torch.randn(4, 64, device="cuda")
    assert type(fused.swish_product(gate, up).grad_fn).__name__.startswith("SwishProductTriton")
