"""Shared pieces of the HGRN2 Triton kernels: fused gate math, input validation, sequence bookkeeping."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.launch import cdiv

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
SUB_CHUNK = 16  # rows of the diagonal blocks handled element-wise (the stable part of the intra-chunk math)


# ----------------------------------------------------------------------------------------------------------
# Gate math, shared by every kernel. x = f_logit (fp32); beta = lower bound (fp32, broadcast along rows).
#   One exponential per element: e = exp(-|x|) <= 1 gives sigma(x) and sigma(-x) as 1 / (1 + e) and
#   e / (1 + e), each exact to a few ulp for any x (e -> 0 for |x| -> inf: no overflow, no NaN).
#   log f = logsigmoid(x) = min(x, 0) - log(1 + e) without a bound, log(beta + (1 - beta) sigma(x)) with one;
#   k = 1 - f = (1 - beta) sigma(-x): no cancellation when f is close to 1 (a plain 1 - exp(log f) would
#   lose relative accuracy exactly where beta pushes f towards 1).
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def fast_exp(x, FAST: tl.constexpr):
    """exp(x); with FAST (compiled kernels only: the interpreter cannot run inline assembly) the SFU's
    ex2.approx.ftz: the same instruction tl.exp takes, without its fix-up for results below 2^-126 (which
    become 0 here). Two instructions instead of five."""
    if FAST:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * 1.4426950408889634],
                                         dtype=tl.float32, is_pure=True, pack=1)
    return tl.exp(x)


@triton.jit
def fast_rcp(x, FAST: tl.constexpr):
    """1 / x; with FAST the SFU's rcp.approx.ftz (about 1 ulp; one instruction instead of ~9 for the
    division's range handling)."""
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return 1.0 / x


@triton.jit
def fast_sigmoid(x, FAST: tl.constexpr):
    """sigma(x) from _sigmoids (exact to a few ulp for any x), on fast_exp and fast_rcp with FAST."""
    return _sigmoids(x, FAST)[0]


@triton.jit
def _sigmoids(x, FAST: tl.constexpr = False):
    """(sigma(x), sigma(-x), exp(-|x|)) from one exponential."""
    e = fast_exp(-tl.abs(x), FAST)
    r = fast_rcp(1.0 + e, FAST)
    positive = x >= 0
    return tl.where(positive, r, e * r), tl.where(positive, e * r, r), e


@triton.jit
def _fast_ln(x):
    """Natural log through the SFU's lg2.approx (absolute error ~1e-7 on normal inputs; GPU only)."""
    log2 = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)
    return log2 * 0.6931471805599453


@triton.jit
def gate_log_f_and_k(x, beta, HAS_BETA: tl.constexpr, FAST_MATH: tl.constexpr = False):
    """Returns (log f, k) for logits x.

    FAST_MATH (compiled kernels only: the interpreter cannot run inline assembly) takes one hardware log of f
    instead of two accurate ones (and fast_exp, fast_rcp in the sigmoids): the absolute error in log f, ~1e-7,
    is what the decays see, about that of the rounding of 1 + e in the accurate form. Where f may be subnormal
    (no bound, x < -20) log f = x - e, exact to fp32 there since e < 2e-9.
    """
    sig, sig_neg, e = _sigmoids(x, FAST_MATH)
    if FAST_MATH:
        if HAS_BETA:
            f = beta + (1.0 - beta) * sig
            k = (1.0 - beta) * sig_neg
            use_log = (beta > 0) | (x > -20.0)
        else:
            f = sig
            k = sig_neg
            use_log = x > -20.0
        return tl.where(use_log, _fast_ln(f), x - e), k
    log_sig = tl.minimum(x, 0.0) - tl.log(1.0 + e)
    if HAS_BETA:
        log_f = tl.where(beta > 0, tl.log(beta + (1.0 - beta) * sig), log_sig)
        k = (1.0 - beta) * sig_neg
    else:
        log_f = log_sig
        k = sig_neg
    return log_f, k


@triton.jit
def gate_jacobians(x, beta, HAS_BETA: tl.constexpr, FAST_MATH: tl.constexpr = False):
    """Returns (d log f / dx, d log f / d beta, d k / dx, d k / d beta) for logits x."""
    sig, sig_neg, _ = _sigmoids(x, FAST_MATH)
    if HAS_BETA:
        inv_f = fast_rcp(beta + (1.0 - beta) * sig, FAST_MATH)
        # beta > 0 keeps f >= beta > 0; at beta == 0 the ratio (1 - beta) sigma / f is exactly 1.
        ratio = tl.where(beta > 0, (1.0 - beta) * sig * inv_f, 1.0)
        dlogf_dx = ratio * sig_neg
        dlogf_dbeta = sig_neg * inv_f
        dk_dx = -(1.0 - beta) * sig * sig_neg
        dk_dbeta = -sig_neg
    else:
        dlogf_dx = sig_neg
        dlogf_dbeta = tl.zeros_like(x)
        dk_dx = -sig * sig_neg
        dk_dbeta = tl.zeros_like(x)
    return dlogf_dx, dlogf_dbeta, dk_dx, dk_dbeta


