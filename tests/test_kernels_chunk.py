"""Triton chunkwise HGRN2 (forward and backward) against the float64 step-by-step reference.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (see kernels/hgrn2/testing.py), so
shapes stay tiny. Inputs are drawn fresh on every run (the seed is in each failure message); every buffer
the kernels write starts as NaN.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import triton.language as tl

from kernels.hgrn2.naive import hgrn2_recurrent_reference
from kernels.hgrn2.testing import interpreted_kernels, poisoned_buffers, relative_error

chunk, _ = interpreted_kernels()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT_TOL, GRAD_TOL = 1e-5, 1e-4


def _inputs(batch, seq_len, heads, key_dim, value_dim, bounded, with_h0, num_seqs, gate_shift=0.0,
            gate_spread=1.0):
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float32)
    q = torch.nn.functional.silu(draw(batch, seq_len, heads, key_dim))
    f_logit = draw(batch, seq_len, heads, key_dim) * gate_spread + gate_shift
    i = draw(batch, seq_len, heads, value_dim)
    lower_bound = torch.rand(heads, key_dim, generator=gen) if bounded else None
    h0 = draw(num_seqs, heads, key_dim, value_dim) if with_h0 else None
    return seed, {"q": q, "f_logit": f_logit, "i": i, "lower_bound": lower_bound, "initial_state": h0}


def _run(fn, inputs, cu_seqlens, device, scale=None):
    """Output, final state and the gradients of every input under a random linear loss."""
    leaves = {name: x.detach().to(device).requires_grad_() for name, x in inputs.items() if x is not None}
    args = {name: leaves.get(name) for name in inputs}
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=device)
    o, final = fn(**args, scale=scale, output_final_state=True, cu_seqlens=cu)
    gen = torch.Generator().manual_seed(1234)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device, o.dtype)
    dfinal = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(device, final.dtype)
    ((o * do).sum() + (final * dfinal).sum()).backward()
    return o, final, {name: x.grad for name, x in leaves.items()}


def _check(inputs, seed, cu_seqlens=None, scale=None, grad_tol=None, log_bound_grad=False, swish_q=False,
           allocated=None):
    """Outputs and gradients against the float64 reference; with ``log_bound_grad`` the bound's gradient is
    compared as beta * d beta, the gradient with respect to log beta. With ``swish_q`` q is pre-activation:
    the kernels apply swish, the reference takes torch's swish of it (in float64). ``allocated`` receives the
    kernels' buffers (poisoned_buffers)."""
    ours, reference = chunk.chunk_hgrn2, hgrn2_recurrent_reference
    if swish_q:
        ours = functools.partial(chunk.chunk_hgrn2, swish_q=True)
        reference = lambda q, **rest: hgrn2_recurrent_reference(torch.nn.functional.silu(q), **rest)  # noqa: E731
    with poisoned_buffers(chunk, allocated):
        o, final, grads = _run(ours, inputs, cu_seqlens, DEVICE, scale)
    ref_inputs = {name: None if x is None else x.double() for name, x in inputs.items()}
    ref_o, ref_final, ref_grads = _run(reference, ref_inputs, cu_seqlens, "cpu", scale)
    errors = {"o": relative_error(o.cpu(), ref_o), "final_state": relative_error(final.cpu(), ref_final)}
    assert max(errors.values()) <= OUT_TOL, f"seed {seed}: {errors}"
    if log_bound_grad:
        beta = inputs["lower_bound"].double()
        grads["lower_bound"] = grads["lower_bound"].cpu() * beta
        ref_grads["lower_bound"] = ref_grads["lower_bound"] * beta
    grad_errors = {f"d{name}": relative_error(grads[name].cpu(), ref_grads[name]) for name in grads}
    for name, error in grad_errors.items():
        tol = (grad_tol or {}).get(name, GRAD_TOL)
        assert error <= tol, f"seed {seed}: {name} {error:.2e} > {tol:.0e}; all: {grad_errors}"
    return errors, grad_errors


