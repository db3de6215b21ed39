"""Run fla's Triton HGRN2 model on the CPU, under Triton's interpreter (``TRITON_INTERPRET=1``).

fla is our reference implementation; it is written for GPUs. Two things stop it in the interpreter:
its autotuner benchmarks configs (no GPU driver to time with), and its kernels call ``.to(...)`` on
loop counters, which the interpreter hands out as plain Python ints. ``enable()`` patches both, for the
conversion self-check and the parity tests; it changes nothing on a machine with a GPU.
``TRITON_INTERPRET=1`` must be set before triton is first imported.
"""

from __future__ import annotations

import os


class _LoopIndex(int):
    """An int that tolerates the dtype casts kernels apply to tensor loop counters."""

    def to(self, *args, **kwargs) -> _LoopIndex:
        return self


def _first_config_only(run):
    def run_first(self, *args, **kwargs):
        self.configs = self.configs[:1]
        return run(self, *args, **kwargs)

    return run_first


def _counting_range(start, end=None, step=None, **_compiler_hints):
    """range() for kernels, with tl.range's signature (its num_stages etc. mean nothing here)."""
    start, end = (0, start) if end is None else (start, end)
    return (_LoopIndex(i) for i in range(start, end, 1 if step is None else step))


def _with_int_loop_counters(patch_lang):
    def patch(fn):
        # Kernels loop with the builtin range as well as tl.range: give both counters a .to().
        fn.__globals__.setdefault("range", _counting_range)
        scope = patch_lang(fn)
        for lang in {tl for tl in fn.__globals__.values() if getattr(tl, "__name__", "") in _LANG_MODULES}:
            scope.set_attr(lang, "range", _counting_range)
            scope.set_attr(lang, "static_range", _counting_range)
        return scope

    return patch


_LANG_MODULES = ("triton.language", "triton.language.core")


def enable() -> None:
    """Patch Triton's interpreter so that fla's kernels run on the CPU (idempotent)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("fla on the CPU needs TRITON_INTERPRET=1 set before triton is imported")
    from triton.runtime import autotuner, interpreter

    if getattr(interpreter, "_hgrn2_patched", False):
        return
    autotuner.Autotuner.run = _first_config_only(autotuner.Autotuner.run)
    interpreter._patch_lang = _with_int_loop_counters(interpreter._patch_lang)
    interpreter._hgrn2_patched = True
