"""Triton decode step against the float64 reference step, several steps in a row (state updated in place)."""

from __future__ import annotations

import os

import pytest
import torch

from kernels.hgrn2.naive import hgrn2_decode_reference
from kernels.hgrn2.testing import interpreted_kernels, relative_error

_, decode = interpreted_kernels()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("batch,heads,dim,bounded", [(3, 2, 32, True), (2, 1, 128, False), (1, 3, 16, True)])
def test_decode_steps_match_reference(batch, heads, dim, bounded):
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float32)
    state = draw(batch, heads, dim, dim)
    ref_state = state.double()
    state = state.to(DEVICE)
    lower_bound = torch.rand(heads, dim, generator=gen) if bounded else None
    for step in range(4):
        q, f_logit, i = draw(batch, heads, dim), draw(batch, heads, dim) * 3, draw(batch, heads, dim)
        out = torch.full_like(i, float("nan"), device=DEVICE)
        o = decode.decode_hgrn2(q.to(DEVICE), f_logit.to(DEVICE), i.to(DEVICE), state,
                                None if lower_bound is None else lower_bound.to(DEVICE), out=out)
        assert o is out
        ref = hgrn2_decode_reference(q.double(), f_logit.double(), i.double(), ref_state,
                                     None if lower_bound is None else lower_bound.double())
        assert relative_error(o.cpu(), ref) <= 1e-5, f"seed {seed}, step {step}"
        assert relative_error(state.cpu(), ref_state) <= 1e-5, f"seed {seed}, step {step}"


def test_decode_extreme_gates_and_bf16():
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float32)
    state = draw(2, 2, 32, 32)
    ref_state = state.double()
    state = state.to(DEVICE)
    q, i = draw(2, 2, 32).bfloat16(), draw(2, 2, 32).bfloat16()
    f_logit = (draw(2, 2, 32) * 40).bfloat16()  # from f ~ 0 (reset) to f ~ 1 (keep)
    o = decode.decode_hgrn2(q.to(DEVICE), f_logit.to(DEVICE), i.to(DEVICE), state)
    ref = hgrn2_decode_reference(q.double(), f_logit.double(), i.double(), ref_state)
    assert o.dtype == torch.bfloat16
    assert relative_error(o.cpu(), ref) <= 1e-2, f"seed {seed}"
    assert relative_error(state.cpu(), ref_state) <= 1e-5, f"seed {seed}"