@pytest.mark.parametrize(
    "batch,seq_len,heads,dim,bounded,with_h0",
    [
        (2, 37, 2, 32, True, True),  # one partial chunk, T not a multiple of the sub-chunk either
        (1, 150, 3, 16, False, False),  # three chunks, the last partial; no bound (layer 0)
        (1, 83, 2, 64, True, False),  # two value blocks in the scans
        (1, 70, 1, 128, True, True),  # the paper's head dim
    ],
)
def test_chunk_matches_reference(batch, seq_len, heads, dim, bounded, with_h0):
    seed, inputs = _inputs(batch, seq_len, heads, dim, dim, bounded, with_h0, batch)
    _check(inputs, seed)


@pytest.mark.parametrize("extreme", [False, True])
def test_chunk_swish_q_matches_swish_in_torch(extreme):
    """swish_q: pre-activation q in, the gradient with respect to it out (also through the launches that sum
    the diagonal sub-chunks column by column, with extreme gates)."""
    seed, inputs = _inputs(2, 90, 2, 32, 32, True, True, 2, gate_shift=-60.0 if extreme else 0.0,
                           gate_spread=20.0 if extreme else 1.0)
    inputs["q"] = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(seed)) * 2
    _check(inputs, seed, swish_q=True, log_bound_grad=extreme, grad_tol={"df_logit": 1e-3} if extreme else None)


@pytest.mark.parametrize("with_h0,bounded", [(True, True), (False, False)])
def test_chunk_varlen_three_documents(with_h0, bounded):
    """State resets at document boundaries inside one packed row (lengths 23, 77 and 41)."""
    cu_seqlens = [0, 23, 100, 141]
    seed, inputs = _inputs(1, 141, 2, 32, 32, bounded, with_h0, 3)
    _check(inputs, seed, cu_seqlens)


def test_chunk_varlen_matches_separate_calls():
    """A packed row gives what separate calls on each document give."""
    cu_seqlens = [0, 17, 81, 99]
    seed, inputs = _inputs(1, 99, 2, 16, 16, True, True, 3)
    cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=DEVICE)
    packed = {name: x.to(DEVICE) for name, x in inputs.items()}
    o, final = chunk.chunk_hgrn2(**packed, output_final_state=True, cu_seqlens=cu)
    for n in range(3):
        start, end = cu_seqlens[n], cu_seqlens[n + 1]
        part = {name: x[:, start:end] for name, x in packed.items() if name in ("q", "f_logit", "i")}
        o_n, final_n = chunk.chunk_hgrn2(**part, lower_bound=packed["lower_bound"],
                                         initial_state=packed["initial_state"][n : n + 1].contiguous(),
                                         output_final_state=True)
        assert relative_error(o[:, start:end], o_n) <= 1e-6, f"seed {seed}, document {n}"
        assert relative_error(final[n : n + 1], final_n) <= 1e-6, f"seed {seed}, document {n}"


def test_chunk_varlen_offsets_read_once_and_reread_after_an_in_place_change(monkeypatch):
    """The host copy of cu_seqlens is kept for the tensor seen last (every layer passes the same one): a second
    call reads nothing from the device, and an in-place change of the offsets is seen by the next call."""
    from kernels.hgrn2 import utils

    seed, inputs = _inputs(1, 99, 2, 16, 16, True, False, 3)
    packed = {name: x.to(DEVICE) for name, x in inputs.items() if x is not None}
    cu = torch.tensor([0, 17, 81, 99], dtype=torch.int32, device=DEVICE)
    o_first, _ = chunk.chunk_hgrn2(**packed, cu_seqlens=cu)
    reads = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t) or [])  # any read would fail the call
    o_again, _ = chunk.chunk_hgrn2(**packed, cu_seqlens=cu)
    monkeypatch.undo()
    assert not reads and torch.equal(o_first, o_again), f"seed {seed}"
    cu.copy_(torch.tensor([0, 40, 60, 99], dtype=torch.int32))
    o_moved, _ = chunk.chunk_hgrn2(**packed, cu_seqlens=cu)
    fresh = torch.tensor([0, 40, 60, 99], dtype=torch.int32, device=DEVICE)
    o_fresh, _ = chunk.chunk_hgrn2(**packed, cu_seqlens=fresh)
    assert torch.equal(o_moved, o_fresh) and not torch.equal(o_moved, o_first), f"seed {seed}"
    assert utils._last_offsets[0].cu_seqlens is fresh


