"""Chunkwise and recurrent HGRN2 kernels (Triton), each beside its plain-PyTorch reference."""
