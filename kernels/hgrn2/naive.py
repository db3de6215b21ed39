"""Plain-PyTorch references for the HGRN2 recurrence.

Shapes (fla's "head-last" layout): q, f_logit [B, T, H, K]; i [B, T, H, V]; lower_bound [H, K] or None;
state [N, H, K, V] (key-first: S_t = Diag(f_t) S_{t-1} + k_t i_t^T, o_t = scale * q_t S_t), where N is the
batch size, or the number of sequences when ``cu_seqlens`` packs several into one row (B must be 1).

``q`` is taken after its activation (swish), as the model's token mixer produces it. Gate math follows
fla's HGRN2 layer: log f = logsigmoid(f_logit), lifted by the layer's lower bound beta to
log(beta + (1 - beta) f), and k = 1 - f.

Arithmetic is fp32 (float64 when the inputs are float64); outputs take ``i``'s dtype, states stay fp32.
These functions are the ground truth for the Triton kernels and the model's CPU backends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def log_forget_gate(f_logit: torch.Tensor, lower_bound: torch.Tensor | None) -> torch.Tensor:
    """log f, in the compute dtype, with the layer's lower bound applied (None: unbounded)."""
    g = F.logsigmoid(f_logit.to(compute_dtype(f_logit)))
    if lower_bound is not None:
        beta = lower_bound.to(g.dtype)
        g = torch.logaddexp(beta.log(), torch.log1p(-beta) + g)
    return g


def _check_shapes(q, f_logit, i, lower_bound, initial_state, cu_seqlens) -> int:
    if q.shape != f_logit.shape:
        raise ValueError(f"q {tuple(q.shape)} and f_logit {tuple(f_logit.shape)} must have the same shape")
    if q.dim() != 4 or i.dim() != 4 or q.shape[:3] != i.shape[:3]:
        raise ValueError(f"expected q [B,T,H,K] and i [B,T,H,V]; got {tuple(q.shape)} and {tuple(i.shape)}")
    batch, _, heads, key_dim = q.shape
    if lower_bound is not None and lower_bound.shape != (heads, key_dim):
        raise ValueError(f"lower_bound must be [H, K] = {(heads, key_dim)}, got {tuple(lower_bound.shape)}")
    num_seqs = batch
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {batch}")
        num_seqs = cu_seqlens.numel() - 1
    if initial_state is not None:
        expected = (num_seqs, heads, key_dim, i.shape[-1])
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state must be {expected}, got {tuple(initial_state.shape)}")
    return num_seqs