def test_chunk_custom_scale_and_no_final_state():
    seed, inputs = _inputs(1, 40, 2, 32, 32, True, False, 1)
    _check(inputs, seed, scale=0.3)
    o, final = chunk.chunk_hgrn2(inputs["q"].to(DEVICE), inputs["f_logit"].to(DEVICE), inputs["i"].to(DEVICE))
    assert final is None and torch.isfinite(o).all()


@pytest.mark.parametrize("shift,spread,bounded", [(-30.0, 8.0, False), (-60.0, 20.0, True), (12.0, 4.0, False)])
def test_chunk_extreme_gates(shift, spread, bounded):
    """Forget-gate logits far below -20 (log f of -30 to -100 a step: a naive exp(-cumsum) overflows within a
    few steps) and far above 0 (f -> 1). Outputs and all gradients hold the usual relative tolerances, except
    d f_logit with no lower bound and f ~ e^-30: its exact value is ~f (tiny), while its log-decay part is
    formed as q dq - k dk from O(1) terms, so it is checked in absolute terms, at fp32 rounding of the
    gradients' scale. fla's chunk_gla forms d log f the same way."""
    seed, inputs = _inputs(2, 100, 2, 32, 32, bounded, True, 2, gate_shift=shift, gate_spread=spread)
    tiny_f = shift < 0 and not bounded
    # With f pinned at its bound, d f_logit carries (1 - beta) sigma(x) (dL/df) where dL/df = R/f - dk nearly
    # cancels: 1e-3 there. d lower_bound is formed in log space, d log f / d beta ~ 1/beta, so its absolute
    # error grows as 1/beta: with a bound of 3e-5 in one column it reached 1.2e-3 relative (a float32
    # recurrence: 4e-7). Its gradient with respect to log beta, beta * d beta, holds the usual 1e-4 (1e-6 there).
    grad_tol = {"df_logit": float("inf")} if tiny_f else {"df_logit": 1e-3}
    _check(inputs, seed, grad_tol=grad_tol, log_bound_grad=bounded)
    if tiny_f:
        with poisoned_buffers(chunk):
            _, _, grads = _run(chunk.chunk_hgrn2, inputs, None, DEVICE)
        ref_inputs = {name: None if x is None else x.double() for name, x in inputs.items()}
        _, _, ref_grads = _run(hgrn2_recurrent_reference, ref_inputs, None, "cpu")
        scale = max(g.abs().max().item() for g in ref_grads.values())
        error = (grads["f_logit"].cpu().double() - ref_grads["f_logit"]).abs().max().item()
        assert error <= 1e-5 * scale, f"seed {seed}: |d f_logit error| {error:.1e} > 1e-5 * {scale:.1e}"


@pytest.mark.parametrize("whole_chunk,key_groups,flag_block", [(True, 2, 32), (False, 2, 32), (True, 1, 32),
                                                               (True, 2, 4)])
def test_chunk_tiers_mixed_in_one_chunk(whole_chunk, key_groups, flag_block, monkeypatch):
    """The intra kernels run in three tiers per key block (chunk._whole_chunk_level, chunk._subchunk_level): the
    whole chunk factored about its middle (tier 0), 16-row sub-chunks (tier 1), the diagonal sub-chunks column
    by column (tier 2). Head 0 mixes them inside its chunks (key columns 16-31 decay ~3 a step: tier 1; columns
    32-47 ~6 a step in the second chunk only: tier 2 there); head 1 is tier 0 throughout (tier 1 with
    CONFIG["whole_chunk"] off). Checks the result and the tier flags that the forward finds and the backward
    reuses; with key_groups 2 the backward takes two programs per chunk (the tier-1 columns in the first, the
    tier-2 ones in the second). With flag_block 4 the rare tiers' launch has two programs, the second with two
    of the six (chunk, head) flags, and flagged chunks in both (chunk.FLAG_BLOCK; the interpreter reads it at
    each launch)."""
    if flag_block != chunk.FLAG_BLOCK.value:
        if torch.cuda.is_available():
            pytest.skip("compiled kernels keep the FLAG_BLOCK they were compiled with")
        monkeypatch.setattr(chunk, "FLAG_BLOCK", tl.constexpr(flag_block))
    monkeypatch.setitem(chunk.CONFIG, "whole_chunk", whole_chunk)
    monkeypatch.setitem(chunk.CONFIG, "intra_bwd_key_groups", key_groups)
    seed, inputs = _inputs(1, 150, 2, 64, 32, False, True, 1)
    gen = torch.Generator().manual_seed(seed)
    x = inputs["f_logit"]
    x[:, :, 0, 16:32] = -3.0 + 0.2 * torch.randn(x[:, :, 0, 16:32].shape, generator=gen)
    x[:, 64:128, 0, 32:48] -= 6.0
    allocated = []
    _check(inputs, seed, grad_tol={"df_logit": 1e-3}, allocated=allocated)
    (flags,) = [buffer.cpu() for buffer in allocated if buffer.dtype == torch.int32]  # the forward's, reused
    easy = 0 if whole_chunk else 1
    assert flags[:, 1].tolist() == [easy] * 3 and flags[:, 0].tolist() == [1, 2, 1], flags


