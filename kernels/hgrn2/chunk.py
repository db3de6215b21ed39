"""Chunkwise HGRN2 in Triton: forward and backward kernels with the gate math fused, and the autograd Function.

Notation (per head): x = f_logit, log f = gate(x, beta), k = 1 - f, q^ = scale * q, and, inside a chunk of BT
rows, cum_t = sum_{u <= t} log f_u (<= 0). The recurrence S_t = Diag(f_t) S_{t-1} + k_t i_t^T,
o_t = q^_t S_t splits per chunk into
    o = A i + (q^ * exp(cum)) S_prev,     A[t, s] = sum_k q^_tk k_sk exp(cum_tk - cum_sk)   (s <= t)
    S_next = exp(cum_last) * S_prev + (k * exp(cum_last - cum))^T i.
Every exponent above is <= 0, so nothing overflows whatever the gates. A is formed per key block (BK key
columns) in one of three tiers (_whole_chunk_level, _subchunk_level), chosen by how far the log-decay runs
inside the chunk:
  tier 0: each half of the chunk spans less than FACTOR_SPAN (all but extreme gates): the whole chunk factors
          about its middle r, exp(cum_t - cum_s) = exp(cum_t - r) * exp(r - cum_s), both factors <= e^60 and
          formed from sums inside one half; one product per key block;
  tier 1: every 16-row sub-chunk spans less than FACTOR_SPAN: a pair t, s of different sub-chunks m > j
          factors exactly into exp(decay from the start of m to t) * exp(decay from the end of j to the start
          of m) * exp(decay from s to the end of j), all <= 1, a sub-chunk with itself through its own start;
  tier 2: otherwise; as tier 1, but the diagonal sub-chunks are summed one column at a time (exp of
          differences, <= 1).
Tier 0 is one launch, a program per chunk, flagging the chunks that need more; tiers 1 and 2, rare, share a
second launch whose programs each look at FLAG_BLOCK flags and exit when none is raised (~2 µs; with a program
per chunk each rare launch took 6-12 µs, v16). The rare paths' registers cost the common one nothing.
The decayed q^ * exp(cum) and k * exp(cum_last - cum) that the scans multiply are written by the intra
kernel (input dtype); of the cumulative decays only per-chunk vectors leave the chip (the chunk's total, and
its first half's for the backward's tier 0).

Launches, forward:  intra (gates, A, decayed q/k; parallel over chunks; tier 0, then the rare tiers; on Hopper
                    with bf16 inputs tier 0 is the Gluon kernel of gluon_tier0.py, _gluon_fwd_tier0) -> scan
                    (sequential over chunks, state in registers).
Launches, backward: state-gradient scan (reverse, sequential over chunks: the state gradient at every chunk
                    end) -> inter-chunk dq, dk, the chunk-boundary log-decay gradient, D = do i^T for tier 0
                    and di (parallel over chunks) -> intra
                    (parallel over chunks and key groups: the intra-chunk parts of dq, dk; dq; the log-decay
                    gradient; d f_logit, d beta; tier 0, then the rare tiers; on Hopper with bf16 inputs tier 0
                    is the Gluon kernel of gluon_tier0.py, _gluon_tier0).
Every launch goes through a _Plan, made once per configuration: its kernels.launch.BoundLaunch objects take
Triton's JIT path once, then the compiled kernel's launcher without keying the arguments where the caller's
tensors are aligned (docs/kernels.md, "Plans").
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.hgrn2 import selfcheck
from kernels.hgrn2.utils import (
    SUB_CHUNK,
    Sequences,
    check_chunk_inputs,
    fast_exp,
    fast_sigmoid,
    gate_jacobians,
    gate_log_f_and_k,
    make_sequences,
)
from kernels.launch import BoundLaunch, argument_key, cdiv, direct_stream, interpreted

CHUNK = 64
BF16_DOT_IN_INTERPRETER = False  # set by kernels.hgrn2.testing once the interpreter's bf16 tl.dot is patched
# A sub-chunk whose log-decay spans less than this (in every key column) takes the factored diagonal:
# k exp(-cum) <= e^60 |k| cannot overflow, and every product stays accurate term by term.
FACTOR_SPAN = tl.constexpr(60.0)
# (chunk, head) flags per program of the rare tiers' launch (_rare_items)
FLAG_BLOCK = tl.constexpr(32)
# Launch settings (warps, software-pipelining stages); the benchmark tries variants through this dict.
# *_maxnreg caps registers per thread (None: ptxas decides); picked from ptxas spill reports and GPU sweeps
# (docs/kernels.md).
# fwd_scan_warps / dstate_warps: the scans' warps, granted below 8 only at K 128 / BV 64 (_scan_launch): with 4,
# Triton 3.6 miscompiled the bf16 forward scan at K 64 / BV 32 on the H200 (outputs off by 9%, NaN or an illegal
# address; docs/kernels.md). The forward scan at 4 (v17): forward 0.763 -> 0.706 ms at 32 x 2048 x 8, the same
# forward+backward; the state-gradient scan at 4: no gain.
# fast_math: the SFU's lg2 / ex2 / rcp (approx, ftz) in the intra kernels' gate and decay math
# (utils.gate_log_f_and_k, fast_exp, fast_rcp; v12: -0.2 ms forward+backward at the first shape, errors
# unchanged); grad_prec: _grad_options;
# a_fp32: _a_split; a_prec "bf16x3" (bf16 inputs, with a_fp32): A's products in the intra forward on hi + lo
# parts of the decayed q and k, so A carries ~16 bits instead of bf16's 8 (H200: di 2.54e-3 -> 2.42e-3, fla
# 2.50e-3; o 1.92e-3 -> 1.76e-3; +0.08 ms of 3.66 forward+backward; docs/kernels.md, v9).
# inter_*: the backward's per-chunk launch (_bwd_inter_kernel), all key columns in one program of 8 warps (D
# formed once per chunk; v13: 1.842 -> 1.794 ms forward+backward at the first shape against two programs of 64
# key columns at 4 warps), capped at 128 registers (two programs per SM, no spills; 106 KB of shared memory in
# two stages since it forms di too, v15: with 168 registers or one stage 1.67 against 1.56 ms). inter_dtype:
# _inter_dtype.
# intra_bwd_key_groups: programs per chunk of the intra backward (_intra_bwd_kernel; v13: 2 gave 1.903 against
# 1.936 ms with 1, 1.947 with 4: a fuller last wave). dbeta_row_groups: _dbeta_row_groups.
# intra_*0: the intra kernels' tier-0 launch; intra_* without the 0: the launch of tiers 1 and 2 (uncapped: tier
# 2's column-at-a-time loop is in it); _tier_launches. intra_bwd_stages0 1: tier 0 of the backward unpipelined
# (Triton's pipelining of its loop-invariant D loads took 110 KB of shared memory: 2.78 against 2.28 ms; v12).
# whole_chunk: False turns tier 0's factorisation off (every chunk then takes tier 1 or 2: slower, but a way
# around a compiler that mistranslates tier 0; v11).
# gluon_tier0: tier 0 of the intra backward as the Gluon kernel where it applies (_gluon_tier0; v15: 0.36 against
# ~0.70 ms at the first shape); gluon_maxnreg caps its registers (255 uncapped, 2 programs per SM; caps of
# 232 / 200 / 168 spill 156 / 620 / 1,020 B and did not measure faster, v15).
CONFIG = {"intra_fwd_warps": 4, "fwd_scan_warps": 4, "dstate_warps": 8, "scan_stages": 3, "intra_bwd_warps": 4,
          "block_v": None, "intra_fwd_maxnreg": None, "intra_bwd_maxnreg": None,
          "intra_fwd_maxnreg0": 128, "intra_bwd_maxnreg0": 168, "intra_fwd_block_k0": 16,
          "intra_bwd_block_k0": 16, "intra_fwd_warps0": 4, "intra_bwd_warps0": 4, "scan_maxnreg": None,
          "inter_warps": 8, "inter_block_v": 64, "inter_maxnreg": 128, "inter_stages": 2, "intra_fwd_stages": None,
          "intra_fwd_stages0": None, "intra_bwd_stages": None, "intra_bwd_stages0": 1, "intra_fwd_block_k": 32,
          "intra_bwd_block_k": 16, "fast_math": True, "grad_prec": "bf16x3", "a_fp32": True, "a_prec": "bf16x3",
          "state_dtype": "bf16", "whole_chunk": True, "inter_dtype": "bf16", "intra_bwd_key_groups": 2,
          "dbeta_row_groups": 4, "gluon_tier0": True, "gluon_maxnreg": None,
          "gluon_fwd_tier0": True}


# ----------------------------------------------------------------------------------------------------------
# Tile helpers
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(ptr, t0, eos, i_h, rows, cols, H: tl.constexpr, D: tl.constexpr):
    """Rows t0 + rows (masked at eos) and columns cols of a [tokens, H, D] tensor, as fp32."""
    t = t0 + rows
    mask = (t < eos)[:, None] & (cols < D)[None, :]
    return tl.load(ptr + (t * H + i_h)[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_tile(ptr, t0, eos, i_h, rows, cols, H: tl.constexpr, D: tl.constexpr):
    """Like _load_rows, in the tensor's own dtype (operands that go straight into tl.dot)."""
    t = t0 + rows
    mask = (t < eos)[:, None] & (cols < D)[None, :]
    return tl.load(ptr + (t * H + i_h)[:, None] * D + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, value, t0, eos, i_h, rows, cols, H: tl.constexpr, D: tl.constexpr):
    t = t0 + rows
    mask = (t < eos)[:, None] & (cols < D)[None, :]
    tl.store(ptr + (t * H + i_h)[:, None] * D + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _key_rows(t0, eos, i_h, rows, H: tl.constexpr, K: tl.constexpr):
    """Per row of a chunk: the offset of its key vector in a [tokens, H, K] tensor and whether it lies inside
    the sequence. Computed once per program; the key-block loops add the columns (K is a multiple of BK)."""
    t = t0 + rows
    return (t * H + i_h) * K, t < eos


@triton.jit
def _load_key_block(ptr, row_base, row_ok, cols):
    """Columns cols of the rows _key_rows describes, as fp32 (0 past the sequence's end)."""
    return tl.load(ptr + row_base[:, None] + cols[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)


@triton.jit
def _store_key_block(ptr, value, row_base, row_ok, cols):
    tl.store(ptr + row_base[:, None] + cols[None, :], value.to(ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _load_gates(x_ptr, beta_ptr, row_base, row_ok, i_h, cols, K: tl.constexpr, HAS_BETA: tl.constexpr,
                FAST_MATH: tl.constexpr):
    """(log f, k) of a key block; rows past eos get log f = 0 and k = 0 (no decay, no input)."""
    x = _load_key_block(x_ptr, row_base, row_ok, cols)
    beta = 0.0
    if HAS_BETA:
        beta = tl.load(beta_ptr + i_h * K + cols).to(tl.float32)[None, :]
    log_f, k = gate_log_f_and_k(x, beta, HAS_BETA, FAST_MATH)
    return tl.where(row_ok[:, None], log_f, 0.0), tl.where(row_ok[:, None], k, 0.0)


@triton.jit
def _load_q(q_ptr, row_base, row_ok, cols, scale, SWISH_Q: tl.constexpr, FAST_MATH: tl.constexpr):
    """scale * q of a key block; with SWISH_Q the stored q is pre-activation and swish is applied here."""
    q = _load_key_block(q_ptr, row_base, row_ok, cols)
    if SWISH_Q:
        q = q * fast_sigmoid(q, FAST_MATH)
    return q * scale


@triton.jit
def _swish_grad(q_ptr, row_base, row_ok, cols, FAST_MATH: tl.constexpr):
    """d swish(x) / dx = sigma(x) (1 + x (1 - sigma(x))) at the stored pre-activation q (loaded again where it
    is needed, a cache hit, rather than kept live across the key block in the register-capped kernel)."""
    x = _load_key_block(q_ptr, row_base, row_ok, cols)
    sig = fast_sigmoid(x, FAST_MATH)
    return sig * (1.0 + x * (1.0 - sig))


@triton.jit
def _split_bf16(x):
    """fp32 x as hi + lo, both bf16 (~16 significant bits together, against tf32's 11)."""
    hi = x.to(tl.bfloat16)
    return hi, (x - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _store_parts(base, offsets, x, lo_offset, mask, SPLIT: tl.constexpr):
    """fp32 x stored at base + offsets (base a pointer, or already the tile's pointers with offsets 0) as its hi
    and lo bf16 parts (_split_bf16; lo lo_offset elements further) with SPLIT, else in the buffer's dtype."""
    if SPLIT:
        hi, lo = _split_bf16(x)
        tl.store(base + offsets, hi, mask=mask)
        tl.store(base + lo_offset + offsets, lo, mask=mask)
    else:
        tl.store(base + offsets, x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _dot_split(a, a_hi, a_lo, b, GRAD_PREC: tl.constexpr, SPLIT: tl.constexpr):
    """a @ b with fp32 a and b: three bf16 products of the hi/lo parts (a's given: the caller splits it once),
    fp32 accumulation, if SPLIT; else one product at GRAD_PREC."""
    if SPLIT:
        b_hi, b_lo = _split_bf16(b)
        product = tl.dot(a_lo, b_hi)
        product = tl.dot(a_hi, b_lo, product)
        product = tl.dot(a_hi, b_hi, product)
    else:
        product = tl.dot(a, b, input_precision=GRAD_PREC)
    return product


@triton.jit
def _add_q_kt(a, q, k, DOT: tl.constexpr, PREC: tl.constexpr, A_PREC_SPLIT: tl.constexpr):
    """a + q k^T for fp32 q, k; with A_PREC_SPLIT as hi + lo bf16 parts, three products: A to ~16 bits instead of
    bf16's 8 (k split before its transpose: Triton 3.6 crashed on a split transposed fp32 tile, v7)."""
    if A_PREC_SPLIT:
        q_hi, q_lo = _split_bf16(q)
        k_hi, k_lo = _split_bf16(k)
        a = tl.dot(q_lo, tl.trans(k_hi), a)
        a = tl.dot(q_hi, tl.trans(k_lo), a)
        a = tl.dot(q_hi, tl.trans(k_hi), a)
    else:
        a += tl.dot(q.to(DOT), tl.trans(k.to(DOT)), input_precision=PREC)
    return a


@triton.jit
def _seq_bounds(cu_ptr, seq):
    return tl.load(cu_ptr + seq).to(tl.int64), tl.load(cu_ptr + seq + 1).to(tl.int64)


@triton.jit
def _row(tile, rows, j):
    """Row j of a register tile, as a vector (a masked sum: register tiles cannot be indexed)."""
    return tl.sum(tl.where((rows == j)[:, None], tile, 0.0), axis=0)


@triton.jit
def _subchunk_decays(log_f, NC: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """Log-decays of a [NC * BC, BK] tile of log f, split into NC sub-chunks of BC rows ([NC, BC, BK] views):
    inside (sum up to and including the row, within its sub-chunk), rest (after the row, within its
    sub-chunk), and per sub-chunk [NC, BK]: its total, the sum of the sub-chunks before it and after it.
    Each is a sum of few terms (no difference of large rounded numbers); all are <= 0."""
    lf = tl.reshape(log_f, [NC, BC, BK])
    inside = tl.cumsum(lf, 1)
    rest = tl.cumsum(lf, 1, reverse=True) - lf
    total = tl.sum(lf, 1)
    before = tl.cumsum(total, 0) - total
    after = tl.cumsum(total, 0, reverse=True) - total
    return inside, rest, total, before, after


@triton.jit
def _flat2(x, NC: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    return tl.reshape(x, [NC * BC, BK])


@triton.jit
def _gap(before, end, sub, j, with_diagonal, FAST_MATH: tl.constexpr):
    """Per sub-chunk m [NC, BK]: exp(before_m - end_j), the decay from the end of sub-chunk j to the start of m
    (<= 1) for m after j; for m = j (only ``with_diagonal``) exp(-total_j), which the caller bounds; else 0."""
    end_j = tl.sum(tl.where((sub == j)[:, None], end, 0.0), axis=0)
    first = tl.where(with_diagonal, j, j + 1)
    return fast_exp(tl.where((sub >= first)[:, None], before - end_j[None, :], float("-inf")), FAST_MATH)


@triton.jit
def _gap_columns(before, end, FACTORED: tl.constexpr, NC: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                 FAST_MATH: tl.constexpr):
    """Every _gap at once, laid out for one product over all column sub-chunks: [NC * BC, NC * BK], row t and
    column block j hold gap(m_t, j) = exp(before_m - end_j) (0 for j after m; at j = m only if FACTORED)."""
    m = tl.arange(0, NC)[:, None, None]
    j = tl.arange(0, NC)[None, :, None]
    valid = m >= j if FACTORED else m > j
    gaps = fast_exp(tl.where(valid, before[:, None, :] - end[None, :, :], float("-inf")), FAST_MATH)
    return tl.reshape(tl.broadcast_to(gaps[:, None, :, :], [NC, BC, NC, BK]), [NC * BC, NC * BK])


@triton.jit
def _repeat_columns(x, BT: tl.constexpr, NC: tl.constexpr, BK: tl.constexpr):
    """[BT, BK] -> [BT, NC * BK]: x repeated in each of NC column blocks."""
    return tl.reshape(tl.broadcast_to(x[:, None, :], [BT, NC, BK]), [BT, NC * BK])


@triton.jit
def _sum_column_blocks(x, BT: tl.constexpr, NC: tl.constexpr, BK: tl.constexpr):
    """[BT, NC * BK] -> [BT, BK]: the sum of the NC column blocks."""
    return tl.sum(tl.reshape(x, [BT, NC, BK]), 1)


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _intra_fwd_kernel(q_ptr, x_ptr, beta_ptr, a_ptr, qd_ptr, kd_ptr, total_ptr, half_ptr, flag_ptr, cu_ptr, chunks_ptr,
                      scale, n_flags, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                      BK: tl.constexpr, HAS_BETA: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                      FAST_MATH: tl.constexpr, A_PREC_SPLIT: tl.constexpr, TIER: tl.constexpr,
                      SWISH_Q: tl.constexpr, WHOLE: tl.constexpr, A_SPLIT: tl.constexpr, STORE_HALVES: tl.constexpr):
    """One chunk: A [BT, BT], the scan's operands q^ exp(cum) and k exp(cum_last - cum), and the chunk's total
    log-decay, BK key columns at a time (the gates of each row computed once).

    Launched twice (the module docstring). TIER 0: one program per (chunk, head), the whole-chunk
    factorisation (_intra_fwd_chunk_whole), storing in flag_ptr 0 if every key block took it
    (_whole_chunk_level), else 1. TIER 1 (the rare tiers, after it in stream order): each program looks at
    FLAG_BLOCK (chunk, head) flags (_rare_items) and redoes those flagged 1 with the sub-chunk factorisation
    (_intra_fwd_chunk), then, if a key block needs the column-at-a-time loop for its diagonal sub-chunks
    (_subchunk_level), with that loop, raising the flag to 2 for the backward. Each overwrites the outputs of
    the one before. The rare tiers' registers are their own: they cost the common path nothing, and their
    launch, FLAG_BLOCK times smaller than a program per chunk, costs ~2 µs when no chunk needs it.
    """
    if TIER == 0:
        i_c, i_h = tl.program_id(0), tl.program_id(1)
        level = _intra_fwd_chunk_whole(q_ptr, x_ptr, beta_ptr, a_ptr, qd_ptr, kd_ptr, total_ptr, half_ptr, cu_ptr,
                                      chunks_ptr, scale, i_c, i_h, H, K, BT, BC, BK, HAS_BETA, DOT, PREC, FAST_MATH,
                                      A_PREC_SPLIT, SWISH_Q, WHOLE, A_SPLIT, STORE_HALVES)
        tl.store(flag_ptr + i_c * H + i_h, level)
    else:
        first = tl.program_id(0) * FLAG_BLOCK
        for j in range(_rare_items(flag_ptr, first, n_flags)):
            item = first + j
            if tl.load(flag_ptr + item) == 1:
                i_c, i_h = item // H, item % H
                level = _intra_fwd_chunk(q_ptr, x_ptr, beta_ptr, a_ptr, qd_ptr, kd_ptr, total_ptr, cu_ptr,
                                         chunks_ptr, scale, i_c, i_h, H, K, BT, BC, BK, HAS_BETA, DOT, PREC,
                                         FAST_MATH, A_PREC_SPLIT, False, SWISH_Q, A_SPLIT)
                if level == 2:
                    _intra_fwd_chunk(q_ptr, x_ptr, beta_ptr, a_ptr, qd_ptr, kd_ptr, total_ptr, cu_ptr, chunks_ptr,
                                     scale, i_c, i_h, H, K, BT, BC, BK, HAS_BETA, DOT, PREC, FAST_MATH,
                                     A_PREC_SPLIT, True, SWISH_Q, A_SPLIT)
                    tl.store(flag_ptr + item, 2)


@triton.jit
def _rare_items(flag_ptr, first, n_flags):
    """How many of the FLAG_BLOCK (chunk, head) flags from ``first`` on a rare-tier program walks: 0 when none
    of them is raised (one vector load, the common case), else all of them that exist."""
    items = first + tl.arange(0, FLAG_BLOCK)
    raised = tl.max(tl.load(flag_ptr + items, mask=items < n_flags, other=0), 0) > 0
    return tl.where(raised, tl.minimum(n_flags - first, FLAG_BLOCK), 0)


@triton.jit
def _whole_chunk_level(span, WHOLE: tl.constexpr):
    """Given the [BK] largest span (-log-decay) of either half of the chunk per key column, over all key blocks
    (_half_decays): 0 if it is less than FACTOR_SPAN everywhere (the whole chunk factors about its middle; only
    if WHOLE), else 1 (tier 1 or 2: _subchunk_level)."""
    level = 1
    if WHOLE:
        level = tl.where(tl.max(span, axis=0) < FACTOR_SPAN, 0, 1)
    return level


@triton.jit
def _subchunk_level(total):
    """Given the [NC, BK] log-decay totals of a key block's sub-chunks (_subchunk_decays): 1 if each spans less
    than FACTOR_SPAN in every column (the sub-chunk factorisation), else 2 (extreme gates: the diagonal
    sub-chunks one column at a time)."""
    return tl.where(tl.max(tl.max(-total, axis=1), axis=0) < FACTOR_SPAN, 1, 2)


@triton.jit
def _half_decays(log_f, BT: tl.constexpr, BK: tl.constexpr):
    """Tier 0's log-decays of a [BT, BK] tile of log f: the cumulative sums within each half of BT / 2 rows
    (inside, [2, BT / 2, BK]) and the halves' totals [BK] (first, second)."""
    lf = tl.reshape(log_f, [2, BT // 2, BK])
    total = tl.sum(lf, 1)
    second = (tl.arange(0, 2) == 1)[:, None]
    return tl.cumsum(lf, 1), tl.sum(tl.where(second, 0.0, total), 0), tl.sum(tl.where(second, total, 0.0), 0)


@triton.jit
def _middle_decays(inside, first_total, BT: tl.constexpr, BK: tl.constexpr):
    """cum_t - r [BT, BK], r the cumulative log-decay at the end of the first half, from _half_decays' inside and
    first total: inside_t - r in the first half (minus the decay from t to the half's end), inside_t in the
    second. Sums within one half: at tier 0 (span < FACTOR_SPAN) the difference's rounding is ~ulp(60),
    absolute, and no difference of large rounded numbers is formed."""
    second = (tl.arange(0, 2) == 1)[:, None, None]
    return _flat2(inside - tl.where(second, 0.0, first_total[None, None, :]), 2, BT // 2, BK)


@triton.jit
def _middle_factors(middle, FAST_MATH: tl.constexpr):
    """exp(cum_t - r) and exp(r - cum_t), given middle = cum_t - r (r: the cumulative log-decay at the end of the
    first half; _intra_fwd_chunk_whole). Both are at most exp(half's span) < e^FACTOR_SPAN at tier 0, and their
    product for s <= t is exp(cum_t - cum_s) <= 1."""
    # the bound keeps blocks of higher tiers (redone later) finite
    return (fast_exp(tl.minimum(middle, FACTOR_SPAN), FAST_MATH),
            fast_exp(tl.minimum(-middle, FACTOR_SPAN), FAST_MATH))


@triton.jit
def _chunk_factors(to_middle, from_middle, first_total, second_total, FAST_MATH: tl.constexpr):
    """exp(cum_t) and exp(cum_last - cum_t) (the scans' decays, <= 1) from the middle factors (_middle_factors)
    and the halves' totals [BK]: exp(cum_t - r) exp(r), exp(r - cum_t) exp(cum_last - r); two exponentials per
    column instead of two per element. At tier 0 every factor lies within e^(+-FACTOR_SPAN): no overflow, and
    each product carries the rounding of its exponents, ~ulp(FACTOR_SPAN) absolute."""
    return (to_middle * fast_exp(first_total, FAST_MATH)[None, :],
            from_middle * fast_exp(second_total, FAST_MATH)[None, :])


@triton.jit
def _intra_fwd_chunk_whole(q_ptr, x_ptr, beta_ptr, a_ptr, qd_ptr, kd_ptr, total_ptr, half_ptr, cu_ptr, chunks_ptr,
                           scale, i_c, i_h, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                           BC: tl.constexpr, BK: tl.constexpr, HAS_BETA: tl.constexpr, DOT: tl.constexpr,
                           PREC: tl.constexpr, FAST_MATH: tl.constexpr, A_PREC_SPLIT: tl.constexpr,
                           SWISH_Q: tl.constexpr, WHOLE: tl.constexpr, A_SPLIT: tl.constexpr,
                           STORE_HALVES: tl.constexpr):
    """Tier 0 of _intra_fwd_kernel: A[t, s] = (q^_t exp(cum_t - r)) . (k_s exp(r - cum_s)), one product per key
    block, r the cumulative log-decay at the end of the first half (_middle_decays). With STORE_HALVES
    (gradients needed) r is stored for the backward's tier 0, which then needs no reduction for the decays
    (_intra_bwd_whole). Returns 0 if every key block factors so (A is right only then), else 1."""
    seq, c = tl.load(chunks_ptr + 2 * i_c), tl.load(chunks_ptr + 2 * i_c + 1)
    bos, eos = _seq_bounds(cu_ptr, seq)
    t0 = bos + c * BT
    rows = tl.arange(0, BT)
    row_base, row_ok = _key_rows(t0, eos, i_h, rows, H, K)
    a = tl.zeros([BT, BT], tl.float32)
    span = tl.zeros([BK], tl.float32)
    for kb in range(0, K, BK):
        cols = kb + tl.arange(0, BK)
        chunk_key = (i_c.to(tl.int64) * H + i_h) * K + cols
        log_f, k = _load_gates(x_ptr, beta_ptr, row_base, row_ok, i_h, cols, K, HAS_BETA, FAST_MATH)
        q = _load_q(q_ptr, row_base, row_ok, cols, scale, SWISH_Q, FAST_MATH)
        inside, first_total, second_total = _half_decays(log_f, BT, BK)
        span = tl.maximum(span, -tl.minimum(first_total, second_total))
        middle = _middle_decays(inside, first_total, BT, BK)
        to_middle, from_middle = _middle_factors(middle, FAST_MATH)
        exp_cum, exp_to_end = _chunk_factors(to_middle, from_middle, first_total, second_total, FAST_MATH)
        _store_key_block(qd_ptr, q * exp_cum, row_base, row_ok, cols)
        _store_key_block(kd_ptr, k * exp_to_end, row_base, row_ok, cols)
        tl.store(total_ptr + chunk_key, first_total + second_total)
        if STORE_HALVES:
            tl.store(half_ptr + chunk_key, first_total)
        a = _add_q_kt(a, q * to_middle, k * from_middle, DOT, PREC, A_PREC_SPLIT)
    # s > t (masked here) may have overflowed to inf: they never enter a sum
    _store_a(a_ptr, tl.where(rows[:, None] >= rows[None, :], a, 0.0), t0, eos, i_h, rows, H, BT, A_SPLIT)
    return _whole_chunk_level(span, WHOLE)


@triton.jit
def _intra_fwd_chunk(q_ptr, x_ptr, beta_ptr, a_ptr, qd_ptr, kd_ptr, total_ptr, cu_ptr, chunks_ptr, scale, i_c, i_h,
                     H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                     HAS_BETA: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, FAST_MATH: tl.constexpr,
                     A_PREC_SPLIT: tl.constexpr, DIAGONAL_LOOP: tl.constexpr, SWISH_Q: tl.constexpr,
                     A_SPLIT: tl.constexpr):
    """Tiers 1 and 2 of _intra_fwd_kernel: A from 16-row sub-chunks (the module docstring); DIAGONAL_LOOP (tier
    2) sums the diagonal sub-chunks of the key blocks that do not factor one column at a time. Returns the
    highest _subchunk_level of the key blocks (A is right without DIAGONAL_LOOP only if it is 1)."""
    seq, c = tl.load(chunks_ptr + 2 * i_c), tl.load(chunks_ptr + 2 * i_c + 1)
    bos, eos = _seq_bounds(cu_ptr, seq)
    NC: tl.constexpr = BT // BC
    t0 = bos + c * BT
    rows, sub = tl.arange(0, BT), tl.arange(0, NC)
    blk = rows // BC
    row_base, row_ok = _key_rows(t0, eos, i_h, rows, H, K)
    a = tl.zeros([BT, BT], tl.float32)
    level = 1
    for kb in range(0, K, BK):  # a loop, not unrolled: the unrolled kernel stalled on instruction fetch
        cols = kb + tl.arange(0, BK)
        log_f, k = _load_gates(x_ptr, beta_ptr, row_base, row_ok, i_h, cols, K, HAS_BETA, FAST_MATH)
        q = _load_q(q_ptr, row_base, row_ok, cols, scale, SWISH_Q, FAST_MATH)
        inside, rest, total, before, after = _subchunk_decays(log_f, NC, BC, BK)
        q_in = tl.reshape(q, [NC, BC, BK]) * fast_exp(inside, FAST_MATH)
        k_rest = tl.reshape(k, [NC, BC, BK]) * fast_exp(rest, FAST_MATH)
        q_dec = q_in * fast_exp(before, FAST_MATH)[:, None, :]
        k_dec = k_rest * fast_exp(after, FAST_MATH)[:, None, :]
        _store_key_block(qd_ptr, _flat2(q_dec, NC, BC, BK), row_base, row_ok, cols)
        _store_key_block(kd_ptr, _flat2(k_dec, NC, BC, BK), row_base, row_ok, cols)
        tl.store(total_ptr + (i_c.to(tl.int64) * H + i_h) * K + cols, tl.sum(total, 0))
        sub_level = _subchunk_level(total)
        level = tl.maximum(level, sub_level)
        factored = sub_level == 1
        end = before + total
        # one product per column sub-chunk j (one product over all of them, as the backward takes, measured
        # 0.2 ms slower here: docs/kernels.md, v7)
        for j in tl.static_range(0, NC):
            q_gap = _flat2(q_in * _gap(before, end, sub, j, factored, FAST_MATH)[:, None, :], NC, BC, BK)
            k_j = _flat2(tl.where((sub == j)[:, None, None], k_rest, 0.0), NC, BC, BK)
            a = _add_q_kt(a, q_gap, k_j, DOT, PREC, A_PREC_SPLIT)
        if DIAGONAL_LOOP:  # noqa: SIM102 (a compile-time and a run-time condition: Triton cannot mix them)
            if not factored:  # the diagonal sub-chunks one column s at a time: exp(inside_t - inside_s), t >= s
                inside2 = _flat2(inside, NC, BC, BK)
                for s in range(BT):
                    in_block = ((blk == s // BC) & (rows >= s))[:, None]
                    log_decay = tl.where(in_block, inside2 - _row(inside2, rows, s)[None, :], float("-inf"))
                    decay = fast_exp(log_decay, FAST_MATH)
                    a_col = tl.sum(q * _row(k, rows, s)[None, :] * decay, axis=1)
                    a += tl.where((rows == s)[None, :], a_col[:, None], 0.0)
    a = tl.where(rows[:, None] >= rows[None, :], a, 0.0)  # the diagonal sub-chunks' products cover s > t too
    _store_a(a_ptr, a, t0, eos, i_h, rows, H, BT, A_SPLIT)
    return level


@triton.jit
def _a_rows(a_ptr, t0, eos, i_h, rows, H: tl.constexpr, BT: tl.constexpr, A_SPLIT: tl.constexpr):
    """Pointers to a chunk's rows of A and the row mask: [tokens, H, parts, BT], with A_SPLIT the hi and lo bf16
    parts of fp32 A side by side in each row (hi first), else A in the buffer's dtype (one part)."""
    PARTS: tl.constexpr = 2 if A_SPLIT else 1
    t = t0 + rows
    return a_ptr + ((t * H + i_h) * (PARTS * BT))[:, None] + rows[None, :], (t < eos)[:, None]


@triton.jit
def _store_a(a_ptr, a, t0, eos, i_h, rows, H: tl.constexpr, BT: tl.constexpr, A_SPLIT: tl.constexpr):
    """A of one chunk (zero above the diagonal), split once here rather than by each reader (the forward scan,
    every chunk of its sequential walk, and _bwd_inter_kernel)."""
    ptrs, mask = _a_rows(a_ptr, t0, eos, i_h, rows, H, BT, A_SPLIT)
    _store_parts(ptrs, 0, a, BT, mask, A_SPLIT)


@triton.jit
def _dot_a(a_ptr, b, t0, eos, i_h, rows, H: tl.constexpr, BT: tl.constexpr, TRANSPOSED: tl.constexpr,
           DOT: tl.constexpr, PREC: tl.constexpr, A_SPLIT: tl.constexpr):
    """A @ b or (TRANSPOSED) A^T @ b for one chunk, A as _store_a left it (with A_SPLIT two products, lo then
    hi; rows past the sequence's end read as 0)."""
    ptrs, mask = _a_rows(a_ptr, t0, eos, i_h, rows, H, BT, A_SPLIT)
    a = tl.load(ptrs, mask=mask, other=0.0)
    if A_SPLIT:
        a_lo = tl.load(ptrs + BT, mask=mask, other=0.0)
        if TRANSPOSED:
            a, a_lo = tl.trans(a), tl.trans(a_lo)
        product = tl.dot(a_lo, b)
        product = tl.dot(a, b, product)
    else:
        a = a.to(DOT)
        if TRANSPOSED:
            a = tl.trans(a)
        product = tl.dot(a, b, input_precision=PREC)
    return product


@triton.jit
def _fwd_scan_kernel(qd_ptr, kd_ptr, total_ptr, v_ptr, a_ptr, o_ptr, h0_ptr, ht_ptr, hs_ptr, cu_ptr, chunk0_ptr,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
                     HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_HS: tl.constexpr, DOT: tl.constexpr,
                     PREC: tl.constexpr, A_SPLIT: tl.constexpr):
    """One (sequence, head, value block): walk the chunks, carrying the [K, BV] state in registers.

    The gates were applied by the intra kernel (decayed q^ and k, chunk totals), so each step is loads and
    three products: o = A i + q^_dec S, S = exp(total) S + k_dec^T i.
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    seq, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(cu_ptr, seq)
    rows, cols_k, cols_v = tl.arange(0, BT), tl.arange(0, K), i_v * BV + tl.arange(0, BV)
    state_offsets = cols_k[:, None] * V + cols_v[None, :]
    state = tl.zeros([K, BV], tl.float32)
    if HAS_H0:
        state = tl.load(h0_ptr + i_nh.to(tl.int64) * K * V + state_offsets)
    chunk0 = tl.load(chunk0_ptr + seq).to(tl.int64)
    for c in range(tl.cdiv(eos - bos, BT)):
        t0 = bos + c * BT
        if STORE_HS:  # the state entering each chunk, for the backward pass
            tl.store(hs_ptr + ((chunk0 + c) * H + i_h) * K * V + state_offsets, state.to(hs_ptr.dtype.element_ty))
        q_dec = _load_tile(qd_ptr, t0, eos, i_h, rows, cols_k, H, K).to(DOT)
        k_dec = _load_tile(kd_ptr, t0, eos, i_h, rows, cols_k, H, K).to(DOT)
        v = _load_tile(v_ptr, t0, eos, i_h, rows, cols_v, H, V).to(DOT)
        total = tl.load(total_ptr + ((chunk0 + c) * H + i_h) * K + cols_k)
        o = _dot_a(a_ptr, v, t0, eos, i_h, rows, H, BT, False, DOT, PREC, A_SPLIT)
        o += tl.dot(q_dec, state.to(DOT), input_precision=PREC)
        _store_rows(o_ptr, o, t0, eos, i_h, rows, cols_v, H, V)
        state = state * tl.exp(total)[:, None] + tl.dot(tl.trans(k_dec), v, input_precision=PREC)
    if STORE_HT:
        tl.store(ht_ptr + i_nh.to(tl.int64) * K * V + state_offsets, state)


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_dstate_kernel(qd_ptr, do_ptr, total_ptr, dht_ptr, dh0_ptr, ds_ptr, cu_ptr, chunk0_ptr, H: tl.constexpr,
                       K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr,
                       STORE_DH0: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr):
    """Split backward, sequential part: one (sequence, head, value block) walks the chunks in reverse and
    stores the state gradient at the end of every chunk (ds[c]); one product per chunk, no atomics. (The value
    gradient formed here as well, from the state gradient in registers, took as long as its own launch: the
    scan went from 0.08 to 0.20 ms at the first shape, one program per SM; v13.)"""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    seq, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(cu_ptr, seq)
    rows, cols_k, cols_v = tl.arange(0, BT), tl.arange(0, K), i_v * BV + tl.arange(0, BV)
    state_offsets = cols_k[:, None] * V + cols_v[None, :]
    dstate = tl.zeros([K, BV], tl.float32)
    if HAS_DHT:
        dstate = tl.load(dht_ptr + i_nh.to(tl.int64) * K * V + state_offsets)
    chunk0 = tl.load(chunk0_ptr + seq).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, BT)
    for c_rev in range(n_chunks):
        c = n_chunks - 1 - c_rev
        t0 = bos + c * BT
        tl.store(ds_ptr + ((chunk0 + c) * H + i_h) * K * V + state_offsets, dstate.to(ds_ptr.dtype.element_ty))
        q_dec = _load_tile(qd_ptr, t0, eos, i_h, rows, cols_k, H, K).to(DOT)
        do = _load_tile(do_ptr, t0, eos, i_h, rows, cols_v, H, V).to(DOT)
        total = tl.load(total_ptr + ((chunk0 + c) * H + i_h) * K + cols_k)
        dstate = dstate * tl.exp(total)[:, None] + tl.dot(tl.trans(q_dec), do, input_precision=PREC)
    if STORE_DH0:
        tl.store(dh0_ptr + i_nh.to(tl.int64) * K * V + state_offsets, dstate)


@triton.jit
def _bwd_inter_kernel(v_ptr, do_ptr, hs_ptr, ds_ptr, total_ptr, dq_ptr, dk_ptr, dgc_ptr, d_ptr, kd_ptr, a_ptr, dv_ptr,
                      cu_ptr, chunks_ptr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                      BV: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
                      A_SPLIT: tl.constexpr):
    """Parallel part of the backward, one (chunk, head), all of K and V (BV value columns at a time), so no
    atomics: the inter-chunk dq^ and dk before their decays (do S_prev^T, i ds^T), the part of the chunk-end
    log-decay gradient sum_v S_end ds_end that comes through the entering state, exp(total) sum_v S_prev
    ds_end, D = do i^T for the intra backward's tier 0, and the value gradient di = A^T do + k_dec ds.

    The rest of the chunk-end term, sum_t k_dec_t (i_t ds_end^T), is the chunk's sum of k dk over the
    inter-chunk dk, which the intra backward adds from the very values it subtracts in q^ dq^ - k dk: the two
    cancel exactly whatever the rounding of dk (with S_end formed here they did not, and bf16 rounding left
    d beta 5x less accurate than fla's, which sums it the same way).
    D is stored from here since this program has both operands loaded (0.01 ms less at the first shape than a
    launch of its own, v13; formed in the intra backward's tier 0 instead, per 16 key columns, it spilled
    there: 3.04 ms against 2.10, v12). di takes a second walk over V, reading do and ds again while they are in
    L2 (a launch of its own until v15 read them from memory: 1.594 -> 1.564 ms forward+backward at the first
    shape; formed in the first walk, beside dq and dk, it spilled 312 B at 128 registers)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    seq, c = tl.load(chunks_ptr + 2 * i_c), tl.load(chunks_ptr + 2 * i_c + 1)
    bos, eos = _seq_bounds(cu_ptr, seq)
    t0 = bos + c * BT
    rows, cols_k = tl.arange(0, BT), tl.arange(0, K)
    state_base = (i_c.to(tl.int64) * H + i_h) * K * V
    hs_ptr += state_base  # a 64-bit scalar base and 32-bit tile offsets: fewer address registers
    ds_ptr += state_base
    dq = tl.zeros([BT, K], tl.float32)
    dk = tl.zeros([BT, K], tl.float32)
    d = tl.zeros([BT, BT], tl.float32)
    boundary = tl.zeros([K], tl.float32)
    for vb in range(0, V, BV):
        cols_v = vb + tl.arange(0, BV)
        offsets = cols_k[:, None] * V + cols_v[None, :]
        h_prev = tl.load(hs_ptr + offsets).to(tl.float32)
        ds = tl.load(ds_ptr + offsets).to(tl.float32)
        do = _load_tile(do_ptr, t0, eos, i_h, rows, cols_v, H, V).to(DOT)
        v = _load_tile(v_ptr, t0, eos, i_h, rows, cols_v, H, V).to(DOT)
        dq = tl.dot(do, tl.trans(h_prev.to(DOT)), dq, input_precision=PREC)
        dk = tl.dot(v, tl.trans(ds.to(DOT)), dk, input_precision=PREC)
        d = tl.dot(do, tl.trans(v), d, input_precision=PREC)
        boundary += tl.sum(h_prev * ds, axis=1)
    _store_rows(dq_ptr, dq, t0, eos, i_h, rows, cols_k, H, K)
    _store_rows(dk_ptr, dk, t0, eos, i_h, rows, cols_k, H, K)
    per_key = (i_c.to(tl.int64) * H + i_h) * K + cols_k
    tl.store(dgc_ptr + per_key, boundary * tl.exp(tl.load(total_ptr + per_key)))
    _store_d(d_ptr, d, i_c, i_h, rows, H, BT, SPLIT)
    k_dec = _load_tile(kd_ptr, t0, eos, i_h, rows, cols_k, H, K).to(DOT)
    for vb in range(0, V, BV):
        cols_v = vb + tl.arange(0, BV)
        do = _load_tile(do_ptr, t0, eos, i_h, rows, cols_v, H, V).to(DOT)
        ds = tl.load(ds_ptr + cols_k[:, None] * V + cols_v[None, :]).to(DOT)
        dv = _dot_a(a_ptr, do, t0, eos, i_h, rows, H, BT, True, DOT, PREC, A_SPLIT)
        _store_rows(dv_ptr, tl.dot(k_dec, ds, dv, input_precision=PREC), t0, eos, i_h, rows, cols_v, H, V)


@triton.jit
def _store_d(d_ptr, d, i_c, i_h, rows, H: tl.constexpr, BT: tl.constexpr, SPLIT: tl.constexpr):
    """D = do i^T of one chunk, causal, for the intra backward's tier 0 (as hi and lo bf16 parts with SPLIT,
    else fp32): [chunks, H, parts, BT, BT]. (Stored with rows and columns in the Gluon tier 0's order, the
    scattered stores took this kernel from 0.29 to 0.68 ms; v16.)"""
    PARTS: tl.constexpr = 2 if SPLIT else 1
    base = d_ptr + (i_c.to(tl.int64) * H + i_h) * (PARTS * BT * BT)
    _store_parts(base, rows[:, None] * BT + rows[None, :], tl.where(rows[:, None] >= rows[None, :], d, 0.0),
                 BT * BT, None, SPLIT)


@triton.jit
def _intra_bwd_kernel(q_ptr, x_ptr, beta_ptr, v_ptr, do_ptr, d_ptr, dq_ptr, dk_ptr, dgc_ptr, half_ptr, total_ptr,
                      dq_out_ptr, dx_ptr, dbeta_ptr, flag_ptr, cu_ptr, chunks_ptr, scale, n_flags, H: tl.constexpr,
                      K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                      HAS_BETA: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                      GRAD_PREC: tl.constexpr, FAST_MATH: tl.constexpr, GRAD_SPLIT: tl.constexpr,
                      TIER: tl.constexpr, SWISH_Q: tl.constexpr, KEY_GROUPS: tl.constexpr,
                      ROW_GROUPS: tl.constexpr):
    """One chunk, BK key columns at a time (D = do i^T formed once): intra-chunk dq^ and dk (the forward's
    factorisation of A, with D in place of q^ k^T), plus the inter-chunk parts from the backward scan with
    their decays; dq; then the log-decay gradient (reverse cumulative sum of q^ dq^ - k dk inside the chunk
    plus the chunk-end term, see _bwd_inter_kernel) and, with the gradient through k, d f_logit and this
    chunk's share of d beta.

    The products that form dq^ and dk keep ~16 bits of their fp32 operands (GRAD_SPLIT: three bf16 products of
    hi/lo parts, for bf16 inputs): the log-decay gradient is the small difference q^ dq^ - k dk, summed over
    every token for d beta; bf16-rounded operands made d beta 20x and tf32 ones (wgmma truncates) 3x less
    accurate than fla's, the split 1.6x more accurate, and faster than tf32 (docs/kernels.md, v7).

    Launched twice; flag_ptr holds each chunk's tier as the forward found it (the same gates give the same
    tiers here). TIER 0 does the chunks of tier 0, all key blocks, with no test of its own; TIER 1 (the rare
    tiers, as in _intra_fwd_kernel: FLAG_BLOCK chunks per program) the other chunks, each key block by its own
    _subchunk_level.

    Key blocks are independent here: KEY_GROUPS programs share a chunk (neighbours in launch order at TIER 0,
    so D stays in L2), each K / KEY_GROUPS key columns."""
    if TIER == 0:
        i_c, i_h = tl.program_id(0) // KEY_GROUPS, tl.program_id(1)
        if tl.load(flag_ptr + i_c * H + i_h) == 0:
            _intra_bwd_chunk(q_ptr, x_ptr, beta_ptr, v_ptr, do_ptr, d_ptr, dq_ptr, dk_ptr, dgc_ptr, half_ptr,
                             total_ptr, dq_out_ptr, dx_ptr, dbeta_ptr, cu_ptr, chunks_ptr, scale, i_c, i_h,
                             (tl.program_id(0) % KEY_GROUPS) * (K // KEY_GROUPS), H, K, V, BT, BC, BK, HAS_BETA, DOT,
                             PREC, GRAD_PREC, FAST_MATH, GRAD_SPLIT, TIER, SWISH_Q, KEY_GROUPS, ROW_GROUPS)
    else:
        first = tl.program_id(0) * FLAG_BLOCK
        for j in range(_rare_items(flag_ptr, first, n_flags)):
            item = first + j
            if tl.load(flag_ptr + item) > 0:
                _intra_bwd_chunk(q_ptr, x_ptr, beta_ptr, v_ptr, do_ptr, d_ptr, dq_ptr, dk_ptr, dgc_ptr, half_ptr,
                                 total_ptr, dq_out_ptr, dx_ptr, dbeta_ptr, cu_ptr, chunks_ptr, scale, item // H,
                                 item % H, tl.program_id(1) * (K // KEY_GROUPS), H, K, V, BT, BC, BK, HAS_BETA, DOT,
                                 PREC, GRAD_PREC, FAST_MATH, GRAD_SPLIT, TIER, SWISH_Q, KEY_GROUPS, ROW_GROUPS)


@triton.jit
def _intra_bwd_chunk(q_ptr, x_ptr, beta_ptr, v_ptr, do_ptr, d_ptr, dq_ptr, dk_ptr, dgc_ptr, half_ptr, total_ptr,
                     dq_out_ptr, dx_ptr, dbeta_ptr, cu_ptr, chunks_ptr, scale, i_c, i_h, k_first,
                     H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                     BK: tl.constexpr, HAS_BETA: tl.constexpr,
                     DOT: tl.constexpr, PREC: tl.constexpr, GRAD_PREC: tl.constexpr, FAST_MATH: tl.constexpr,
                     GRAD_SPLIT: tl.constexpr, TIER: tl.constexpr, SWISH_Q: tl.constexpr, KEY_GROUPS: tl.constexpr,
                     ROW_GROUPS: tl.constexpr):
    """_intra_bwd_kernel's work on one chunk, key columns k_first to k_first + K / KEY_GROUPS, every key block by
    the whole-chunk factorisation (TIER 0) or by its sub-chunk level (TIER 1: tier 1 or 2)."""
    seq, c = tl.load(chunks_ptr + 2 * i_c), tl.load(chunks_ptr + 2 * i_c + 1)
    bos, eos = _seq_bounds(cu_ptr, seq)
    t0 = bos + c * BT
    rows = tl.arange(0, BT)
    if TIER == 0:  # D from _bwd_inter_kernel, loaded where it is multiplied
        d_causal = 0.0
    else:
        cols_v = tl.arange(0, V)
        do = _load_rows(do_ptr, t0, eos, i_h, rows, cols_v, H, V).to(DOT)
        v = _load_rows(v_ptr, t0, eos, i_h, rows, cols_v, H, V).to(DOT)
        d = tl.dot(do, tl.trans(v), input_precision=PREC)  # D[t, s] = do_t . i_s, shared by the key blocks
        d_causal = tl.where(rows[:, None] >= rows[None, :], d, 0.0)
    row_base, row_ok = _key_rows(t0, eos, i_h, rows, H, K)
    for kb in range(k_first, k_first + K // KEY_GROUPS, BK):
        cols = kb + tl.arange(0, BK)
        log_f, k = _load_gates(x_ptr, beta_ptr, row_base, row_ok, i_h, cols, K, HAS_BETA, FAST_MATH)
        if TIER == 0:
            q = _load_q(q_ptr, row_base, row_ok, cols, scale, SWISH_Q, FAST_MATH)
            dq, dk, exp_cum, exp_to_end = _intra_bwd_whole(q, log_f, k, d_ptr, half_ptr, total_ptr, i_c, i_h, cols,
                                                             rows, H, K, BT, BK, GRAD_PREC, GRAD_SPLIT, FAST_MATH)
            inter = _stored_inter_parts(dq_ptr, dk_ptr, dgc_ptr, i_c, i_h, row_base, row_ok, cols, H, K)
            _intra_bwd_finish(q_ptr, x_ptr, beta_ptr, dq_out_ptr, dx_ptr, dbeta_ptr, q, k, dq, dk, exp_cum, exp_to_end,
                              inter, i_c, i_h, row_base, row_ok, cols, scale, H, K, BT, BK, HAS_BETA, SWISH_Q,
                              FAST_MATH, ROW_GROUPS)
        else:
            q = _load_q(q_ptr, row_base, row_ok, cols, scale, SWISH_Q, FAST_MATH)
            if _subchunk_level(tl.sum(tl.reshape(log_f, [BT // BC, BC, BK]), 1)) == 1:
                dq, dk, exp_cum, exp_to_end = _intra_bwd_sub_chunks(q, log_f, k, d_causal, rows, BT, BC, BK,
                                                                    GRAD_PREC, GRAD_SPLIT, False, FAST_MATH)
            else:
                dq, dk, exp_cum, exp_to_end = _intra_bwd_sub_chunks(q, log_f, k, d_causal, rows, BT, BC, BK,
                                                                    GRAD_PREC, GRAD_SPLIT, True, FAST_MATH)
            inter = _stored_inter_parts(dq_ptr, dk_ptr, dgc_ptr, i_c, i_h, row_base, row_ok, cols, H, K)
            _intra_bwd_finish(q_ptr, x_ptr, beta_ptr, dq_out_ptr, dx_ptr, dbeta_ptr, q, k, dq, dk, exp_cum,
                              exp_to_end, inter, i_c, i_h, row_base, row_ok, cols, scale, H, K, BT, BK, HAS_BETA,
                              SWISH_Q, FAST_MATH, ROW_GROUPS)


@triton.jit
def _intra_bwd_whole(q, log_f, k, d_ptr, half_ptr, total_ptr, i_c, i_h, cols, rows, H: tl.constexpr, K: tl.constexpr,
                     BT: tl.constexpr, BK: tl.constexpr, GRAD_PREC: tl.constexpr, GRAD_SPLIT: tl.constexpr,
                     FAST_MATH: tl.constexpr):
    """Tier 0: the intra-chunk dq^ and dk of one key block with the whole chunk factored about its middle r:
    dq^_t = exp(cum_t - r) sum_s D[t, s] k_s exp(r - cum_s), dk_s likewise with D^T, one product each, D and D^T
    read from _bwd_inter_kernel's buffer (_dot_stored). r and the chunk's total come from the forward's tier 0
    (_intra_fwd_chunk_whole): one scan and no reduction here (v14; before, the halves' totals were reduced
    again: 0.08 ms more at the first shape). Also returns exp(cum) and exp(cum_last - cum) for the inter-chunk
    parts."""
    chunk_key = (i_c.to(tl.int64) * H + i_h) * K + cols
    first_total = tl.load(half_ptr + chunk_key)
    middle = _middle_decays(tl.cumsum(tl.reshape(log_f, [2, BT // 2, BK]), 1), first_total, BT, BK)
    to_middle, from_middle = _middle_factors(middle, FAST_MATH)
    dq = to_middle * _dot_stored(d_ptr, i_c, i_h, False, k * from_middle, rows, H, BT, GRAD_PREC, GRAD_SPLIT)
    dk = from_middle * _dot_stored(d_ptr, i_c, i_h, True, q * to_middle, rows, H, BT, GRAD_PREC, GRAD_SPLIT)
    exp_cum, exp_to_end = _chunk_factors(to_middle, from_middle, first_total,
                                         tl.load(total_ptr + chunk_key) - first_total, FAST_MATH)
    return dq, dk, exp_cum, exp_to_end


@triton.jit
def _dot_stored(d_ptr, i_c, i_h, TRANSPOSED: tl.constexpr, b, rows, H: tl.constexpr, BT: tl.constexpr,
                GRAD_PREC: tl.constexpr, GRAD_SPLIT: tl.constexpr):
    """D @ b or (TRANSPOSED) D^T @ b, D (causal) as _bwd_inter_kernel stored it: loaded, not kept in registers
    (as register operands of these narrow products, Triton 3.6 on sm_90 read shared memory out of range or gave
    wrong products; docs/kernels.md, v11). D^T is the loaded tile transposed (tl.trans: the product reads it
    from shared memory in the other order); loaded through transposed offsets instead, uncoalesced, it took
    0.04 ms more at the first shape (v13)."""
    PARTS: tl.constexpr = 2 if GRAD_SPLIT else 1
    base = d_ptr + (i_c.to(tl.int64) * H + i_h) * (PARTS * BT * BT)
    tile = rows[:, None] * BT + rows[None, :]
    if GRAD_SPLIT:
        d_hi = tl.load(base + tile)
        d_lo = tl.load(base + BT * BT + tile)
        if TRANSPOSED:
            d_hi, d_lo = tl.trans(d_hi), tl.trans(d_lo)
        product = _dot_split(d_hi, d_hi, d_lo, b, GRAD_PREC, GRAD_SPLIT)
    else:
        d = tl.load(base + tile)
        if TRANSPOSED:
            d = tl.trans(d)
        product = _dot_split(d, d, d, b, GRAD_PREC, GRAD_SPLIT)
    return product


@triton.jit
def _intra_bwd_sub_chunks(q, log_f, k, d_causal, rows, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                          GRAD_PREC: tl.constexpr, GRAD_SPLIT: tl.constexpr, DIAGONAL_LOOP: tl.constexpr,
                          FAST_MATH: tl.constexpr):
    """Tiers 1 and 2: the intra-chunk dq^ and dk of one key block from BC-row sub-chunks, as the forward's
    _intra_fwd_chunk; DIAGONAL_LOOP (tier 2) sums the diagonal sub-chunks one column at a time. Also returns
    exp(cum) and exp(cum_last - cum)."""
    NC: tl.constexpr = BT // BC
    blk = rows // BC
    inside, rest, total, before, after = _subchunk_decays(log_f, NC, BC, BK)
    exp_inside, exp_rest = fast_exp(inside, FAST_MATH), fast_exp(rest, FAST_MATH)
    q_in = tl.reshape(q, [NC, BC, BK]) * exp_inside
    k_rest = _flat2(tl.reshape(k, [NC, BC, BK]) * exp_rest, NC, BC, BK)

    # Pairs (t in sub-chunk m, s in j <= m) are q~_t gap(m, j) k~_s as in the forward; the factors exp(inside_t)
    # and exp(rest_s) are applied once, after the sums. All column sub-chunks j go into one product each:
    # operands [BT, NC * BK] whose column block j holds sub-chunk j's terms (k~ masked to its rows; q~ times
    # gap(m_t, j)), then the blocks summed (dq) or the row's own block taken (dk). Two products of width
    # NC * BK instead of 2 NC of width BK: 0.27 ms less at the benchmark's first shape (docs/kernels.md, v7).
    end = before + total
    q_in2 = _flat2(q_in, NC, BC, BK)
    gaps = _gap_columns(before, end, not DIAGONAL_LOOP, NC, BC, BK, FAST_MATH)
    own = blk[:, None] == (tl.arange(0, NC * BK) // BK)[None, :]
    k_own = tl.where(own, _repeat_columns(k_rest, BT, NC, BK), 0.0)
    d_hi, d_lo = _split_bf16(d_causal)  # unused without GRAD_SPLIT (dropped by the compiler)
    dq = _sum_column_blocks(gaps * _dot_split(d_causal, d_hi, d_lo, k_own, GRAD_PREC, GRAD_SPLIT), BT, NC, BK)
    q_gap = _repeat_columns(q_in2, BT, NC, BK) * gaps
    dk_all = _dot_split(tl.trans(d_causal), tl.trans(d_hi), tl.trans(d_lo), q_gap, GRAD_PREC, GRAD_SPLIT)
    dk = _sum_column_blocks(tl.where(own, dk_all, 0.0), BT, NC, BK)
    dq *= _flat2(exp_inside, NC, BC, BK)
    dk *= _flat2(exp_rest, NC, BC, BK)
    if DIAGONAL_LOOP:  # the diagonal sub-chunks one column s at a time
        inside2 = _flat2(inside, NC, BC, BK)
        for s in range(BT):
            in_block = ((blk == s // BC) & (rows >= s))[:, None]
            log_decay = tl.where(in_block, inside2 - _row(inside2, rows, s)[None, :], float("-inf"))
            decay = fast_exp(log_decay, FAST_MATH)
            d_col = tl.sum(tl.where((rows == s)[None, :], d_causal, 0.0), axis=1)
            weighted = d_col[:, None] * decay
            dq += weighted * _row(k, rows, s)[None, :]
            dk += tl.where((rows == s)[:, None], tl.sum(weighted * q, axis=0)[None, :], 0.0)
    exp_cum = _flat2(exp_inside * fast_exp(before, FAST_MATH)[:, None, :], NC, BC, BK)
    exp_to_end = _flat2(exp_rest * fast_exp(after, FAST_MATH)[:, None, :], NC, BC, BK)
    return dq, dk, exp_cum, exp_to_end


@triton.jit
def _stored_inter_parts(dq_ptr, dk_ptr, dgc_ptr, i_c, i_h, row_base, row_ok, cols, H: tl.constexpr,
                        K: tl.constexpr):
    """One key block's inter-chunk dq^, dk (before their decays) and chunk-end term, as _bwd_inter_kernel
    stored them. Loaded before _intra_bwd_finish rather than inside it (the chunk-end term with the others):
    tier 0 compiles 8 instructions and 4 spilled bytes shorter this way (kernel_sass.py, v12)."""
    return (_load_key_block(dq_ptr, row_base, row_ok, cols), _load_key_block(dk_ptr, row_base, row_ok, cols),
            tl.load(dgc_ptr + (i_c.to(tl.int64) * H + i_h) * K + cols))


@triton.jit
def _intra_bwd_finish(q_ptr, x_ptr, beta_ptr, dq_out_ptr, dx_ptr, dbeta_ptr, q, k, dq, dk, exp_cum, exp_to_end, inter,
                      i_c, i_h, row_base, row_ok, cols, scale, H: tl.constexpr, K: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, HAS_BETA: tl.constexpr, SWISH_Q: tl.constexpr,
                      FAST_MATH: tl.constexpr, ROW_GROUPS: tl.constexpr):
    """Given one key block's intra-chunk dq^ and dk: the inter-chunk parts (``inter``: dq^, dk before their
    decays and the chunk-end term) added with their decays (exp(cum), exp(cum_last - cum)), dq stored, then
    d f_logit and the chunk's share of d beta, as partial sums over ROW_GROUPS groups of rows
    (_dbeta_row_groups)."""
    dq_inter, dk_inter, chunk_end = inter
    dq += exp_cum * dq_inter
    dk_inter *= exp_to_end
    dk += dk_inter
    dq_post = dq * scale
    if SWISH_Q:
        dq_post *= _swish_grad(q_ptr, row_base, row_ok, cols, FAST_MATH)
    _store_key_block(dq_out_ptr, dq_post, row_base, row_ok, cols)

    # Log-decay gradient of row t: everything later in the chunk, plus the chunk-end term sum_v S_end ds_end
    # (all later chunks, and the final state's gradient): _bwd_inter_kernel's part through the entering state
    # and sum_t k_t dk_inter_t, from the same values as the k dk below (see _bwd_inter_kernel).
    carry = chunk_end + tl.sum(k * dk_inter, axis=0)
    grad_log_f = tl.cumsum(q * dq - k * dk, 0, reverse=True) + carry[None, :]
    x = _load_key_block(x_ptr, row_base, row_ok, cols)
    beta = 0.0
    if HAS_BETA:
        beta = tl.load(beta_ptr + i_h * K + cols).to(tl.float32)[None, :]
    dlogf_dx, dlogf_dbeta, dk_dx, dk_dbeta = gate_jacobians(x, beta, HAS_BETA, FAST_MATH)
    _store_key_block(dx_ptr, grad_log_f * dlogf_dx + dk * dk_dx, row_base, row_ok, cols)
    if HAS_BETA:
        contribution = tl.where(row_ok[:, None], grad_log_f * dlogf_dbeta + dk * dk_dbeta, 0.0)
        partial = tl.sum(tl.reshape(contribution, [ROW_GROUPS, BT // ROW_GROUPS, BK]), 1)
        group = (i_c.to(tl.int64) * ROW_GROUPS + tl.arange(0, ROW_GROUPS)) * H + i_h
        tl.store(dbeta_ptr + group[:, None] * K + cols[None, :], partial)


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------
def _interpreted() -> bool:
    """Whether this module's kernels run in Triton's interpreter: decided when @triton.jit ran (TRITON_INTERPRET
    then; kernels/hgrn2/testing.py re-imports the module to change it). Asked of a kernel rather than of the
    environment: os.environ.get took ~2 µs, five times per forward+backward."""
    return interpreted(_fwd_scan_kernel)


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _dot_config(dtype: torch.dtype):
    """fp32 inputs: fp32 operands, IEEE products (tests hold 1e-5). bf16: bf16 operands, fp32 accumulation.

    Triton's interpreter (3.7.1) multiplies bf16 bit patterns in tl.dot, so there bf16 inputs take fp32
    operands unless kernels.hgrn2.testing.patch_interpreter_bf16_dot has fixed it (the tests do).
    """
    if dtype == torch.float32 or (_interpreted() and not BF16_DOT_IN_INTERPRETER):
        return tl.float32, "ieee"
    return tl.bfloat16, "tf32"


def _grad_options(dtype: torch.dtype) -> dict:
    """Products of the intra backward's dq/dk, from fp32 operands: IEEE for fp32 inputs; for bf16 inputs
    CONFIG["grad_prec"]: "bf16x3" (hi/lo bf16 parts, three products) or a tl.dot precision ("tf32": d beta
    3x fla's error on the H200, "tf32x3": at fla's level but 4x slower; docs/kernels.md, v7)."""
    precision = "ieee" if dtype == torch.float32 else CONFIG["grad_prec"]
    return {"GRAD_PREC": "tf32" if precision == "bf16x3" else precision, "GRAD_SPLIT": precision == "bf16x3"}


def _value_block(value_dim: int, seq_heads: int = 0, device: torch.device | None = None) -> int:
    """Value columns per scan program: two blocks from V = 64 on (twice the programs of one; docs/kernels.md),
    halved (down to 16) while the scans would fill fewer than half the streaming multiprocessors: they walk the
    chunks in sequence, so with few (sequence, head) pairs, as at long T, the value blocks are their only
    parallelism (H200, B 2, T 8192, H 16: 64 / 32 / 16 columns 3.19 / 3.08 / 3.16 ms forward+backward; v10)."""
    if CONFIG["block_v"]:
        return min(CONFIG["block_v"], value_dim)
    block = max(16, value_dim // 2) if value_dim >= 64 else value_dim
    processors = _multiprocessors(device)
    while block > 16 and 2 * seq_heads * (value_dim // block) < processors:
        block //= 2
    return block


@functools.cache
def _multiprocessors(device: torch.device | None) -> int:
    if device is None or device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the chunk states and state gradients the backward reads: CONFIG["state_dtype"] "bf16" stores
    them in bf16 for bf16 inputs (half the bytes of the scans' stores and the per-chunk launches' loads; their
    products took bf16 operands already). H200, first shape: 2.767 -> 2.602 ms forward+backward, d f_logit
    2.38e-3 -> 2.40e-3 and d beta 1.86e-3 -> 1.91e-3 (fla 4.14e-3 / 4.21e-3; docs/kernels.md, v10). The scans
    keep the running state in fp32 either way."""
    return torch.bfloat16 if CONFIG["state_dtype"] == "bf16" and dtype == torch.bfloat16 else torch.float32


def _inter_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the inter-chunk dq^ and dk that _bwd_inter_kernel stores for the intra backward:
    CONFIG["inter_dtype"] "bf16" keeps them in bf16 for bf16 inputs (half the bytes of their round trip; the
    products took bf16 operands already). H200, same run: 1.833 -> 1.771 ms forward+backward at the first shape
    with d beta 1.86e-3 -> 1.91e-3 and d f_logit 2.38e-3 -> 2.39e-3 (fla 4.1e-3 / 4.1e-3; docs/kernels.md, v13).
    The sum of k dk that cancels against it in the log-decay gradient is formed in the intra backward from the
    same stored values (_bwd_inter_kernel), so the rounding does not break that cancellation."""
    return torch.bfloat16 if CONFIG["inter_dtype"] == "bf16" and dtype == torch.bfloat16 else torch.float32


def _a_split(dot) -> bool:
    """CONFIG["a_fp32"], bf16 inputs: A formed in fp32 and multiplied as hi + lo bf16 parts in the forward scan
    and the per-chunk backward's di (fla keeps A in fp32); the intra forward stores the two parts (_store_a;
    v13, before: fp32 A split by each reader). H200, same run: di 3.02e-3 -> 2.54e-3 (fla 2.50e-3), o
    2.52e-3 -> 1.92e-3 (fla 2.48e-3), for +0.12 ms of 3.52 forward+backward (docs/kernels.md, v8)."""
    return CONFIG["a_fp32"] and dot == tl.bfloat16


def _a_prec_split(dot) -> bool:
    """CONFIG["a_prec"] "bf16x3" with fp32 A: the intra forward forms A's products from hi + lo parts."""
    return _a_split(dot) and CONFIG["a_prec"] == "bf16x3"


def _gate_options() -> dict:
    """The hardware log in the intra kernels' gate math (not under the interpreter: no inline assembly)."""
    return {"FAST_MATH": CONFIG["fast_math"] and not _interpreted()}


def _maxnreg(name: str) -> dict:
    return {} if CONFIG[name] is None else {"maxnreg": CONFIG[name]}


def _stages(name: str) -> dict:
    return {} if CONFIG[name] is None else {"num_stages": CONFIG[name]}


def _tier_launches(name: str, key_dim: int) -> dict:
    """Launch settings of an intra kernel's two launches (``name``: "intra_fwd" or "intra_bwd"), by TIER: key
    columns per step, warps and register cap from CONFIG[name + "_block_k0" / "_warps0" / "_maxnreg0"] for tier
    0; from CONFIG[name + "_block_k" / "_warps"] for the rare tiers, uncapped (tier 2's column-at-a-time loop
    is among them)."""
    def settings(suffix: str) -> dict:
        return {"BK": min(CONFIG[name + "_block_k" + suffix], key_dim), "num_warps": CONFIG[name + "_warps" + suffix],
                **_maxnreg(name + "_maxnreg" + suffix), **_stages(name + "_stages" + suffix)}

    return {0: settings("0"), 1: settings("")}


def _key_groups(key_dim: int) -> int:
    """Programs per chunk of the intra backward (CONFIG["intra_bwd_key_groups"], at most one per key block of
    the widest tier): each must get whole key blocks of every tier."""
    widest = max(launch["BK"] for launch in _tier_launches("intra_bwd", key_dim).values())
    groups = min(CONFIG["intra_bwd_key_groups"], key_dim // widest)
    if groups < 1 or key_dim % (groups * widest):
        raise ValueError(f"CONFIG['intra_bwd_key_groups'] = {CONFIG['intra_bwd_key_groups']} does not split "
                         f"{key_dim} key columns into whole blocks of {widest}")
    return groups


def _dbeta_row_groups() -> int:
    """Row groups per chunk of the d beta partial sums (CONFIG["dbeta_row_groups"]): the intra backward sums each
    group of CHUNK / groups rows and torch sums the groups. 4 groups of 16 rows are the 4 warps' own rows, so the
    kernel's sum needs no exchange between warps (v14)."""
    groups = CONFIG["dbeta_row_groups"]
    if groups < 1 or groups & (groups - 1) or CHUNK % groups:
        raise ValueError(f"CONFIG['dbeta_row_groups'] = {groups} is not a power of two dividing the chunk's "
                         f"{CHUNK} rows")
    return groups


def _bind_tiers(kernel, name: str, key_dim: int, **options) -> dict[int, BoundLaunch]:
    """An intra kernel's launches (the module docstring) by tier: tier 0 for every chunk; the rare tiers (1) for
    the chunks flagged for them, FLAG_BLOCK (chunk, head) pairs per program (_launch_tiers)."""
    return {tier: BoundLaunch(kernel, TIER=tier, **options, **settings)
            for tier, settings in _tier_launches(name, key_dim).items()}


def _launch_tiers(launches: dict[int, BoundLaunch], grid, args, seqs: Sequences, heads: int, stream,
                  key_groups: int = 1) -> None:
    """Tier 0 (where Triton runs it) on ``grid``, then the rare tiers, key_groups programs per FLAG_BLOCK flags."""
    flags = seqs.num_chunks * heads
    grids = {0: grid, 1: (cdiv(flags, FLAG_BLOCK.value), key_groups)}
    for tier, bound in launches.items():
        bound(grids[tier], (*args, flags), stream)


@functools.cache
def _gluon_module():
    """kernels.hgrn2.gluon_tier0, imported on first use on a GPU only (Gluon has no interpreter); None with a
    Triton whose Gluon lacks what it uses (written for 3.6), which then leaves tier 0 to Triton's kernel."""
    try:
        from kernels.hgrn2 import gluon_tier0
    except (ImportError, AttributeError):
        return None
    return gluon_tier0


def _gluon_applies(dtype: torch.dtype, device: torch.device) -> bool:
    """What both Gluon tier-0 kernels need: compiled (not interpreted) on Hopper (sm_90), bf16 inputs, the
    hardware gate math, and a Triton whose Gluon has what they use."""
    return (device.type == "cuda" and not _interpreted() and _capability(device) == (9, 0)
            and dtype == torch.bfloat16 and _gate_options()["FAST_MATH"] and _gluon_module() is not None)


def _gluon_fwd_tier0(dtype: torch.dtype, device: torch.device, key_dim: int) -> bool:
    """Whether tier 0 of the intra forward runs as the Gluon kernel (gluon_tier0.intra_fwd_tier0_kernel;
    CONFIG["gluon_fwd_tier0"]): where _gluon_applies, with A kept as hi + lo parts of split products, the
    whole-chunk factorisation and K of 64 or 128."""
    return (CONFIG["gluon_fwd_tier0"] and _a_prec_split(_dot_config(dtype)[0]) and CONFIG["whole_chunk"]
            and key_dim in (64, 128) and _gluon_applies(dtype, device))


def _gluon_tier0(dtype: torch.dtype, device: torch.device, key_dim: int, grad_options: dict,
                 row_groups: int) -> bool:
    """Whether tier 0 of the intra backward runs as the Gluon kernel (kernels/hgrn2/gluon_tier0.py;
    CONFIG["gluon_tier0"]): where _gluon_applies, with the split products, whole key groups of 64 columns and
    d beta in 4 row groups. Elsewhere, Triton's tier 0."""
    return (CONFIG["gluon_tier0"] and grad_options["GRAD_SPLIT"] and key_dim % 64 == 0 and row_groups == 4
            and _gluon_applies(dtype, device))


def _scan_launch(warps_key: str, key_dim: int, block_v: int) -> dict:
    """Launch settings of a scan ("fwd_scan_warps" or "dstate_warps"). Fewer than 8 warps only at 128 keys and 64
    value columns, where the GPU tests check them: Triton 3.6 miscompiled the 4-warp forward scan at 64 keys and
    32 value columns (docs/kernels.md)."""
    tested = key_dim == 128 and block_v == 64
    warps = CONFIG[warps_key] if tested else max(CONFIG[warps_key], 8)
    return {"num_warps": warps, "num_stages": CONFIG["scan_stages"], **_maxnreg("scan_maxnreg")}


class _Plan:
    """What a forward+backward decides on the host for one configuration (_plan's key: dtype, device, head count
    and dims, bound, options, CONFIG and the rest it reads), decided once: buffer dtypes, and which kernels run
    with which settings, bound into kernels.launch.BoundLaunch objects that keep each launch's compiled kernel
    after its first call. Deciding it per call and keying every argument of seven launches was about a third of
    the Python in a forward+backward (docs/kernels.md, v19). The backward's part is made at the first backward,
    which refuses a bad setting there before any launch."""

    def __init__(self, dtype: torch.dtype, device: torch.device, heads: int, key_dim: int, value_dim: int,
                 has_beta: bool, swish_q: bool, keep: bool, has_h0: bool, final_state: bool, block_v: int,
                 launch_device: int | None) -> None:
        self.dtype, self.device, self.heads, self.key_dim, self.value_dim = dtype, device, heads, key_dim, value_dim
        self.has_beta, self.swish_q, self.keep, self.has_h0 = has_beta, swish_q, keep, has_h0
        self.final_state, self.block_v = final_state, block_v
        # the device the launches' compiled kernels are kept for (None: they are not; kernels.launch.direct_stream)
        self.launch_device = launch_device
        self.dot, self.prec = _dot_config(dtype)
        self.a_split = _a_split(self.dot)
        self.a_dtype = torch.bfloat16 if self.a_split else dtype
        self.state_dtype = _state_dtype(dtype)
        self.checked = False  # the first-use self-check (selfcheck.verify_once) has run or does not apply
        self._backward: _BackwardPlan | None = None
        self.fwd_tiers = _bind_tiers(
            _intra_fwd_kernel, "intra_fwd", key_dim, H=heads, K=key_dim, BT=CHUNK, BC=SUB_CHUNK, HAS_BETA=has_beta,
            DOT=self.dot, PREC=self.prec, A_PREC_SPLIT=_a_prec_split(self.dot), SWISH_Q=swish_q,
            WHOLE=CONFIG["whole_chunk"], A_SPLIT=self.a_split, STORE_HALVES=keep, **_gate_options())
        self.fwd_gluon = None
        if _gluon_fwd_tier0(dtype, device, key_dim):
            self.fwd_gluon = BoundLaunch(_gluon_module().intra_fwd_tier0_kernel, H=heads, K=key_dim,
                                         HAS_BETA=has_beta, SWISH_Q=swish_q, STORE_HALVES=keep, num_warps=4)
            del self.fwd_tiers[0]
        self.fwd_scan = BoundLaunch(
            _fwd_scan_kernel, H=heads, K=key_dim, V=value_dim, BT=CHUNK, BV=block_v, HAS_H0=has_h0,
            STORE_HT=final_state, STORE_HS=keep, DOT=self.dot, PREC=self.prec, A_SPLIT=self.a_split,
            **_scan_launch("fwd_scan_warps", key_dim, block_v))

    def backward(self) -> _BackwardPlan:
        if self._backward is None:
            self._backward = _BackwardPlan(self)
        return self._backward


class _BackwardPlan:
    """The backward's part of a _Plan."""

    def __init__(self, plan: _Plan) -> None:
        heads, key_dim, value_dim, dtype = plan.heads, plan.key_dim, plan.value_dim, plan.dtype
        # settings checked before any launch: a bad one leaves no half-written gradients
        self.key_groups, self.row_groups = _key_groups(key_dim), _dbeta_row_groups()
        self.inter_dtype = _inter_dtype(dtype)
        grad_options = _grad_options(dtype)
        self.split = grad_options["GRAD_SPLIT"]
        sizes = {"H": heads, "K": key_dim, "V": value_dim, "BT": CHUNK, "DOT": plan.dot, "PREC": plan.prec}
        self.dstate = {has_dht: BoundLaunch(
            _bwd_dstate_kernel, BV=plan.block_v, HAS_DHT=has_dht, STORE_DH0=plan.has_h0, **sizes,
            **_scan_launch("dstate_warps", key_dim, plan.block_v)) for has_dht in (False, True)}
        self.inter = BoundLaunch(
            _bwd_inter_kernel, BV=min(CONFIG["inter_block_v"], value_dim), **sizes, num_warps=CONFIG["inter_warps"],
            num_stages=CONFIG["inter_stages"], SPLIT=self.split, A_SPLIT=plan.a_split, **_maxnreg("inter_maxnreg"))
        self.tiers = _bind_tiers(
            _intra_bwd_kernel, "intra_bwd", key_dim, H=heads, K=key_dim, V=value_dim, BT=CHUNK, BC=SUB_CHUNK,
            HAS_BETA=plan.has_beta, DOT=plan.dot, PREC=plan.prec, SWISH_Q=plan.swish_q, KEY_GROUPS=self.key_groups,
            ROW_GROUPS=self.row_groups, **grad_options, **_gate_options())
        self.gluon = None
        if _gluon_tier0(dtype, plan.device, key_dim, grad_options, self.row_groups):
            gluon = _gluon_module()
            self.gluon = BoundLaunch(gluon.intra_bwd_tier0_kernel, H=heads, K=key_dim, HAS_BETA=plan.has_beta,
                                     SWISH_Q=plan.swish_q, num_warps=4, **_maxnreg("gluon_maxnreg"))
            self.gluon_key_blocks = key_dim // gluon.KEYS.value
            del self.tiers[0]


@functools.lru_cache(maxsize=64)
def _plan(config: tuple, bf16_dot: bool, integer_class, *arguments) -> _Plan:
    """The _Plan of ``arguments``; the rest of the key is what else its decisions and launches depend on:
    ``config`` (CONFIG's items), ``bf16_dot`` (BF16_DOT_IN_INTERPRETER) and the class of the rare tiers' integer
    argument (kernels.launch.argument_key), so that a change to any of them makes a new plan."""
    return _Plan(*arguments)


def _aligned(*tensors: torch.Tensor | None) -> bool:
    """Whether every given tensor's address is 16-byte aligned, as Triton specialises pointers. Buffers from
    ``empty`` always are (CUDA's caching allocator hands out 512-byte blocks), so only the caller's tensors
    decide whether a plan's launches may skip keying their arguments (kernels.launch.BoundLaunch)."""
    return all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels write comes from here (tests replace it with NaN-filled buffers)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _forward(plan: _Plan, q, f_logit, i, beta, scale, initial_state, seqs: Sequences, stream):
    """The forward's launches; ``stream`` (or None): kernels.launch.BoundLaunch's."""
    batch, seq_len, heads, key_dim = q.shape
    tokens, device = batch * seq_len, q.device
    beta_arg = beta if plan.has_beta else q
    keep = plan.keep
    a = empty((tokens, heads, 2 if plan.a_split else 1, CHUNK), plan.a_dtype, device)
    q_dec = empty(q.shape, q.dtype, device)
    k_dec = empty(q.shape, q.dtype, device)
    totals = empty((seqs.num_chunks, heads, key_dim), torch.float32, device)
    # r, the cumulative log-decay at the end of each chunk's first half, for the backward's tier 0
    halves = empty(totals.shape, torch.float32, device) if keep else None
    flags = empty((seqs.num_chunks, heads), torch.int32, device)
    intra_args = (q, f_logit, beta_arg, a, q_dec, k_dec, totals, halves if keep else totals, flags,
                  seqs.cu_seqlens, seqs.chunks, scale)
    if plan.fwd_gluon is not None:  # it takes the chunks' spans in place of cu_seqlens and the chunk list
        plan.fwd_gluon((seqs.num_chunks, heads), (*intra_args[:-3], seqs.spans, scale), stream)
    _launch_tiers(plan.fwd_tiers, (seqs.num_chunks, heads), intra_args, seqs, heads, stream)
    o = empty(i.shape, i.dtype, device)
    final = (empty((seqs.num_seqs, heads, key_dim, plan.value_dim), torch.float32, device)
             if plan.final_state else None)
    states = (empty((seqs.num_chunks, heads, key_dim, plan.value_dim), plan.state_dtype, device) if keep
              else None)
    plan.fwd_scan(
        (cdiv(plan.value_dim, plan.block_v), seqs.num_seqs * heads),
        (q_dec, k_dec, totals, i, a, o, initial_state if initial_state is not None else q,
         final if final is not None else q, states if states is not None else q, seqs.cu_seqlens,
         seqs.chunk_offsets), stream)
    return o, final, (a, q_dec, k_dec, totals, halves, states, flags)


def _backward(plan: _Plan, q, f_logit, i, beta, scale, initial_state, saved, do, dht, seqs: Sequences, stream):
    """The backward's launches; ``stream`` (or None): kernels.launch.BoundLaunch's."""
    bwd = plan.backward()
    a, q_dec, k_dec, totals, halves, states, flags = saved
    batch, seq_len, heads, key_dim = q.shape
    tokens, device = batch * seq_len, q.device
    beta_arg = beta if plan.has_beta else q
    dq_inter = empty((tokens, heads, key_dim), bwd.inter_dtype, device)
    dk_inter = empty((tokens, heads, key_dim), bwd.inter_dtype, device)
    dgc = empty((seqs.num_chunks, heads, key_dim), torch.float32, device)
    di = empty(i.shape, i.dtype, device)
    dh0 = empty(initial_state.shape, torch.float32, device) if initial_state is not None else None
    ds = empty(states.shape, states.dtype, device)
    bwd.dstate[dht is not None](
        (cdiv(plan.value_dim, plan.block_v), seqs.num_seqs * heads),
        (q_dec, do, totals, dht if dht is not None else q, dh0 if dh0 is not None else q, ds, seqs.cu_seqlens,
         seqs.chunk_offsets), stream)
    d_buffer = empty((seqs.num_chunks, heads, 2 if bwd.split else 1, CHUNK, CHUNK),
                     torch.bfloat16 if bwd.split else torch.float32, device)
    bwd.inter((seqs.num_chunks, heads), (i, do, states, ds, totals, dq_inter, dk_inter, dgc, d_buffer, k_dec, a, di,
                                         seqs.cu_seqlens, seqs.chunks), stream)
    dq = empty(q.shape, q.dtype, device)
    dx = empty(f_logit.shape, f_logit.dtype, device)
    # d beta's partial sums, one per chunk and row group, summed below over a contiguous leading dimension
    dbeta_chunks = empty((seqs.num_chunks * bwd.row_groups, heads, key_dim), torch.float32, device)
    intra_args = (q, f_logit, beta_arg, i, do, d_buffer, dq_inter, dk_inter, dgc, halves, totals, dq, dx, dbeta_chunks,
                  flags, seqs.cu_seqlens, seqs.chunks, scale)
    if bwd.gluon is not None:  # its arguments without i and do, spans in place of cu_seqlens and chunks
        bwd.gluon((seqs.num_chunks * bwd.gluon_key_blocks, heads),
                  (*intra_args[:3], *intra_args[5:-3], seqs.spans, scale), stream)
    _launch_tiers(bwd.tiers, (seqs.num_chunks * bwd.key_groups, heads), intra_args, seqs, heads, stream,
                  bwd.key_groups)
    dbeta = dbeta_chunks.sum(0) if plan.has_beta else None
    return dq, dx, di, dbeta, dh0


class ChunkHGRN2Function(torch.autograd.Function):
    """chunk_hgrn2's autograd Function: differentiable in q, f_logit, i, lower_bound and initial_state; beta (the
    bound in fp32), the plan and the rest come from chunk_hgrn2."""

    @staticmethod
    def forward(ctx, q, f_logit, i, lower_bound, initial_state, beta, scale, output_final_state, seqs, plan, route):
        o, final, saved = _forward(plan, q, f_logit, i, beta, scale, initial_state, seqs, route and route[1])
        ctx.save_for_backward(q, f_logit, i, beta, initial_state, *saved)
        ctx.seqs, ctx.scale, ctx.plan, ctx.aligned = seqs, scale, plan, route is not None
        ctx.lower_bound_dtype = None if lower_bound is None else lower_bound.dtype
        return o, final

    @staticmethod
    def backward(ctx, do, dht):
        q, f_logit, i, beta, initial_state, *saved = ctx.saved_tensors
        do = do.contiguous()
        dht = None if dht is None else dht.contiguous()
        # the forward's inputs were aligned, and the incoming gradients have the outputs' dtypes and alignment
        vouched = (ctx.aligned and do.dtype == i.dtype and _aligned(do, dht)
                   and (dht is None or dht.dtype == torch.float32))
        route = direct_stream(_fwd_scan_kernel) if vouched else None
        if route is not None and route[0] != ctx.plan.launch_device:
            route = None
        dq, dx, di, dbeta, dh0 = _backward(ctx.plan, q, f_logit, i, beta, ctx.scale, initial_state, saved, do, dht,
                                           ctx.seqs, route and route[1])
        if dbeta is not None:
            dbeta = dbeta.to(ctx.lower_bound_dtype)
        return dq, dx, di, dbeta, dh0, None, None, None, None, None, None


def _plan_and_route(q, i, beta, initial_state, output_final_state, seqs, keep, swish_q, aligned):
    """The plan of this call (_plan) and kernels.launch.direct_stream's (device, stream) where its launches may skip
    keying their arguments: where the caller's tensors are ``aligned``, since everything else Triton specialises
    on is in the plan's key (the dtypes, and the rare tiers' one integer argument)."""
    batch, seq_len, heads, key_dim = q.shape
    route = direct_stream(_fwd_scan_kernel) if aligned else None
    value_dim = i.shape[-1]
    plan = _plan(tuple(CONFIG.items()), BF16_DOT_IN_INTERPRETER, argument_key(seqs.num_chunks * heads), q.dtype,
                 q.device, heads, key_dim, value_dim, beta is not None, swish_q, keep, initial_state is not None,
                 output_final_state, _value_block(value_dim, seqs.num_seqs * heads, q.device), route and route[0])
    return plan, route


def chunk_hgrn2(
    q: torch.Tensor,
    f_logit: torch.Tensor,
    i: torch.Tensor,
    lower_bound: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    swish_q: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HGRN2 over a batch (or packed sequences), chunkwise in Triton; same contract as ``hgrn2_chunk_torch``.

    q (post-swish; with ``swish_q`` pre-swish: the kernels apply swish and return the gradient with respect
    to the pre-activation, one elementwise pass each way fewer than swish in torch), f_logit [B, T, H, K];
    i [B, T, H, V]; lower_bound [H, K] or None; initial_state fp32
    [N, H, K, V] (key-first). Inputs fp32 or bf16 (one dtype), contiguous; K, V in {16, 32, 64, 128}.
    Returns o [B, T, H, V] in i's dtype and the fp32 final state (None unless output_final_state).
    Differentiable in q, f_logit, i, lower_bound and initial_state. On a GPU, the first call with a new dtype,
    head count, head dims or bound checks the compiled kernels against the float64 reference
    (``kernels.hgrn2.selfcheck``).
    """
    check_chunk_inputs(q, f_logit, i, lower_bound, initial_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    seqs = make_sequences(q.shape[0], q.shape[1], cu_seqlens, CHUNK, q.device)
    beta = None if lower_bound is None else lower_bound.detach().float().contiguous()
    inputs = (q, f_logit, i, lower_bound, initial_state)
    keep = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    plan, route = _plan_and_route(q, i, beta, initial_state, output_final_state, seqs, keep, bool(swish_q),
                                  _aligned(q, f_logit, i, beta, initial_state))
    if not plan.checked:  # first use of this configuration on a GPU
        plan.checked = selfcheck.verify_once(chunk_hgrn2, q, i, lower_bound, tuple(CONFIG.items()), swish_q)
    return ChunkHGRN2Function.apply(*inputs, beta, scale, output_final_state, seqs, plan, route)
