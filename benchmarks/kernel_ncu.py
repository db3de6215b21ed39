"""One forward+backward of the Triton HGRN2 kernels inside a CUDA profiler range, for Nsight Compute.

    ncu --clock-control none --profile-from-start off --set full --import-source yes -o report \
        python benchmarks/kernel_ncu.py --shape 8,2048,16,128 [--config '{"intra_bwd_warps": 4}']
    ncu -i report.ncu-rep --page details            # per-kernel throughput, occupancy, stall reasons
    ncu -i report.ncu-rep --page source --print-source cuda,sass --csv   # per-line / per-instruction samples

The kernels are compiled and the first-use check is done before the range opens, so the report holds
exactly the launches of one training step's forward and backward (docs/kernels.md, "Notes log").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_accuracy import make_inputs, ours  # noqa: E402

from kernels.hgrn2 import chunk as chunk_module  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,2048,16,128", help="B,T,H,n")
    parser.add_argument("--config", default="{}", help="a JSON dict merged into kernels.hgrn2.chunk.CONFIG")
    args = parser.parse_args()
    chunk_module.CONFIG.update(json.loads(args.config))
    shape = tuple(int(n) for n in args.shape.split(","))
    leaves = {name: x.requires_grad_() for name, x in make_inputs(*shape).items()}
    do = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):  # compile, first-use check, allocator warm-up
        ours(**leaves).backward(do)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    ours(**leaves).backward(do)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
