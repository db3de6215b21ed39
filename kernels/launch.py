"""Launching Triton (and Gluon) kernels with less host work than ``kernel[grid](*args, **kwargs)``.

Each ``kernel[grid](...)`` goes through Triton's JIT: it binds every argument, specializes each one, builds a
cache key from all of them and the launch options, looks the compiled kernel up and only then launches it. On
the H200's host this is ~65 µs per launch of the HGRN2 kernels (~20 arguments, ~20 constexprs; Triton 3.6),
which made one forward+backward of the chunk kernels (9 launches then) host-bound: 1.46 ms to issue against 1.19 ms
of GPU work (docs/kernels.md, v16). ``launch`` keeps the compiled kernel per call configuration after Triton's
first launch and afterwards calls its launcher directly.

The configuration key is what Triton's specialization depends on: the kernel, the keyword arguments (the
constexprs and launch options, which the call sites pass by keyword), each tensor's dtype and whether its
address is 16-byte aligned, each integer's width class, whether it is 1 and whether 16 divides it. A change in
any of them goes through Triton again (and compiles if Triton has to).

Triton's own path is kept where the shortcut would skip something: under the interpreter, and while a launch
hook is set (profilers such as proton read the launch metadata the hook receives).
"""

from __future__ import annotations

import torch
from triton import knobs
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

# configuration key -> (launcher, its arguments between the stream and the kernel's, the kernel's arguments after
# the positional ones)
_compiled: dict[tuple, tuple] = {}


def argument_key(value) -> object:
    """What Triton specializes a runtime argument on (pointers: dtype and 16-byte alignment; integers: width, 1,
    divisibility by 16; floats: nothing)."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % 16 == 0
    if isinstance(value, float):
        return float
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**31) <= value < 2**31, value == 1, value % 16 == 0
    return value


def launch(kernel, grid: tuple[int, ...], args: tuple, **kwargs) -> tuple | None:
    """``kernel[grid](*args, **kwargs)``: runtime arguments positional (tensors, None, numbers), constexprs and
    launch options (num_warps, num_stages, maxnreg) by keyword. Returns the compiled kernel's direct launch for
    these arguments (for BoundLaunch), or None where Triton's path ran without one (interpreter, launch hook, a
    compilation still pending)."""
    if interpreted(kernel) or _hooks_set():  # no device to key on, or a hook to call
        kernel[grid](*args, **kwargs)
        return None
    device = _current_device()
    # plain tensors, most of the arguments, keyed inline: a function call per argument was a third of launch's time
    arguments = [(a.dtype, a.data_ptr() % 16 == 0) if type(a) is torch.Tensor else argument_key(a) for a in args]
    # the device too: a compiled kernel's function handle belongs to the device it was loaded on
    key = (id(kernel), device, tuple(kwargs.items()), *arguments)
    found = _compiled.get(key)
    if found is None:
        compiled = kernel[grid](*args, **kwargs)
        if not hasattr(compiled, "packed_metadata"):  # not a compiled kernel (say, a compilation still pending)
            return None
        found = _compiled[key] = (*_launcher(compiled), _trailing_arguments(kernel, len(args), kwargs))
        return found
    _launch_direct(found, grid, driver.active.get_current_stream(device), args)
    return found


def _launch_direct(direct: tuple, grid: tuple[int, ...], stream: int, args: tuple) -> None:
    """A kept compiled kernel (launch's (launcher, middle, trailing)) launched on ``stream``, grid padded to 3-D."""
    launcher, middle, trailing = direct
    grid = (*grid, 1, 1)
    launcher(grid[0], grid[1], grid[2], stream, *middle, *args, *trailing)


class BoundLaunch:
    """``launch`` for one call site on one device, its constexprs and launch options bound (``options``).

    Called with the current stream (``direct_stream``) by a caller that vouches that the runtime arguments
    specialise as at its first such call (the same dtypes, every pointer 16-byte aligned, integers of the same
    class: ``argument_key``), it launches the compiled kernel kept from that call without keying any argument:
    the caller knows from its own configuration what launch would find out argument by argument (~6 of its
    ~12 µs per launch on this CPU). Called without a stream, it is ``launch``."""

    __slots__ = ("kernel", "options", "_direct")

    def __init__(self, kernel, **options) -> None:
        self.kernel, self.options, self._direct = kernel, options, None

    def __call__(self, grid: tuple[int, ...], args: tuple, stream: int | None = None) -> None:
        if stream is not None and self._direct is not None:
            _launch_direct(self._direct, grid, stream, args)
            return
        direct = launch(self.kernel, grid, args, **self.options)
        if stream is not None:
            self._direct = direct


def direct_stream(kernel) -> tuple[int, int] | None:
    """(current device, its current stream) where launches may go straight to a compiled kernel (``kernel``
    compiled rather than interpreted, no launch hook set), else None: asked once per batch of launches."""
    if interpreted(kernel) or _hooks_set():
        return None
    device = _current_device()
    return device, driver.active.get_current_stream(device)


def interpreted(kernel) -> bool:
    """Whether a @triton.jit kernel runs in Triton's interpreter (TRITON_INTERPRET=1 when it was decorated): it is
    then an InterpretedFunction, not a JITFunction."""
    return not isinstance(kernel, JITFunction)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for grids on the host: triton.cdiv is a constexpr_function, ~4 µs a call through its wrapper
    (four per forward+backward of the HGRN2 kernels, more per model step in the norms and the GLU product)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (n >= 1) on the host (triton.next_power_of_2: ~5 µs a call, as cdiv)."""
    return 1 << (n - 1).bit_length()


def _launcher(compiled) -> tuple:
    """The compiled kernel's launcher and the arguments it takes between the stream and the kernel's own (no
    launch metadata, no hooks). Triton 3.6's CudaLauncher wraps a C function in Python that only allocates the
    scratch memory a kernel may need: the C function is taken directly when the kernel needs none."""
    run = compiled.run
    tail = (compiled.packed_metadata, None, None, None)
    if getattr(run, "global_scratch_size", None) == 0 and getattr(run, "profile_scratch_size", None) == 0:
        try:
            return run.launch, (compiled.function, run.launch_cooperative_grid, run.launch_pdl, None, None, *tail)
        except AttributeError:
            pass
    return run, (compiled.function, *tail)


def _current_device() -> int:
    """The device Triton's own launch would take (its kernels run on the current stream of the current device)."""
    return driver.active.get_current_device()


def _hooks_set() -> bool:
    """Whether a launch hook is registered (Triton 3.6 keeps them in a HookChain, empty by default)."""
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(hook is not None and getattr(hook, "calls", True) for hook in hooks)


def _trailing_arguments(kernel, positional: int, kwargs: dict) -> tuple:
    """The values of the kernel's parameters after the positional ones, in order (the launcher takes every
    parameter, constexprs included, and ignores the constexprs)."""
    params = kernel.params[positional:]
    return tuple(kwargs.get(p.name, p.default) for p in params)