def test_chunk_bf16_lower_bound_gradient_at_fp32_level():
    """d lower_bound sums a log-decay gradient over every token; that gradient is q dq - k dk summed over the
    chunk plus the chunk-end term sum_v S_end dS_end, which cancel in part. Formed from differently rounded
    bf16 values, the cancellation left d lower_bound at 5.7-12e-2 here and d f_logit at 1.0-1.3e-2 (5x fla's
    d lower_bound error on the GPU); with the chunk-end term split so that both sides use the same values,
    2.5-4.2e-3 and 4.8-5.4e-3 (docs/kernels.md, v7)."""
    seed, inputs = _inputs(1, 256, 2, 64, 64, True, False, 1, gate_spread=2.0)
    low = {name: (x if name == "lower_bound" or x is None else x.bfloat16()) for name, x in inputs.items()}
    _, _, grads = _run(chunk.chunk_hgrn2, low, None, DEVICE)
    ref_inputs = {name: None if x is None else x.double() for name, x in low.items()}
    _, _, ref_grads = _run(hgrn2_recurrent_reference, ref_inputs, None, "cpu")
    errors = {name: relative_error(grads[name].cpu(), ref_grads[name]) for name in ("lower_bound", "f_logit")}
    assert errors["lower_bound"] <= 8e-3 and errors["f_logit"] <= 8e-3, f"seed {seed}: {errors}"


def test_chunk_bf16_split_products_reduce_output_and_di_error(monkeypatch):
    """A's products on hi + lo parts of the decayed q and k (CONFIG a_prec "bf16x3"): with bf16 operands A
    carries their rounding into o and di, which the split removes (interpreter, T 256: o 8.6e-3 -> 3.6e-3, di
    8.8e-3 -> 4.7e-3)."""
    seed, inputs = _inputs(1, 128, 2, 32, 32, True, False, 1)
    low = {name: (x if name == "lower_bound" or x is None else x.bfloat16()) for name, x in inputs.items()}
    exact = {name: None if x is None else x.double() for name, x in low.items()}
    ref_o, _, ref_grads = _run(hgrn2_recurrent_reference, exact, None, "cpu")
    errors = []
    for a_prec in ("bf16", "bf16x3"):
        monkeypatch.setitem(chunk.CONFIG, "a_prec", a_prec)
        o, _, grads = _run(chunk.chunk_hgrn2, low, None, DEVICE)
        errors.append((relative_error(o.cpu(), ref_o), relative_error(grads["i"].cpu(), ref_grads["i"])))
    (o_plain, di_plain), (o_split, di_split) = errors
    assert o_split <= 0.7 * o_plain and di_split <= 0.7 * di_plain, f"seed {seed}: {errors}"


@pytest.mark.parametrize("programs,expected", [(128, 64), (64, 64), (32, 32), (8, 16), (1, 16)])
def test_scan_value_block_fills_the_processors(programs, expected, monkeypatch):
    """(sequence, head) pairs -> value columns per scan program at V = 128 on a 132-SM GPU: halved while
    fewer than half the SMs would get a program, never below 16."""
    monkeypatch.setattr(chunk, "_multiprocessors", lambda device: 132)
    assert chunk._value_block(128, programs, torch.device("cuda")) == expected


