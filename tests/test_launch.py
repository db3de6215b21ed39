"""kernels.launch: the compiled kernel is reused only for launches that Triton would specialize the same way.

On the CPU a stand-in kernel records what reaches Triton's JIT and what goes straight to the compiled kernel's
launcher; on a GPU a real kernel is launched through the shortcut with aligned and misaligned views."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from triton.runtime.jit import JITFunction

from kernels import launch as launch_module
from kernels.launch import BoundLaunch, direct_stream, launch


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


def test_bound_launch_with_a_stream_reuses_its_first_compiled_kernel_without_keying(kernel, monkeypatch):
    bound = BoundLaunch(kernel, BLOCK=16, num_warps=4)
    x = torch.zeros(64)
    bound((3,), (x, 5), stream=9)
    # vouched: even a change launch would key (here the integer's class) reaches the kept kernel unkeyed
    monkeypatch.setattr(launch_module, "launch", lambda *args, **kwargs: pytest.fail("keyed a vouched launch"))
    bound((4, 2), (x, 6), stream=9)
    assert len(kernel.jit_calls) == 1
    assert kernel.direct_calls == [(4, 2, 1, 9, "fn", "meta", None, None, None, x, 6, 16, False)]


def test_bound_launch_without_a_stream_is_launch(kernel):
    """Unvouched calls key every argument (so a misaligned view goes through the JIT) and keep nothing for later
    vouched calls: the first vouched call goes through launch again."""
    bound = BoundLaunch(kernel, BLOCK=16)
    x = torch.zeros(64)
    bound((1,), (x, 32))
    bound((1,), (x[1:], 32))
    bound((1,), (x, 32), stream=7)
    assert len(kernel.jit_calls) == 2 and len(kernel.direct_calls) == 1  # the third found the first's kernel


def test_direct_stream_only_for_compiled_kernels_without_hooks(kernel, monkeypatch):
    assert direct_stream(kernel) == (0, 7)
    monkeypatch.setattr(launch_module, "_hooks_set", lambda: True)
    assert direct_stream(kernel) is None
    monkeypatch.setattr(launch_module, "_hooks_set", lambda: False)
    monkeypatch.setattr(launch_module, "JITFunction", type(None))
    assert direct_stream(kernel) is None


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


CHUNK_LAUNCH_SCRIPT = r"""
import json
import torch
from kernels.hgrn2.testing import stub_compiled_launches

calls = []
stub_compiled_launches(calls)
from kernels.hgrn2 import chunk  # noqa: E402
from kernels.launch import argument_key  # noqa: E402

def misaligned(x):  # same values, contiguous, 2 bytes off 16-byte alignment
    flat = torch.empty(x.numel() + 1, dtype=x.dtype)
    flat[1:] = x.flatten()
    return flat[1:].view(x.shape)

def run(dtype=torch.bfloat16, batch=2, cu_seqlens=None, shift=(), with_state=False):
    T, H = (130 if cu_seqlens is None else cu_seqlens[-1]), 2
    inputs = {"q": torch.randn(batch, T, H, 16, dtype=dtype), "f_logit": torch.randn(batch, T, H, 16, dtype=dtype),
              "i": torch.randn(batch, T, H, 32, dtype=dtype), "lower_bound": torch.rand(H, 16)}
    if with_state:
        inputs["initial_state"] = torch.randn(batch, H, 16, 32)
    inputs = {name: (misaligned(x) if name in shift else x).requires_grad_() for name, x in inputs.items()}
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32)
    o, final = chunk.chunk_hgrn2(**inputs, output_final_state=with_state, cu_seqlens=cu)
    do = torch.randn_like(o)
    if "do" in shift:
        do = misaligned(do)
    if with_state:
        dht = torch.randn_like(final)
        outputs, grads = (o, final), (do, misaligned(dht) if "dht" in shift else dht)
    else:
        outputs, grads = (o,), (do,)
    torch.autograd.backward(outputs, grads)  # the gradients as they are (a product in a loss would copy them)

for _ in range(2):
    run()
    run(shift=("q",))
    run(shift=("lower_bound",))
    run(with_state=True)
    run(with_state=True, shift=("initial_state",))
    run(shift=("do",))
    run(with_state=True, shift=("dht",))
    run(dtype=torch.float32)
    run(batch=1, cu_seqlens=[0, 10, 20, 30, 40, 50, 60, 130])  # 8 chunks x 2 heads: 16 flags
    run(batch=1, cu_seqlens=[0, 50, 130])  # 6 flags: another integer class, the same configuration otherwise
    run()

def key(args):
    return [repr((a.dtype, a.data_ptr() % 16 == 0)) if isinstance(a, torch.Tensor) else repr(argument_key(a))
            for a in args]

jit = {call[1]: call[2] for call in calls if call[0] == "jit"}
direct = [call for call in calls if call[0] == "direct"]
wrong = [(key(jit[ident]), key(args[9:9 + len(jit[ident])])) for _, ident, args in direct
         if key(args[9:9 + len(jit[ident])]) != key(jit[ident])]
print(json.dumps({"jit": len(jit), "direct": len(direct), "wrong": wrong[:3]}))
"""


def test_chunk_launches_skip_keying_only_where_triton_specialises_alike():
    """chunk_hgrn2's plans vouch for their launches' arguments (kernels.launch.BoundLaunch) instead of keying them:
    every launch that took a kept compiled kernel must have arguments Triton specialises exactly as those it was
    compiled for (dtype and 16-byte alignment of every pointer, class of every integer), across dtypes, misaligned
    inputs, bound, initial state, incoming gradients and packed batches of other chunk counts. Run on this CPU with
    stand-in compiled kernels, in a process of its own (the kernels decorated without the interpreter)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", CHUNK_LAUNCH_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["wrong"] == [], found
    assert found["direct"] >= 11 * 7, found  # the second round's launches (at least) took the shortcut
