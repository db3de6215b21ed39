"""What the row-axis sums of the intra kernels' tier 0 cost in each register layout, without a GPU.

    python benchmarks/gluon_layouts.py          # with the device's Triton: PYTHONPATH=/tmp/t36 (triton==3.6.0)

Tier 0 of the intra backward spends a quarter of its time on sums along the 64 rows of [64, 16] tiles (a
reverse cumulative sum and a column sum per key block; docs/kernels.md, notes log v14). Plain Triton lays those
tiles out as the loads' coalescing dictates: each warp holds 16 of the 64 rows, so every such sum is warp
shuffles plus an exchange between warps through shared memory and a barrier. Gluon (Triton's layout-explicit
dialect, `triton.experimental.gluon`) lets a kernel choose a layout whose 64 rows lie inside one warp. This
script compiles the same small Gluon kernel — load a [64, 16] bf16 tile, its reverse cumulative sum plus its
column sums, store — for sm_90 in several layouts and counts the SASS instructions that matter: shuffles,
shared-memory stores and loads, barriers. "converted" loads in the coalesced layout and converts there and
back, as a real kernel would for tiles that come from memory. Static counts, not time: the GPU decides.
Gluon has no interpreter, so such a kernel would be tested on the GPU only.
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton  # noqa: E402
from kernel_sass import sass_by_line  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon._runtime import GluonASTSource  # noqa: E402

# The layout Triton picks for the tier-0 tiles (ttgir of _intra_bwd_kernel): 16 rows per warp, 4 warps.
COALESCED = gl.BlockedLayout([1, 8], [16, 2], [4, 1], [1, 0])
LAYOUTS = {
    "coalesced (Triton's)": COALESCED,
    "rows in one warp, 8 x 1 per thread": gl.BlockedLayout([8, 1], [8, 4], [1, 4], [0, 1]),
    "rows in one warp, 2 x 4 per thread": gl.BlockedLayout([2, 4], [32, 1], [1, 4], [0, 1]),
}
COUNTED = ("SHFL", "STS", "LDS", "BAR", "LDG", "FADD")


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _row_sums(x_ptr, y_ptr, LOAD: gl.constexpr, SUM: gl.constexpr):
    rows = gl.arange(0, 64, layout=gl.SliceLayout(1, LOAD))
    cols = gl.arange(0, 16, layout=gl.SliceLayout(0, LOAD))
    offsets = rows[:, None] * 2048 + cols[None, :]  # rows of a [tokens, H 16, n 128] tensor
    x = gl.convert_layout(gl.load(x_ptr + offsets).to(gl.float32), SUM)
    later = gl.associative_scan(x, 0, _add, reverse=True)
    total = gl.sum(x, axis=0)
    gl.store(y_ptr + offsets, gl.convert_layout(later + total[None, :], LOAD))


def opcode_counts(load, summed) -> collections.Counter:
    source = GluonASTSource(fn=_row_sums, signature={"x_ptr": "*bf16", "y_ptr": "*fp32", "LOAD": "constexpr",
                                                     "SUM": "constexpr"},
                            constexprs={"LOAD": load, "SUM": summed},
                            attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 64), options={"num_warps": 4})
    _, _, per_line = sass_by_line(compiled.asm["cubin"])
    return sum(per_line.values(), collections.Counter())


def main() -> None:
    print(f"[64, 16] tile, reverse cumulative sum + column sums along the rows; Triton {triton.__version__}, "
          "sm_90, 4 warps")
    for name, layout in LAYOUTS.items():
        cases = [("loaded in it", layout, layout)]
        if layout is not COALESCED:
            cases.append(("converted", COALESCED, layout))
        for how, load, summed in cases:
            counts = opcode_counts(load, summed)
            figures = "  ".join(f"{op} {counts[op]:3d}" for op in COUNTED)
            print(f"{name:36s} {how:13s} {sum(counts.values()):4d} instructions  {figures}")


if __name__ == "__main__":
    main()
