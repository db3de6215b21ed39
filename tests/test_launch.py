"""kernels.launch: the compiled kernel is reused only for launches that Triton would specialize the same way.

On the CPU a stand-in kernel records what reaches Triton's JIT and what goes straight to the compiled kernel's
launcher; on a GPU a real kernel is launched through the shortcut with aligned and misaligned views."""

import inspect
from types import SimpleNamespace

import pytest
import torch
from triton.runtime.jit import JITFunction

from kernels import launch as launch_module
from kernels.launch import launch


class StandInKernel(JITFunction):
    """A JIT function's interface as launch uses it: params, and kernel[grid](...) returning a compiled kernel
    (JITFunction's own constructor, which parses a kernel's source, is not run)."""

    def __init__(self):
        self.params = [SimpleNamespace(name=name, default=default)
                       for name, default in (("x_ptr", inspect.Parameter.empty), ("n", inspect.Parameter.empty),
                                             ("BLOCK", inspect.Parameter.empty), ("FLAG", False))]
        self.jit_calls, self.direct_calls = [], []
        self.compiled = SimpleNamespace(packed_metadata="meta", function="fn",
                                        run=lambda *args: self.direct_calls.append(args))

    def __getitem__(self, grid):
        def jit(*args, **kwargs):
            self.jit_calls.append((grid, args, kwargs))
            return self.compiled
        return jit


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(launch_module, "_current_device", lambda: 0)
    monkeypatch.setattr(launch_module, "driver", SimpleNamespace(active=SimpleNamespace(
        get_current_stream=lambda device: 7)))
    monkeypatch.setattr(launch_module, "_compiled", {})
    return StandInKernel()


def test_second_launch_goes_straight_to_the_compiled_kernel(kernel):
    x = torch.zeros(64)
    launch(kernel, (3,), (x, 5), BLOCK=16, num_warps=4)
    launch(kernel, (4, 2), (x, 6), BLOCK=16, num_warps=4)
    assert len(kernel.jit_calls) == 1
    (call,) = kernel.direct_calls
    # grid padded to three dimensions, the stream, the compiled function and metadata, no launch hooks, then every
    # parameter in order: the positional arguments, the keyword constexprs, the defaults
    assert call == (4, 2, 1, 7, "fn", "meta", None, None, None, x, 6, 16, False)


def test_scratch_free_kernels_skip_the_python_wrapper(kernel):
    """A launcher with Triton 3.6's CudaLauncher attributes and no scratch memory: its C launch is called directly,
    with the cooperative-grid and PDL settings and no scratch buffers."""
    c_calls = []
    kernel.compiled.run = SimpleNamespace(global_scratch_size=0, profile_scratch_size=0, launch_cooperative_grid=False,
                                          launch_pdl=True, launch=lambda *args: c_calls.append(args))
    x = torch.zeros(64)
    launch(kernel, (3,), (x, 5), BLOCK=16)
    launch(kernel, (3,), (x, 5), BLOCK=16)
    assert c_calls == [(3, 1, 1, 7, "fn", False, True, None, None, "meta", None, None, None, x, 5, 16, False)]


@pytest.mark.parametrize("change", ["dtype", "alignment", "one", "divisibility", "constexpr", "option"])
def test_a_change_triton_specializes_on_goes_through_the_jit(kernel, change):
    x = torch.zeros(64)
    base = {"args": (x, 32), "kwargs": {"BLOCK": 16, "num_warps": 4}}
    changed = {"dtype": {"args": (x.double(), 32)}, "alignment": {"args": (x[1:], 32)}, "one": {"args": (x, 1)},
               "divisibility": {"args": (x, 33)}, "constexpr": {"kwargs": {"BLOCK": 32, "num_warps": 4}},
               "option": {"kwargs": {"BLOCK": 16, "num_warps": 8}}}[change]
    launch(kernel, (1,), base["args"], **base["kwargs"])
    launch(kernel, (1,), changed.get("args", base["args"]), **changed.get("kwargs", base["kwargs"]))
    assert len(kernel.jit_calls) == 2 and not kernel.direct_calls


def test_another_device_goes_through_the_jit(kernel, monkeypatch):
    x = torch.zeros(64)
    launch(kernel, (1,), (x, 32), BLOCK=16)
    monkeypatch.setattr(launch_module, "_current_device", lambda: 1)
    launch(kernel, (1,), (x, 32), BLOCK=16)
    assert len(kernel.jit_calls) == 2 and not kernel.direct_calls


def test_same_integer_class_reuses_the_kernel(kernel):
    x = torch.zeros(64)
    launch(kernel, (1,), (x, 32), BLOCK=16)
    launch(kernel, (1,), (x, 48), BLOCK=16)
    launch(kernel, (1,), (x, 7), BLOCK=16)
    launch(kernel, (1,), (x, 9), BLOCK=16)
    assert len(kernel.jit_calls) == 2 and len(kernel.direct_calls) == 2


def test_launch_hooks_keep_tritons_path(kernel, monkeypatch):
    monkeypatch.setattr(launch_module, "_hooks_set", lambda: True)
    x = torch.zeros(64)
    for _ in range(3):
        launch(kernel, (1,), (x, 32), BLOCK=16)
    assert len(kernel.jit_calls) == 3 and not kernel.direct_calls


def test_interpreted_kernels_keep_tritons_path(kernel, monkeypatch):
    """Under TRITON_INTERPRET=1 kernels are not JITFunctions and no device exists to key on."""
    monkeypatch.setattr(launch_module, "JITFunction", type(None))
    x = torch.zeros(64)
    for _ in range(2):
        launch(kernel, (1,), (x, 32), BLOCK=16)
    assert len(kernel.jit_calls) == 2 and not kernel.direct_calls


def test_host_cdiv_and_next_power_of_2_match_tritons():
    """The host-side grid helpers (triton's are constexpr functions, slow to call from Python) agree with them."""
    import triton

    from kernels.launch import cdiv, next_power_of_2

    for a in range(0, 300):
        for b in (1, 2, 3, 16, 32, 64, 100):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for n in [*range(1, 1100), 4095, 4096, 4097, 2**20 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n


def test_no_hooks_by_default():
    assert not launch_module._hooks_set()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the real launcher)")
def test_real_kernel_through_the_shortcut_aligned_and_misaligned():
    from kernels.swish_product import swish_product

    base = torch.randn(3 * 4099, device="cuda", dtype=torch.bfloat16)
    for offset in (0, 0, 1, 1, 0):  # first launches compile, repeats take the shortcut, offset 1 is misaligned
        gate, up = base[offset:offset + 4099], base[offset + 4099:offset + 2 * 4099]
        expected = torch.nn.functional.silu(gate.float()) * up.float()
        torch.testing.assert_close(swish_product(gate, up).float(), expected, atol=2e-2, rtol=2e-2)
