"""The Triton kernels reject input they cannot compute, with a message that names the problem."""

from __future__ import annotations

import pytest
import torch

from kernels.hgrn2.testing import interpreted_kernels

chunk, decode = interpreted_kernels()


def _chunk_args(batch=1, seq_len=8, heads=2, key_dim=16, value_dim=16, dtype=torch.float32):
    q = torch.randn(batch, seq_len, heads, key_dim, dtype=dtype)
    return q, torch.randn_like(q), torch.randn(batch, seq_len, heads, value_dim, dtype=dtype)


def _raises(error, match, *args, **kwargs):
    with pytest.raises(error, match=match):
        chunk.chunk_hgrn2(*args, **kwargs)


def test_chunk_rejects_wrong_dtype():
    q, f, i = _chunk_args(dtype=torch.float16)
    _raises(TypeError, "q has dtype float16; supported: float32, bfloat16", q, f, i)
    q, f, i = _chunk_args()
    _raises(TypeError, "must share one dtype", q, f.bfloat16(), i)


def test_chunk_rejects_non_contiguous():
    q, f, i = _chunk_args()
    _raises(ValueError, "f_logit must be contiguous", q, f.transpose(1, 2).contiguous().transpose(1, 2), i)


def test_chunk_rejects_unsupported_head_dim():
    q, f, i = _chunk_args(key_dim=48, value_dim=48)
    _raises(ValueError, r"unsupported key \(q/f_logit\) head dim 48", q, f, i)
    q, f, i = _chunk_args(value_dim=24)
    _raises(ValueError, r"unsupported value \(i\) head dim 24", q, f, i)


def test_chunk_rejects_mismatched_shapes():
    q, f, i = _chunk_args()
    _raises(ValueError, "q .* and f_logit .* must have the same shape", q, f[:, :4].contiguous(), i)
    _raises(ValueError, "disagree on B, T or H", q, f, i[:, :4].contiguous())
    _raises(ValueError, "must have 4 dimensions", q[0], f[0], i[0])
    _raises(ValueError, r"lower_bound must be \[H, K\]", q, f, i, lower_bound=torch.rand(3, 16))
    _raises(ValueError, r"initial_state must be \[N, H, K, V\]", q, f, i, initial_state=torch.zeros(2, 2, 16, 16))
    _raises(TypeError, "initial_state has dtype bfloat16", q, f, i,
            initial_state=torch.zeros(1, 2, 16, 16, dtype=torch.bfloat16))


def test_chunk_rejects_bad_cu_seqlens():
    q, f, i = _chunk_args(seq_len=10)
    _raises(ValueError, "strictly increasing", q, f, i, cu_seqlens=torch.tensor([0, 6, 6, 10], dtype=torch.int32))
    _raises(ValueError, "strictly increasing", q, f, i, cu_seqlens=torch.tensor([0, 7, 4, 10]))
    _raises(TypeError, "cu_seqlens must be int32 or int64", q, f, i, cu_seqlens=torch.tensor([0.0, 10.0]))
    _raises(ValueError, "start at 0 and end at T = 10", q, f, i, cu_seqlens=torch.tensor([0, 4, 9]))
    _raises(ValueError, "1-D with at least 2 offsets", q, f, i, cu_seqlens=torch.tensor([0]))
    q, f, i = _chunk_args(batch=2, seq_len=10)
    _raises(ValueError, "need batch size 1, got 2", q, f, i, cu_seqlens=torch.tensor([0, 4, 10]))


def test_decode_rejects_bad_input():
    q, f, i = torch.randn(2, 2, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    state = torch.zeros(2, 2, 16, 16)
    with pytest.raises(TypeError, match="state has dtype bfloat16"):
        decode.decode_hgrn2(q, f, i, state.bfloat16())
    with pytest.raises(ValueError, match=r"state must be \[B, H, K, V\]"):
        decode.decode_hgrn2(q, f, i, torch.zeros(2, 2, 16, 32))
    with pytest.raises(ValueError, match="q must be contiguous"):
        decode.decode_hgrn2(torch.randn(2, 16, 2).transpose(1, 2), f, i, state)
    with pytest.raises(ValueError, match="unsupported key"):
        decode.decode_hgrn2(torch.randn(2, 2, 8), torch.randn(2, 2, 8), i, torch.zeros(2, 2, 8, 16))
    with pytest.raises(ValueError, match="disagree on B or H"):
        decode.decode_hgrn2(q, f, torch.randn(1, 2, 16), state)


def test_chunk_rejects_key_groups_that_split_a_key_block(monkeypatch):
    """The intra backward's programs per chunk must each get whole key blocks; a setting that cannot is refused
    when the backward starts, before it launches anything."""
    q, f, i = _chunk_args(key_dim=64, value_dim=16)
    monkeypatch.setitem(chunk.CONFIG, "intra_bwd_key_groups", 3)
    leaves = [x.requires_grad_() for x in (q, f, i)]
    o, _ = chunk.chunk_hgrn2(*leaves)
    with pytest.raises(ValueError, match=r"intra_bwd_key_groups'\] = 3 does not split 64 key columns"):
        o.sum().backward()


def test_chunk_rejects_dbeta_row_groups_that_do_not_divide_the_chunk(monkeypatch):
    q, f, i = _chunk_args()
    monkeypatch.setitem(chunk.CONFIG, "dbeta_row_groups", 3)
    leaves = [x.requires_grad_() for x in (q, f, i)]
    o, _ = chunk.chunk_hgrn2(*leaves, lower_bound=torch.rand(2, 16))
    with pytest.raises(ValueError, match=r"dbeta_row_groups'\] = 3 is not a power of two dividing"):
        o.sum().backward()
