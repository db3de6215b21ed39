"""The first-use check of the compiled chunk kernels (kernels/hgrn2/selfcheck.py), run on the CPU through the
interpreter: it passes the real kernels and names a kernel that computes something else."""

import pytest
import torch

from kernels.hgrn2 import selfcheck
from kernels.hgrn2.testing import interpreted_kernels

chunk, _ = interpreted_kernels()


@pytest.mark.parametrize("swish_q", [False, True])
def test_real_kernels_pass(swish_q):
    errors = selfcheck.kernel_errors(chunk.chunk_hgrn2, torch.float32, 2, 16, 16, True, "cpu", swish_q)
    assert set(errors) == {"output", "output without autograd", "d q", "d f_logit", "d i", "d lower_bound"}
    assert max(errors.values()) <= 1e-5, errors


def test_a_wrong_kernel_is_named_and_not_remembered_as_verified():
    def slightly_wrong(*args, **kwargs):
        out, final = chunk.chunk_hgrn2(*args, **kwargs)
        return out * 1.05, final

    for _ in range(2):  # a failed configuration is checked again next time
        with pytest.raises(RuntimeError, match=r"wrong results for float32 inputs, 2 heads, head dims 16/32, no "
                                               r"lower bound.*output 5\.0e-02.*model\.backend=chunk_torch"):
            selfcheck.verify(slightly_wrong, torch.float32, 2, 16, 32, False, "cpu")


def test_runs_only_for_cuda_tensors():
    def must_not_run(*args, **kwargs):
        raise AssertionError("checked a CPU tensor")

    q = torch.randn(1, 8, 2, 16)
    selfcheck.verify_once(must_not_run, q, q, None)
