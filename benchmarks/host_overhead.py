"""Host time to issue one forward+backward of chunk_hgrn2, and where it goes (cProfile).

    python benchmarks/host_overhead.py [--shape 8,2048,16,128] [--profile 25]      # GPU: issue vs device time
    python benchmarks/host_overhead.py --stub-launches [--shape 1,128,16,128]      # CPU: Python overhead only

On a GPU it times the host's issue of a forward+backward (20 in a row, no synchronisation) against the device
time of the same calls (CUDA events): when the first is above the second, wall-clock benchmarks time Python
(docs/kernels.md, "Not done / next steps" (1)). With --stub-launches every compiled kernel is a stand-in that runs
nothing (kernels.hgrn2.testing.stub_compiled_launches), so the Python work around the kernels (validation,
allocation, autograd, launches) can be profiled on a machine without a GPU; keep the shape small there, CPU
allocations of real size dominate.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_accuracy import DEVICE, make_inputs, ours  # noqa: E402

from kernels.hgrn2.testing import stub_compiled_launches  # noqa: E402


def make_step(shape: tuple[int, int, int, int]):
    """One forward+backward of ours at the benchmark's inputs (kernel_accuracy, as benchmarks/kernels.py)."""
    leaves = {name: x.requires_grad_() for name, x in make_inputs(*shape).items()}
    grad_out = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16)

    def step() -> None:
        for leaf in leaves.values():
            leaf.grad = None
        ours(**leaves).backward(grad_out)

    return step


def time_issue(step, calls: int, cuda: bool) -> tuple[float, float | None]:
    """Host ms per call to issue `calls` steps in a row, and their device ms per call (CUDA events)."""
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    began = time.perf_counter()
    for _ in range(calls):
        step()
    issue = (time.perf_counter() - began) / calls * 1e3
    if not cuda:
        return issue, None
    end.record()
    torch.cuda.synchronize()
    return issue, start.elapsed_time(end) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=None, help="B,T,H,n (default 8,2048,16,128; 1,128,16,128 stubbed)")
    parser.add_argument("--stub-launches", action="store_true")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--profile", type=int, default=25, help="cProfile rows to print (0: none)")
    args = parser.parse_args()
    cuda = not args.stub_launches
    if cuda and not torch.cuda.is_available():
        sys.exit("no GPU: run with --stub-launches to profile the Python overhead on the CPU")
    if args.stub_launches:
        stub_compiled_launches()
    default = "8,2048,16,128" if cuda else "1,128,16,128"
    shape = tuple(int(n) for n in (args.shape or default).split(","))
    step = make_step(shape)
    for _ in range(5):  # compile, first-use self-check, allocator warm-up
        step()
    issue, device_ms = time_issue(step, args.calls, cuda)
    device = f", device {device_ms:.3f} ms per call" if device_ms is not None else " (launches stubbed)"
    print(f"shape {shape}: host issue {issue:.3f} ms per forward+backward{device}", flush=True)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(100):
            step()
        profiler.disable()
        if cuda:
            torch.cuda.synchronize()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)


if __name__ == "__main__":
    main()
