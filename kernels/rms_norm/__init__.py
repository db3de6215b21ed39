"""RMSNorm over the last dim: a Triton forward and backward (``rms_norm``) beside its PyTorch reference."""

from kernels.rms_norm.kernel import RMSNormTritonFunction, rms_norm
from kernels.rms_norm.naive import rms_norm_reference

__all__ = ["RMSNormTritonFunction", "rms_norm", "rms_norm_reference"]