# ----------------------------------------------------------------------------------------------------------
# Validation: every public entry point rejects what the kernels cannot compute, before any launch.
# ----------------------------------------------------------------------------------------------------------
def _check_tensor(name: str, x: torch.Tensor, dims: int, dtypes=SUPPORTED_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(x.dtype).replace('torch.', '')}; supported: {names}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first); got strides {x.stride()}")


def _check_head_dims(key_dim: int, value_dim: int) -> None:
    for name, dim in (("key (q/f_logit)", key_dim), ("value (i)", value_dim)):
        if dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"unsupported {name} head dim {dim}; supported: {SUPPORTED_HEAD_DIMS}")


def _check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")


def check_chunk_inputs(q, f_logit, i, lower_bound, initial_state, cu_seqlens) -> int:
    """Validates chunk_hgrn2's inputs; returns the number of independent sequences N."""
    _check_tensor("q", q, 4)
    _check_tensor("f_logit", f_logit, 4)
    _check_tensor("i", i, 4)
    if q.shape != f_logit.shape:
        raise ValueError(f"q {tuple(q.shape)} and f_logit {tuple(f_logit.shape)} must have the same shape")
    if q.shape[:3] != i.shape[:3]:
        raise ValueError(f"q [B,T,H,K] {tuple(q.shape)} and i [B,T,H,V] {tuple(i.shape)} disagree on B, T or H")
    if not (q.dtype == f_logit.dtype == i.dtype):
        raise TypeError(f"q, f_logit and i must share one dtype, got {q.dtype}, {f_logit.dtype}, {i.dtype}")
    batch, _, heads, key_dim = q.shape
    _check_head_dims(key_dim, i.shape[-1])
    if lower_bound is not None:
        _check_tensor("lower_bound", lower_bound, 2, (torch.float32, torch.bfloat16, torch.float16))
        if tuple(lower_bound.shape) != (heads, key_dim):
            raise ValueError(f"lower_bound must be [H, K] = {(heads, key_dim)}, got {tuple(lower_bound.shape)}")
    num_seqs = batch
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, batch, q.shape[1])
        num_seqs = cu_seqlens.numel() - 1
    if initial_state is not None:
        _check_tensor("initial_state", initial_state, 4, (torch.float32,))
        expected = (num_seqs, heads, key_dim, i.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must be [N, H, K, V] = {expected}, got {tuple(initial_state.shape)}")
    _check_same_device(q=q, f_logit=f_logit, i=i, lower_bound=lower_bound, initial_state=initial_state,
                       cu_seqlens=cu_seqlens)
    return num_seqs


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> None:
    """cu_seqlens: int32/int64, 1-D, starts at 0, strictly increasing, ends at T; batch must be 1.

    Reads the offsets on the host (one device sync per cu_seqlens tensor, _host_offsets): the varlen grid needs
    them anyway.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 offsets, got shape {tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {batch}")
    bounds = _host_offsets(cu_seqlens).bounds
    if bounds[0] != 0 or bounds[-1] != seq_len:
        raise ValueError(f"cu_seqlens must start at 0 and end at T = {seq_len}, got {bounds[0]} ... {bounds[-1]}")
    if any(bounds[n + 1] <= bounds[n] for n in range(len(bounds) - 1)):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {bounds}")


def check_decode_inputs(q, f_logit, i, state, lower_bound) -> None:
    """Validates decode_hgrn2's inputs (host metadata only: safe under CUDA-graph capture)."""
    _check_tensor("q", q, 3)
    _check_tensor("f_logit", f_logit, 3)
    _check_tensor("i", i, 3)
    _check_tensor("state", state, 4, (torch.float32,))
    if q.shape != f_logit.shape:
        raise ValueError(f"q {tuple(q.shape)} and f_logit {tuple(f_logit.shape)} must have the same shape")
    if q.shape[:2] != i.shape[:2]:
        raise ValueError(f"q [B,H,K] {tuple(q.shape)} and i [B,H,V] {tuple(i.shape)} disagree on B or H")
    if not (q.dtype == f_logit.dtype == i.dtype):
        raise TypeError(f"q, f_logit and i must share one dtype, got {q.dtype}, {f_logit.dtype}, {i.dtype}")
    batch, heads, key_dim = q.shape
    _check_head_dims(key_dim, i.shape[-1])
    expected = (batch, heads, key_dim, i.shape[-1])
    if tuple(state.shape) != expected:
        raise ValueError(f"state must be [B, H, K, V] = {expected}, got {tuple(state.shape)}")
    if lower_bound is not None:
        _check_tensor("lower_bound", lower_bound, 2, (torch.float32, torch.bfloat16, torch.float16))
        if tuple(lower_bound.shape) != (heads, key_dim):
            raise ValueError(f"lower_bound must be [H, K] = {(heads, key_dim)}, got {tuple(lower_bound.shape)}")
    _check_same_device(q=q, f_logit=f_logit, i=i, state=state, lower_bound=lower_bound)


# ----------------------------------------------------------------------------------------------------------
# Sequence bookkeeping: every launch sees a list of independent sequences [bos, eos) over the flattened
# token axis, whether they come from a [B, T] batch or from cu_seqlens.
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Sequences:
    cu_seqlens: torch.Tensor  # int32 [N + 1], offsets into the flattened token axis
    chunks: torch.Tensor  # int32 [NT, 2]: (sequence, chunk index within it) of every chunk, in sequence order
    chunk_offsets: torch.Tensor  # int32 [N]: index of each sequence's first chunk in per-chunk buffers
    num_seqs: int
    num_chunks: int
    # int32 [NT, 2]: (first token, end of its sequence) of every chunk: what the Gluon kernels need of a chunk
    # in one load (cu_seqlens through chunks is two dependent loads; gluon_tier0.py)
    spans: torch.Tensor


@functools.lru_cache(maxsize=64)
def _dense_sequences(batch: int, seq_len: int, chunk: int, device: torch.device) -> Sequences:
    """A [B, T] batch as B sequences of length T, built on the device with no host sync, once per shape (the
    kernels only read these; rebuilt per call they cost eight small launches of host time, which the benchmark's
    forward+backward at B 8, T 2048 no longer hides behind ~1.2 ms of GPU work)."""
    per_seq = cdiv(seq_len, chunk)
    cu = torch.arange(batch + 1, device=device, dtype=torch.int32) * seq_len
    index = torch.arange(batch * per_seq, device=device, dtype=torch.int32)
    chunks = torch.stack([index // per_seq, index % per_seq], dim=1).contiguous()
    offsets = torch.arange(batch, device=device, dtype=torch.int32) * per_seq
    spans = torch.stack([cu[chunks[:, 0]] + chunks[:, 1] * chunk, cu[chunks[:, 0] + 1]], dim=1).contiguous()
    return Sequences(cu, chunks, offsets, batch, batch * per_seq, spans)


def make_sequences(batch: int, seq_len: int, cu_seqlens: torch.Tensor | None, chunk: int,
                   device: torch.device) -> Sequences:
    if cu_seqlens is None:
        capturing = torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing or torch.compiler.is_compiling():  # tensors that belong to the graph or the trace
            return _dense_sequences.__wrapped__(batch, seq_len, chunk, device)
        return _dense_sequences(batch, seq_len, chunk, device)
    offsets = _host_offsets(cu_seqlens)
    key = (chunk, torch.device(device))
    if key not in offsets.sequences:
        offsets.sequences[key] = _packed_sequences(offsets.bounds, chunk, device)
    return offsets.sequences[key]


@dataclass
class _HostOffsets:
    cu_seqlens: torch.Tensor
    version: int  # cu_seqlens._version when read: an in-place change invalidates the copy
    bounds: list[int]
    sequences: dict  # (chunk, device) -> Sequences


_last_offsets: list[_HostOffsets] = []  # at most one: the cu_seqlens tensor seen last


def _host_offsets(cu_seqlens: torch.Tensor) -> _HostOffsets:
    """cu_seqlens on the host, and the Sequences built from it, remembered for the last cu_seqlens tensor while
    it is unmodified. The model passes one cu_seqlens to every layer (and again to the recomputation of
    checkpointed layers): each call would otherwise wait for the GPU twice, to validate the offsets and to lay
    the chunks out. The entry holds the tensor itself, so its identity cannot pass to another tensor."""
    if _last_offsets and _last_offsets[0].cu_seqlens is cu_seqlens and _last_offsets[0].version == cu_seqlens._version:
        return _last_offsets[0]
    _last_offsets[:] = [_HostOffsets(cu_seqlens, cu_seqlens._version, cu_seqlens.tolist(), {})]
    return _last_offsets[0]


def _packed_sequences(bounds: list[int], chunk: int, device: torch.device) -> Sequences:
    lengths = [bounds[n + 1] - bounds[n] for n in range(len(bounds) - 1)]
    chunk_counts = [cdiv(n, chunk) for n in lengths]
    pairs = [(n, j) for n, count in enumerate(chunk_counts) for j in range(count)]
    starts, total = [], 0
    for count in chunk_counts:
        starts.append(total)
        total += count
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)
    spans = [(bounds[n] + j * chunk, bounds[n + 1]) for n, j in pairs]
    return Sequences(as_tensor(bounds), as_tensor(pairs).reshape(-1, 2).contiguous(), as_tensor(starts),
                     len(lengths), total, as_tensor(spans).reshape(-1, 2).contiguous())