def _segments(batch: int, seq_len: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(row, start, end) of every independent sequence."""
    if cu_seqlens is None:
        return [(b, 0, seq_len) for b in range(batch)]
    bounds = cu_seqlens.tolist()
    return [(0, bounds[n], bounds[n + 1]) for n in range(len(bounds) - 1)]


def _zero_state(q: torch.Tensor, i: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(q.shape[2], q.shape[3], i.shape[3], dtype=dtype, device=q.device)


def _step_forward(q, log_f, key, v, state):
    """One sequence [T, H, *] one token at a time; returns (out [T, H, V], final state)."""
    forget = log_f.exp()
    outputs = []
    for t in range(q.shape[0]):
        state = forget[t, :, :, None] * state + key[t, :, :, None] * v[t, :, None, :]
        outputs.append(torch.einsum("hk,hkv->hv", q[t], state))
    return torch.stack(outputs), state


def _chunk_forward(q, log_f, key, v, state, chunk_size):
    """One sequence [T, H, *] in chunks of ``chunk_size``; returns (out [T, H, V], final state)."""
    outputs = []
    for start in range(0, q.shape[0], chunk_size):
        qc, gc = q[start : start + chunk_size], log_f[start : start + chunk_size]
        kc, vc = key[start : start + chunk_size], v[start : start + chunk_size]
        cum = gc.cumsum(0)  # [C, H, K] log of the decay from the chunk start through step t
        length = qc.shape[0]
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        # exp(cum_t - cum_s) for s <= t: every exponent is <= 0, so nothing overflows.
        diff = cum[:, None] - cum[None, :]  # [t, s, H, K]
        decay = torch.where(causal[:, :, None, None], diff, float("-inf")).exp()
        scores = torch.einsum("thk,tshk,shk->hts", qc, decay, kc)
        intra = torch.einsum("hts,shv->thv", scores, vc)
        inter = torch.einsum("thk,hkv->thv", qc * cum.exp(), state)
        outputs.append(intra + inter)
        last = cum[-1]
        state = last.exp()[:, :, None] * state + torch.einsum("shk,shv->hkv", kc * (last - cum).exp(), vc)
    return torch.cat(outputs), state


def _run_sequences(sequence_fn, q, f_logit, i, lower_bound, scale, initial_state, output_final_state, cu_seqlens):
    """Prepare the gates, run ``sequence_fn`` on every independent sequence, and reassemble the batch."""
    # The references promise fp32 arithmetic: an enclosing bf16 autocast must not reach their products.
    with torch.autocast(q.device.type, enabled=False):
        return _run_sequences_fp32(
            sequence_fn, q, f_logit, i, lower_bound, scale, initial_state, output_final_state, cu_seqlens
        )


def _run_sequences_fp32(sequence_fn, q, f_logit, i, lower_bound, scale, initial_state, output_final_state, cu_seqlens):
    _check_shapes(q, f_logit, i, lower_bound, initial_state, cu_seqlens)
    dtype = compute_dtype(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    log_f = log_forget_gate(f_logit, lower_bound)
    key = -torch.expm1(log_f)
    qc, ic = q.to(dtype) * scale, i.to(dtype)
    outputs, finals = [], []
    for n, (row, start, end) in enumerate(_segments(q.shape[0], q.shape[1], cu_seqlens)):
        state = _zero_state(q, i, dtype) if initial_state is None else initial_state[n].to(dtype)
        span = slice(start, end)
        out, state = sequence_fn(qc[row, span], log_f[row, span], key[row, span], ic[row, span], state)
        outputs.append(out)
        finals.append(state)
    out = torch.cat(outputs)[None] if cu_seqlens is not None else torch.stack(outputs)
    final = torch.stack(finals)
    final = final.float() if dtype == torch.float32 else final
    return out.to(i.dtype), (final if output_final_state else None)


def hgrn2_recurrent_reference(
    q: torch.Tensor,
    f_logit: torch.Tensor,
    i: torch.Tensor,
    lower_bound: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence one token at a time: the definition every other form is checked against."""
    return _run_sequences(
        _step_forward, q, f_logit, i, lower_bound, scale, initial_state, output_final_state, cu_seqlens
    )


def hgrn2_chunk_torch(
    q: torch.Tensor,
    f_logit: torch.Tensor,
    i: torch.Tensor,
    lower_bound: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise form in plain PyTorch: exact, differentiable, and fast enough to train small models on a CPU.

    Within a chunk the decay between two steps is formed explicitly ([C, C, H, K]), which is stable for
    any forget gate; across chunks the [H, K, V] state is carried.
    """
    chunked = lambda *args: _chunk_forward(*args, chunk_size=chunk_size)
    return _run_sequences(chunked, q, f_logit, i, lower_bound, scale, initial_state, output_final_state, cu_seqlens)


def hgrn2_decode_reference(
    q: torch.Tensor,
    f_logit: torch.Tensor,
    i: torch.Tensor,
    state: torch.Tensor,
    lower_bound: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """One recurrent step for inference, updating ``state`` [B, H, K, V] in place.

    q, f_logit [B, H, K]; i [B, H, V]. Returns o [B, H, V] in ``i``'s dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.autocast(q.device.type, enabled=False):
        log_f = log_forget_gate(f_logit, lower_bound).to(state.dtype)
        key = -torch.expm1(log_f)
        state.mul_(log_f.exp()[..., None]).add_(key[..., None] * i.to(state.dtype)[..., None, :])
        out = torch.einsum("bhk,bhkv->bhv", q.to(state.dtype) * scale, state)
    return out.to(i.dtype)
