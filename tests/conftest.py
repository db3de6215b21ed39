"""Test-session setup shared by every test module.

Triton reads TRITON_INTERPRET when it is first imported, and several packages import it (deepspeed,
megatron-core, fla), so it is set here, before any test module loads: on a machine without a GPU the
Triton kernels (ours and fla's) run in the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
