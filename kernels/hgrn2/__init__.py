"""The HGRN2 recurrence: references in ``naive``; Triton kernels beside them."""

from kernels.hgrn2.naive import (
    hgrn2_chunk_torch,
    hgrn2_decode_reference,
    hgrn2_recurrent_reference,
    log_forget_gate,
)

__all__ = ["hgrn2_chunk_torch", "hgrn2_decode_reference", "hgrn2_recurrent_reference", "log_forget_gate"]
