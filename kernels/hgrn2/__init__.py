"""The HGRN2 recurrence: references in ``naive``; Triton kernels beside them (``chunk``, ``decode``)."""

from kernels.hgrn2.chunk import ChunkHGRN2Function, chunk_hgrn2
from kernels.hgrn2.decode import decode_hgrn2
from kernels.hgrn2.naive import (
    hgrn2_chunk_torch,
    hgrn2_decode_reference,
    hgrn2_recurrent_reference,
    log_forget_gate,
)

__all__ = [
    "ChunkHGRN2Function",
    "chunk_hgrn2",
    "decode_hgrn2",
    "hgrn2_chunk_torch",
    "hgrn2_decode_reference",
    "hgrn2_recurrent_reference",
    "log_forget_gate",
]
