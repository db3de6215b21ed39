"""Tier 0 of the intra-chunk backward and forward in Gluon (Triton's layout-explicit dialect), for Hopper (sm_90).

The forward (`intra_fwd_tier0_kernel`, at the end) uses the same [key, row] tiles, staging and row sums; its one
product, A = q~ k~^T, contracts over the keys, so both operands go through shared memory.

The same math as chunk.py's `_intra_bwd_kernel` at TIER 0 (`_intra_bwd_whole` + `_intra_bwd_finish`), laid out
so that the sums along the chunk's rows cost almost nothing. Each program does one chunk, one head and 64 key
columns with one warpgroup, and holds every per-element quantity as a [64 keys, 64 rows] tile:

* the products run transposed, dq^T = (k exp(r - cum))^T D^T and dk^T = (q^ exp(cum - r))^T D, as wgmma
  instructions with the keys along M: the left operands come from registers, D (both bf16 parts) sits in shared
  memory once per program (Triton's tier 0 reloads and restages it per 16 key columns);
* a thread's accumulator registers hold two keys and, for each, columns n = 8j + 2q + e of the product (q the
  lane within its quad, j and e registers). D's rows and columns are stored permuted by tau(n) = 16q + 2j + e,
  so column n of every product *is* chunk row tau(n): each thread then holds 16 consecutive rows of its keys,
  and `to_rows` / `to_products` only relabel registers (reshape, permute and a layout conversion the compiler
  proves trivial; `assert_trivial`). In the row labelling (`ROWS`) a cumulative sum along the chunk is 15
  additions in each thread plus two shuffles inside a quad, and a column sum likewise; Triton's tier 0 spreads
  the 64 rows over its 4 warps and exchanges partial sums through shared memory (docs/kernels.md, v14);
* the inputs are copied to shared memory by cp.async when the program starts (with two programs per SM,
  loads issued where they are used left the kernel at 0.77 ms at the benchmark's first shape; staged: 0.36).

Gluon has no interpreter: this kernel is compiled only for a GPU and tested there against the Triton kernels
(tests/test_kernels_gluon.py, tests/test_kernels_gpu.py), which stay the reference path (CPU tests, other
dtypes, head dims below 64).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere.async_copy import (
    async_copy_global_to_shared,
    commit_group,
    wait_group,
)
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from kernels.hgrn2 import chunk
from kernels.hgrn2.chunk import FACTOR_SPAN
from kernels.hgrn2.utils import fast_exp, fast_sigmoid, gate_jacobians, gate_log_f_and_k

KEYS = gl.constexpr(64)  # key columns per program (the products' M: one warpgroup)
CHUNK = gl.constexpr(chunk.CHUNK)

# The products' accumulator: warp w holds rows 16w..16w+15 (M), lane l rows l/4 and l/4 + 8, columns 8j + 2(l%4) + e.
PRODUCT = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
OPERAND = gl.DotOperandLayout(operand_index=0, parent=PRODUCT, k_width=2)
# The same registers labelled [key, chunk row]: key 16w + 2(l/4) + i, row 16(l%4) + register.
ROWS = gl.BlockedLayout([2, 16], [8, 4], [4, 1], [1, 0])
# ROWS with the key first among a thread's registers: its two keys, adjacent in memory, load and store as one
# 4-byte access (ROWS orders the registers by row; the conversion between the two only renames registers).
IO = gl.DistributedLinearLayout(reg_bases=[[1, 0], [0, 1], [0, 2], [0, 4], [0, 8]],
                                lane_bases=[[0, 16], [0, 32], [2, 0], [4, 0], [8, 0]],
                                warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 64])
# D's parts as _bwd_inter_kernel stores them ([t, s] row-major): 16-byte copies of 8 columns, then read back
D_COPY = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
D_STAGED = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0])
# The inputs' [key, row] tiles are copied to shared memory asynchronously when the program starts (16-byte copies
# of 8 keys) and read from there in IO; the swizzle (16-byte pieces of a row XORed with row / 8) puts the rows
# 16 apart that one IO access reads into different banks (with row / 16: 2-way conflicts, Nsight Compute).
COPY = gl.BlockedLayout([8, 1], [8, 4], [1, 4], [0, 1])
INPUT_SHARED = gl.SwizzledSharedLayout(vec=8, per_phase=8, max_phase=8, order=[0, 1])
D_SHARED = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def to_rows(x):
    """[64, 64] product tile (PRODUCT: row m = 16w + 8i + g, column n = 8j + 2q + e) -> the same registers as
    [key 16w + 2g + i, chunk row 16q + 2j + e] in ROWS."""
    x = gl.permute(gl.reshape(x, [4, 2, 8, 8, 4, 2]), [0, 2, 1, 4, 3, 5])
    return gl.convert_layout(gl.reshape(x, [KEYS, CHUNK]), ROWS, assert_trivial=True)


@gluon.jit
def to_products(x):
    """Inverse of to_rows: a [key, chunk row] tile in ROWS -> the product labelling (PRODUCT)."""
    x = gl.permute(gl.reshape(x, [4, 8, 2, 4, 8, 2]), [0, 2, 1, 4, 3, 5])
    return gl.convert_layout(gl.reshape(x, [KEYS, CHUNK]), PRODUCT, assert_trivial=True)


@gluon.jit
def _stage_d_part(d_ptr, i_c, i_h, part: gl.constexpr, H: gl.constexpr):
    """Start copying one bf16 part of D ([chunks, H, 2, BT, BT], as _bwd_inter_kernel stores it) into shared
    memory."""
    t = gl.arange(0, CHUNK, layout=gl.SliceLayout(1, D_COPY))
    s = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, D_COPY))
    base = d_ptr + ((i_c.to(gl.int64) * H + i_h) * 2 + part) * (CHUNK * CHUNK)
    staged = gl.allocate_shared_memory(gl.bfloat16, [CHUNK, CHUNK], D_STAGED)
    async_copy_global_to_shared(staged, base + t[:, None] * CHUNK + s[None, :])
    return staged


@gluon.jit
def _permuted_d_part(staged):
    """A staged part of D as the products take it: P[a, b] = D[tau(a), tau(b)] in shared memory (NVMMA). Chunk
    row t = 16q + 2j + e is (q, j, e) in a [4, 8, 2] view; (j, q, e) is index 8j + 2q + e, the product column
    that stands for t. (Gathered from memory in this order until v16: half the sectors' efficiency and a
    synchronous load; stored in it by _bwd_inter_kernel, the scattered stores cost that kernel 0.39 ms.)"""
    d = gl.reshape(staged.load(D_COPY), [4, 8, 2, 4, 8, 2])
    d = gl.reshape(gl.permute(d, [1, 0, 2, 4, 3, 5]), [CHUNK, CHUNK])
    return gl.allocate_shared_memory(gl.bfloat16, [CHUNK, CHUNK], D_SHARED, d)


@gluon.jit
def _dot_split(a, b_hi, b_lo):
    """a @ b for an fp32 [key, row] tile a (ROWS) and b = D's permuted parts in shared memory: three bf16 products
    of the hi/lo parts (a_lo b_hi + a_hi b_lo + a_hi b_hi, fp32 accumulation), as chunk._dot_split."""
    a_hi = a.to(gl.bfloat16)
    a_lo = gl.convert_layout(to_products((a - a_hi.to(gl.float32)).to(gl.bfloat16)), OPERAND)
    a_hi = gl.convert_layout(to_products(a_hi), OPERAND)
    acc = gl.full([KEYS, CHUNK], 0.0, gl.float32, PRODUCT)
    acc = warpgroup_mma(a_lo, b_hi, acc, is_async=True)
    acc = warpgroup_mma(a_hi, b_lo, acc, is_async=True)
    acc = warpgroup_mma(a_hi, b_hi, acc, is_async=True)
    return to_rows(warpgroup_mma_wait(0, deps=[acc]))


@gluon.jit
def _reverse_cumsum(x):
    """sum_{s >= t} x_s along the rows: the total minus the sum before t (Triton's reverse scan shuffles every
    element across the lanes; the forward one only the threads' totals)."""
    return gl.sum(x, axis=1)[:, None] - gl.associative_scan(x, 1, _add) + x


@gluon.jit
def intra_bwd_tier0_kernel(q_ptr, x_ptr, beta_ptr, d_ptr, dq_ptr, dk_ptr, dgc_ptr, half_ptr, total_ptr, dq_out_ptr,
                           dx_ptr, dbeta_ptr, flag_ptr, span_ptr, scale, H: gl.constexpr,
                           K: gl.constexpr, HAS_BETA: gl.constexpr, SWISH_Q: gl.constexpr):
    """One chunk (flagged tier 0 by the forward), one head, key columns KEYS * (program_id(0) % (K / KEYS)) on;
    the arguments as chunk._intra_bwd_kernel's (d beta in 4 partial sums of 16 rows each), with the chunks' spans
    (utils.Sequences.spans) for cu_seqlens and the chunk list."""
    key_groups: gl.constexpr = K // KEYS
    i_c = gl.program_id(0) // key_groups
    i_h = gl.program_id(1)
    flag = gl.load(flag_ptr + i_c * H + i_h)
    t0, eos = _span(span_ptr, i_c)  # in flight with the flag
    if flag == 0:
        _tier0_chunk(q_ptr, x_ptr, beta_ptr, d_ptr, dq_ptr, dk_ptr, dgc_ptr, half_ptr, total_ptr, dq_out_ptr, dx_ptr,
                     dbeta_ptr, t0, eos, scale, i_c, i_h, (gl.program_id(0) % key_groups) * KEYS, H, K,
                     HAS_BETA, SWISH_Q)


@gluon.jit
def _span(span_ptr, i_c):
    """A chunk's first token and its sequence's end (int64), in one load each: through the chunk list and
    cu_seqlens they were two dependent loads, after the backward's flag a third (that chain held 6% of the
    backward's stall samples, before its first copy was issued: Nsight Compute at 32 x 2048 x 8, v18)."""
    # volatile: issued where written, not sunk below the backward's flag test into the branch that uses them
    return (gl.load(span_ptr + 2 * i_c, volatile=True).to(gl.int64),
            gl.load(span_ptr + 2 * i_c + 1, volatile=True).to(gl.int64))


@gluon.jit
def _decays(x, beta, first, rows, valid):
    """k and cum_t - r of a [key, row] tile of f_logit x (r: the first half's log-decay, stored by the forward),
    from sums inside each half as chunk._middle_decays; rows past the sequence's end get log f = 0, k = 0."""
    log_f, k = gate_log_f_and_k(x, beta, True, True)
    log_f = gl.where(valid, log_f, 0.0)
    inside = gl.reshape(gl.associative_scan(gl.reshape(log_f, [KEYS, 2, CHUNK // 2]), 2, _add), [KEYS, CHUNK])
    return gl.where(valid, k, 0.0), inside - gl.where((rows < CHUNK // 2)[None, :], first[:, None], 0.0)


@gluon.jit
def _stage(ptr, t0, eos, H: gl.constexpr, K: gl.constexpr):
    """Start copying the [key, row] tile of a [tokens, H, K] tensor that starts at ptr (the chunk's first row,
    the program's first key) into shared memory; rows past the sequence's end read as 0."""
    keys = gl.arange(0, KEYS, layout=gl.SliceLayout(1, COPY))
    rows = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, COPY))
    staged = gl.allocate_shared_memory(ptr.dtype.element_ty, [KEYS, CHUNK], INPUT_SHARED)
    async_copy_global_to_shared(staged, ptr + rows[None, :] * (H * K) + keys[:, None], mask=(t0 + rows < eos)[None, :])
    return staged


@gluon.jit
def _read(staged):
    """A staged tile as fp32 in ROWS (read in IO: two keys per access)."""
    return gl.convert_layout(staged.load(IO), ROWS, assert_trivial=True).to(gl.float32)


@gluon.jit
def _store(ptr, offsets, mask, value):
    gl.store(ptr + offsets, gl.convert_layout(value.to(ptr.dtype.element_ty), IO, assert_trivial=True), mask=mask)


@gluon.jit
def _tier0_chunk(q_ptr, x_ptr, beta_ptr, d_ptr, dq_ptr, dk_ptr, dgc_ptr, half_ptr, total_ptr, dq_out_ptr, dx_ptr,
                 dbeta_ptr, t0, eos, scale, i_c, i_h, k_first, H: gl.constexpr, K: gl.constexpr,
                 HAS_BETA: gl.constexpr, SWISH_Q: gl.constexpr):
    tile = (t0 * H + i_h) * K + k_first  # the chunk's first row, this program's first key
    # every input in flight at once, in the order they are needed (three groups)
    x_staged = _stage(x_ptr + tile, t0, eos, H, K)
    d_hi_staged = _stage_d_part(d_ptr, i_c, i_h, 0, H)
    d_lo_staged = _stage_d_part(d_ptr, i_c, i_h, 1, H)
    commit_group()
    dq_staged = _stage(dq_ptr + tile, t0, eos, H, K)
    q_staged = _stage(q_ptr + tile, t0, eos, H, K)
    commit_group()
    dk_staged = _stage(dk_ptr + tile, t0, eos, H, K)
    commit_group()

    # outputs: 32-bit offsets from the same base
    rows_io = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, IO))
    keys_io = gl.arange(0, KEYS, layout=gl.SliceLayout(1, IO))
    offsets = rows_io[None, :] * (H * K) + keys_io[:, None]
    ok = (t0 + rows_io < eos)[None, :] & (keys_io < KEYS)[:, None]
    rows = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, ROWS))
    keys = k_first + gl.arange(0, KEYS, layout=gl.SliceLayout(1, ROWS))
    valid = (t0 + rows < eos)[None, :]
    chunk_key = (i_c.to(gl.int64) * H + i_h) * K + keys
    beta = _key_bound(beta_ptr, i_h, k_first, K, HAS_BETA)
    first = gl.load(half_ptr + chunk_key)
    # loaded with r: issued where used, their waits took 5.5% of the stall samples (Nsight Compute, v18)
    total = gl.load(total_ptr + chunk_key)
    carry = gl.load(dgc_ptr + chunk_key)
    wait_group(2)
    d_hi = _permuted_d_part(d_hi_staged)
    d_lo = _permuted_d_part(d_lo_staged)
    fence_async_shared()
    k, middle = _decays(_read(x_staged), beta, first, rows, valid)
    dq = _dot_split(k * fast_exp(gl.minimum(-middle, FACTOR_SPAN), True), d_hi.permute([1, 0]), d_lo.permute([1, 0]))

    # dq^ = e^(cum - r) (intra + e^r dq^_inter); dq (through the scale and swish) stored
    to_middle = fast_exp(gl.minimum(middle, FACTOR_SPAN), True)
    wait_group(1)
    dq = to_middle * (dq + fast_exp(first, True)[:, None] * _read(dq_staged))
    q = _read(q_staged)
    dq_post = dq * scale
    if SWISH_Q:
        sig = fast_sigmoid(q, True)
        dq_post *= sig * (1.0 + q * (1.0 - sig))
        q = q * sig
    _store(dq_out_ptr + tile, offsets, ok, dq_post)
    q = q * scale
    grad = q * dq
    dk = _dot_split(q * to_middle, d_hi, d_lo)

    # dk = e^(r - cum) (intra + e^(cum_last - r) dk_inter), with the decays formed again rather than k and
    # cum - r kept in registers across both products (255 registers either way; kept, 112 B spilled against 48)
    wait_group(0)
    x = _read(x_staged)
    k, middle = _decays(x, beta, first, rows, valid)
    from_middle = fast_exp(gl.minimum(-middle, FACTOR_SPAN), True)
    dk_inter = from_middle * fast_exp(total - first, True)[:, None] * _read(dk_staged)
    dk = from_middle * dk + dk_inter
    carry += gl.sum(k * dk_inter, axis=1)
    grad_log_f = _reverse_cumsum(grad - k * dk) + carry[:, None]

    # the gate math's bound form with beta = 0 is the unbounded one (Gluon cannot build the zero tiles of the latter)
    dlogf_dx, dlogf_dbeta, dk_dx, dk_dbeta = gate_jacobians(x, beta, True, True)
    _store(dx_ptr + tile, offsets, ok, grad_log_f * dlogf_dx + dk * dk_dx)
    if HAS_BETA:  # partial sums over each thread's 16 rows: no exchange between threads
        contribution = gl.where(valid, grad_log_f * dlogf_dbeta + dk * dk_dbeta, 0.0)
        partial = gl.sum(gl.reshape(contribution, [KEYS, 4, CHUNK // 4]), 2)
        groups = gl.arange(0, 4, layout=gl.SliceLayout(0, partial.type.layout))
        keys_p = k_first + gl.arange(0, KEYS, layout=gl.SliceLayout(1, partial.type.layout))
        rows_p = (i_c.to(gl.int64) * 4 + groups) * H + i_h
        gl.store(dbeta_ptr + rows_p[None, :] * K + keys_p[:, None], partial)


# ----------------------------------------------------------------------------------------------------------
# Forward: tier 0 of chunk._intra_fwd_kernel (_intra_fwd_chunk_whole)
# ----------------------------------------------------------------------------------------------------------
# A = q~ k~^T contracts over the keys, so both of its operands go through shared memory: the [key, row] tiles of
# q~ and k~ (hi and lo bf16 parts) in NVMMA layout, A's left operand their transposed view.
OPERAND_SHARED = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)


@gluon.jit
def _operand_parts(value, hi_shared, lo_shared):
    """An fp32 [key, row] tile's hi and lo bf16 parts into shared memory, for the products (as
    chunk._split_bf16)."""
    hi = value.to(gl.bfloat16)
    hi_shared.store(hi)
    lo_shared.store((value - hi.to(gl.float32)).to(gl.bfloat16))


@gluon.jit
def _fwd_key_group(x_staged, q_staged, acc, span, parts, beta, qd_ptr, kd_ptr, total_ptr, half_ptr, scale,
                   i_c, i_h, k_first, tile, offsets, ok, rows, valid, H: gl.constexpr, K: gl.constexpr,
                   SWISH_Q: gl.constexpr, STORE_HALVES: gl.constexpr):
    """One group of KEYS key columns of _intra_fwd_chunk_whole: the decayed q^ and k the scans take, the chunk's
    total and first-half log-decays, and A += (q^ e^(cum - r)) (k e^(r - cum))^T; returns (A, span)."""
    keys = k_first + gl.arange(0, KEYS, layout=gl.SliceLayout(1, ROWS))
    chunk_key = (i_c.to(gl.int64) * H + i_h) * K + keys
    log_f, k = gate_log_f_and_k(_read(x_staged), beta, True, True)
    log_f = gl.where(valid, log_f, 0.0)
    k = gl.where(valid, k, 0.0)
    first_half = (rows < CHUNK // 2)[None, :]
    first = gl.sum(gl.where(first_half, log_f, 0.0), axis=1)
    second = gl.sum(gl.where(first_half, 0.0, log_f), axis=1)
    span = gl.maximum(span, -gl.minimum(first, second))
    inside = gl.reshape(gl.associative_scan(gl.reshape(log_f, [KEYS, 2, CHUNK // 2]), 2, _add), [KEYS, CHUNK])
    middle = inside - gl.where(first_half, first[:, None], 0.0)
    to_middle = fast_exp(gl.minimum(middle, FACTOR_SPAN), True)
    from_middle = fast_exp(gl.minimum(-middle, FACTOR_SPAN), True)
    q = _read(q_staged)
    if SWISH_Q:
        q = q * fast_sigmoid(q, True)
    q = q * scale
    _store(qd_ptr + tile, offsets, ok, q * to_middle * fast_exp(first, True)[:, None])
    _store(kd_ptr + tile, offsets, ok, k * from_middle * fast_exp(second, True)[:, None])
    gl.store(total_ptr + chunk_key, first + second)
    if STORE_HALVES:
        gl.store(half_ptr + chunk_key, first)

    q_hi, q_lo, k_hi, k_lo = parts
    _operand_parts(q * to_middle, q_hi, q_lo)
    _operand_parts(k * from_middle, k_hi, k_lo)
    fence_async_shared()
    gl.thread_barrier()
    acc = warpgroup_mma(q_lo.permute([1, 0]), k_hi, acc, is_async=True)
    acc = warpgroup_mma(q_hi.permute([1, 0]), k_lo, acc, is_async=True)
    acc = warpgroup_mma(q_hi.permute([1, 0]), k_hi, acc, is_async=True)
    return warpgroup_mma_wait(0, deps=[acc]), span


@gluon.jit
def _key_bound(beta_ptr, i_h, k_first, K: gl.constexpr, HAS_BETA: gl.constexpr):
    """The lower bound of KEYS key columns from k_first on, as a [KEYS, 1] column of ROWS (0 without a bound or
    past K)."""
    beta = 0.0
    if HAS_BETA:
        keys = k_first + gl.arange(0, KEYS, layout=gl.SliceLayout(1, ROWS))
        beta = gl.load(beta_ptr + i_h * K + keys, mask=keys < K, other=0.0)[:, None]
    return beta


@gluon.jit
def intra_fwd_tier0_kernel(q_ptr, x_ptr, beta_ptr, a_ptr, qd_ptr, kd_ptr, total_ptr, half_ptr, flag_ptr, span_ptr,
                           scale, H: gl.constexpr, K: gl.constexpr, HAS_BETA: gl.constexpr,
                           SWISH_Q: gl.constexpr, STORE_HALVES: gl.constexpr):
    """Tier 0 of chunk._intra_fwd_kernel for one (chunk, head), K = 64 or 128 key columns in groups of KEYS: the
    same outputs (A as hi and lo bf16 parts, the decayed q^ and k, the chunk's log-decays, and the tier flag: 0
    if every key column's halves span less than FACTOR_SPAN, else 1 for Triton's tier-1 launch)."""
    i_c = gl.program_id(0)
    i_h = gl.program_id(1)
    t0, eos = _span(span_ptr, i_c)
    # the bound's key blocks loaded with the span, not after the inputs arrive (where their wait was exposed)
    beta_first = _key_bound(beta_ptr, i_h, 0, K, HAS_BETA)
    beta_second = _key_bound(beta_ptr, i_h, KEYS, K, HAS_BETA)
    tile = (t0 * H + i_h) * K
    x_first = _stage(x_ptr + tile, t0, eos, H, K)
    q_first = _stage(q_ptr + tile, t0, eos, H, K)
    commit_group()
    if K == 2 * KEYS:
        x_second = _stage(x_ptr + tile + KEYS, t0, eos, H, K)
        q_second = _stage(q_ptr + tile + KEYS, t0, eos, H, K)
        commit_group()
    parts = (gl.allocate_shared_memory(gl.bfloat16, [KEYS, CHUNK], OPERAND_SHARED),
             gl.allocate_shared_memory(gl.bfloat16, [KEYS, CHUNK], OPERAND_SHARED),
             gl.allocate_shared_memory(gl.bfloat16, [KEYS, CHUNK], OPERAND_SHARED),
             gl.allocate_shared_memory(gl.bfloat16, [KEYS, CHUNK], OPERAND_SHARED))

    rows_io = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, IO))
    keys_io = gl.arange(0, KEYS, layout=gl.SliceLayout(1, IO))
    offsets = rows_io[None, :] * (H * K) + keys_io[:, None]
    ok = (t0 + rows_io < eos)[None, :] & (keys_io < KEYS)[:, None]
    rows = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, ROWS))
    valid = (t0 + rows < eos)[None, :]
    acc = gl.full([CHUNK, CHUNK], 0.0, gl.float32, PRODUCT)
    span = gl.full([KEYS], 0.0, gl.float32, gl.SliceLayout(1, ROWS))
    if K == 2 * KEYS:
        wait_group(1)
    else:
        wait_group(0)
    acc, span = _fwd_key_group(x_first, q_first, acc, span, parts, beta_first, qd_ptr, kd_ptr, total_ptr, half_ptr,
                               scale, i_c, i_h, 0, tile, offsets, ok, rows, valid, H, K, SWISH_Q, STORE_HALVES)
    if K == 2 * KEYS:
        wait_group(0)
        acc, span = _fwd_key_group(x_second, q_second, acc, span, parts, beta_second, qd_ptr, kd_ptr, total_ptr,
                                   half_ptr, scale, i_c, i_h, KEYS, tile + KEYS, offsets, ok, rows, valid, H, K,
                                   SWISH_Q, STORE_HALVES)

    # A, causal (entries above the diagonal may have overflowed: masked, never summed), as hi + lo parts
    t = gl.arange(0, CHUNK, layout=gl.SliceLayout(1, PRODUCT))
    s = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, PRODUCT))
    a = gl.where(t[:, None] >= s[None, :], acc, 0.0)
    a_hi = a.to(gl.bfloat16)
    a_rows = a_ptr + ((t0 + t) * H + i_h)[:, None] * (2 * CHUNK) + s[None, :]
    a_ok = (t0 + t < eos)[:, None] & (s < CHUNK)[None, :]
    gl.store(a_rows, a_hi, mask=a_ok)
    gl.store(a_rows + CHUNK, (a - a_hi.to(gl.float32)).to(gl.bfloat16), mask=a_ok)
    gl.store(flag_ptr + i_c * H + i_h, gl.where(gl.max(span, axis=0) < FACTOR_SPAN, 0, 1))
