"""The compiled chunk kernels with bf16 inputs on the GPU (tensor-core products) against float64 (GPU only).

The CPU tests run the interpreter, which cannot show a miscompiled kernel: this one did (the 4-warp forward
scan at head dim 64 under Triton 3.6 gave outputs 9% off, NaN, or an illegal address; docs/kernels.md).
Errors at bf16 resolution are ~3e-3 (fla's chunk_gla: ~2.5e-3 on the output at the same inputs).
"""

import os

import pytest
import torch
import torch.nn.functional as F

from kernels.hgrn2 import chunk, chunk_hgrn2, hgrn2_chunk_torch
from kernels.hgrn2.testing import relative_error

pytestmark = pytest.mark.gpu
TOLERANCE = {"o": 1e-2, "q": 1e-2, "f_logit": 1e-2, "i": 1e-2, "lower_bound": 5e-2}


def bf16_inputs(batch, seq_len, heads, dim):
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    draw = lambda: torch.randn(batch, seq_len, heads, dim, device="cuda", generator=gen)
    return seed, {"q": F.silu(draw()).bfloat16(), "f_logit": (2 * draw()).bfloat16(), "i": draw().bfloat16(),
                  "lower_bound": torch.rand(heads, dim, device="cuda", generator=gen) * 0.9}


# (4, 200, 12, 128): 48 (sequence, head) pairs, enough for the scans' 64-column value blocks on any GPU up to
# 192 multiprocessors (fewer pairs take narrower blocks): the benchmark's configuration, here with 8 and 4 warps.
CASES = [(4, 300, 4, 64, {}), (4, 320, 4, 64, {}), (2, 300, 2, 128, {}), (2, 200, 3, 32, {}), (2, 130, 2, 16, {}),
         (4, 200, 12, 128, {"fwd_scan_warps": 8, "dstate_warps": 8}),
         (4, 200, 12, 128, {"fwd_scan_warps": 4, "dstate_warps": 4})]


@pytest.mark.parametrize("batch,seq_len,heads,dim,config", CASES)
def test_bf16_chunk_matches_float64(batch, seq_len, heads, dim, config, monkeypatch):
    for key, value in config.items():
        monkeypatch.setitem(chunk.CONFIG, key, value)
    seed, inputs = bf16_inputs(batch, seq_len, heads, dim)
    leaves = {name: x.clone().requires_grad_() for name, x in inputs.items()}
    o, _ = chunk_hgrn2(**leaves)
    do = torch.randn_like(o)
    o.backward(do)
    reference = {name: x.detach().cpu().double().requires_grad_() for name, x in inputs.items()}
    ref_o, _ = hgrn2_chunk_torch(**reference)
    ref_o.backward(do.cpu().double())
    errors = {"o": relative_error(o.detach().cpu(), ref_o.detach())}
    errors |= {name: relative_error(leaves[name].grad.cpu(), reference[name].grad) for name in inputs}
    assert all(errors[name] <= tol for name, tol in TOLERANCE.items()), f"seed {seed}: {errors}"
    with torch.no_grad():  # no chunk states kept: the launch that once read out of bounds
        o_no_grad, _ = chunk_hgrn2(**inputs)
    assert relative_error(o_no_grad.cpu(), ref_o.detach()) <= TOLERANCE["o"], f"seed {seed}"
