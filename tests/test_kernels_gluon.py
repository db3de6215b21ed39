"""Tier 0 of the intra forward and backward in Gluon (kernels/hgrn2/gluon_tier0.py) against Triton's (GPU only).

Gluon has no interpreter, so these kernels are tested here only: the same bf16 inputs through both tier-0 paths,
every gradient compared with float64, and the Gluon kernel's error must be at the Triton kernel's level. The
inputs mix tiers (a band of key columns decays fast enough for tier 1, a window of one head for tier 2), pack
documents of odd lengths and run swish of q in the kernels, so the flags, masks and key groups are exercised.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from kernels.hgrn2 import chunk, hgrn2_chunk_torch
from kernels.hgrn2.testing import relative_error

pytestmark = pytest.mark.gpu


def _inputs(seq_len: int, heads: int, dim: int):
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    draw = lambda: torch.randn(1, seq_len, heads, dim, device="cuda", generator=gen)
    f_logit = 2 * draw()
    f_logit[:, :, 0, 16:32] = -3.0  # tier 1 in these key columns of head 0
    f_logit[:, 64:128, 1, 32:48] -= 6.0  # tier 2 in one chunk of head 1
    return seed, {"q": draw().bfloat16(), "f_logit": f_logit.bfloat16(), "i": draw().bfloat16(),
                  "lower_bound": torch.rand(heads, dim, device="cuda", generator=gen) * 0.9}


def _gradients(inputs: dict, cu_seqlens, do, swish_q: bool) -> dict:
    leaves = {name: x.clone().requires_grad_() for name, x in inputs.items()}
    o, _ = chunk.chunk_hgrn2(**leaves, cu_seqlens=cu_seqlens, swish_q=swish_q)
    o.backward(do)
    return {"o": o.detach(), **{name: leaves[name].grad for name in inputs}}


def _reference(inputs: dict, cu_seqlens, do, swish_q: bool) -> dict:
    leaves = {name: x.detach().cpu().double().requires_grad_() for name, x in inputs.items()}
    q = F.silu(leaves["q"]) if swish_q else leaves["q"]
    o, _ = hgrn2_chunk_torch(q, leaves["f_logit"], leaves["i"], leaves["lower_bound"],
                             cu_seqlens=None if cu_seqlens is None else cu_seqlens.cpu())
    o.backward(do.cpu().double())
    return {"o": o.detach(), **{name: leaves[name].grad for name in inputs}}


@pytest.mark.parametrize("dim,swish_q,documents", [(128, True, [77, 190, 300]), (64, False, [300]),
                                                   (128, False, [130, 300])])
def test_gluon_tier0_at_triton_accuracy(dim, swish_q, documents, monkeypatch):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon tier 0 is built for sm_90")
    seed, inputs = _inputs(documents[-1], 3, dim)
    cu_seqlens = torch.tensor([0, *documents], device="cuda", dtype=torch.int32)
    do = torch.randn(1, documents[-1], 3, dim, device="cuda").bfloat16()
    dtype, device = inputs["q"].dtype, inputs["q"].device
    assert chunk._gluon_tier0(dtype, device, dim, chunk._grad_options(torch.bfloat16), chunk._dbeta_row_groups())
    assert chunk._gluon_fwd_tier0(dtype, device, dim)
    reference = _reference(inputs, cu_seqlens, do, swish_q)
    errors = {}
    for gluon in (True, False):
        monkeypatch.setitem(chunk.CONFIG, "gluon_tier0", gluon)
        monkeypatch.setitem(chunk.CONFIG, "gluon_fwd_tier0", gluon)
        result = _gradients(inputs, cu_seqlens, do, swish_q)
        errors[gluon] = {name: relative_error(result[name].cpu(), reference[name]) for name in result}
    assert all(errors[True][name] <= 1.25 * errors[False][name] + 1e-4 for name in reference), (
        f"seed {seed}: Gluon {errors[True]}, Triton {errors[False]}")