def test_sequences_spans_are_each_chunks_first_token_and_sequence_end():
    """The Gluon kernels' one-load view of a chunk (utils.Sequences.spans), for a dense batch and packed documents."""
    from kernels.hgrn2.utils import make_sequences

    dense = make_sequences(2, 130, None, 64, torch.device("cpu"))
    assert dense.spans.tolist() == [[0, 130], [64, 130], [128, 130], [130, 260], [194, 260], [258, 260]]
    packed = make_sequences(1, 300, torch.tensor([0, 77, 190, 300]), 64, torch.device("cpu"))
    assert packed.spans.tolist() == [[0, 77], [64, 77], [77, 190], [141, 190], [190, 300], [254, 300]]
    assert dense.spans.dtype == packed.spans.dtype == torch.int32


@pytest.mark.parametrize("key_dim,block_v,expected", [(128, 64, 4), (128, 32, 8), (64, 32, 8), (64, 64, 8)])
def test_scans_take_fewer_warps_only_where_gpu_tested(key_dim, block_v, expected, monkeypatch):
    """4 warps requested for both scans: granted only at 128 keys and 64 value columns (Triton 3.6 miscompiled
    the 4-warp forward scan at 64 keys and 32 columns; tests/test_kernels_gpu.py covers the granted case)."""
    monkeypatch.setitem(chunk.CONFIG, "fwd_scan_warps", 4)
    monkeypatch.setitem(chunk.CONFIG, "dstate_warps", 4)
    for warps_key in ("fwd_scan_warps", "dstate_warps"):
        assert chunk._scan_launch(warps_key, key_dim, block_v)["num_warps"] == expected


def test_chunk_narrow_scan_value_blocks(monkeypatch):
    """The 16-column value blocks that long sequences get on a GPU (eight scan programs per head here)."""
    monkeypatch.setitem(chunk.CONFIG, "block_v", 16)
    seed, inputs = _inputs(1, 70, 1, 128, 128, True, True, 1)
    _check(inputs, seed)


def test_chunk_forward_without_grad_keeps_no_states():
    seed, inputs = _inputs(1, 50, 1, 16, 16, False, False, 1)
    with torch.no_grad(), poisoned_buffers(chunk):
        o, _ = chunk.chunk_hgrn2(inputs["q"].to(DEVICE), inputs["f_logit"].to(DEVICE), inputs["i"].to(DEVICE))
    ref, _ = hgrn2_recurrent_reference(*(inputs[n].double() for n in ("q", "f_logit", "i")))
    assert relative_error(o.cpu(), ref) <= OUT_TOL, f"seed {seed}"


@pytest.mark.parametrize("options", [{"a_fp32": False}, {"a_fp32": True, "a_prec": "bf16"},
                                     {"a_fp32": True, "a_prec": "bf16x3"}, {"state_dtype": "fp32"}],
                         ids=["a_bf16", "a_fp32", "split_products", "fp32_chunk_states"])
def test_chunk_bf16_inputs_close_to_reference(options, monkeypatch):
    """bf16 in, bf16 out, fp32 running state: errors at bf16's resolution, for each precision option of the
    kernels."""
    for name, value in options.items():
        monkeypatch.setitem(chunk.CONFIG, name, value)
    seed, inputs = _inputs(1, 70, 2, 32, 32, True, True, 1)
    low = {name: (x if name in ("initial_state", "lower_bound") or x is None else x.bfloat16())
           for name, x in inputs.items()}
    o, final, grads = _run(chunk.chunk_hgrn2, low, None, DEVICE)
    assert o.dtype == torch.bfloat16 and grads["q"].dtype == torch.bfloat16
    ref_inputs = {name: None if x is None else x.double() for name, x in low.items()}
    ref_o, ref_final, ref_grads = _run(hgrn2_recurrent_reference, ref_inputs, None, "cpu")
    assert relative_error(o.cpu(), ref_o) <= 2e-2, f"seed {seed}"
    assert relative_error(final.cpu(), ref_final) <= 2e-2, f"seed {seed}"
    for name in grads:
        assert relative_error(grads[name].cpu(), ref_grads[name]) <= 5e-2, f"seed {seed}: d{name}"
