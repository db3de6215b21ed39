"""Compile the heavy HGRN2 kernels for sm_90 without a GPU: registers, spills, and where the SASS comes from.

    python benchmarks/kernel_sass.py [--kernels intra_fwd,fwd_scan,bwd_dstate,intra_bwd,bwd_inter,
                                                intra_fwd_gluon,intra_bwd_gluon]
                                     [--config '{"intra_bwd_warps": 8}'] [--tier 0|1]

At the benchmark's first shape (H 16, n 128, bf16 inputs, with a lower bound) and the launch settings of
``kernels.hgrn2.chunk.CONFIG`` (updated by ``--config``), each kernel is compiled with Triton for sm_90 and
reported: registers and spill bytes (ptxas -v), SASS instructions, and the source lines (ours and Triton's
standard library) that produce the most instructions. The counts are static, not time: a line inside the
key-block loop runs K / BK times per program. Between GPU sessions this shows what a change does to register
pressure and code size; time it on the GPU (benchmarks/kernels.py, benchmarks/kernel_ncu.py) before keeping it.
Uses the ptxas and nvdisasm that ship with Triton. intra_fwd_gluon and intra_bwd_gluon are the Gluon tier 0 of
the intra forward and backward (kernels/hgrn2/gluon_tier0.py; needs Triton 3.6's Gluon, as on the device:
PYTHONPATH to a triton==3.6.0 install).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.hgrn2 import chunk  # noqa: E402
from kernels.hgrn2.utils import SUB_CHUNK  # noqa: E402

HEADS, DIM = 16, 128
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SIZES = {"H": HEADS, "K": DIM, "V": DIM, "BT": chunk.CHUNK}


def kernel_specs(tier: int) -> dict:
    """Per kernel: (JIT function, argument types, constexpr values, launch options), as chunk.py launches them;
    the intra kernels as launched for ``tier`` (chunk._launch_tiers)."""
    config = chunk.CONFIG
    tiers = {name: chunk._tier_launches(name, DIM)[tier] for name in ("intra_fwd", "intra_bwd")}
    cu = {"cu_ptr": "*i32", "chunks_ptr": "*i32"}
    a_dtype = "*bf16"  # fp32 A is stored as hi + lo bf16 parts (chunk._store_a)
    a_split = chunk._a_split(tl.bfloat16)
    states = "*bf16" if chunk._state_dtype(torch.bfloat16) == torch.bfloat16 else "*fp32"  # as the launch stores
    inter = "*bf16" if chunk._inter_dtype(torch.bfloat16) == torch.bfloat16 else "*fp32"
    intra_fwd = {"q_ptr": "*bf16", "x_ptr": "*bf16", "beta_ptr": "*fp32", "a_ptr": a_dtype, "qd_ptr": "*bf16",
                 "kd_ptr": "*bf16", "total_ptr": "*fp32", "half_ptr": "*fp32", "flag_ptr": "*i32", **cu,
                 "scale": "fp32"}
    intra_bwd = {"q_ptr": "*bf16", "x_ptr": "*bf16", "beta_ptr": "*fp32", "v_ptr": "*bf16", "do_ptr": "*bf16",
                 "d_ptr": "*bf16", "dq_ptr": inter, "dk_ptr": inter, "dgc_ptr": "*fp32", "half_ptr": "*fp32",
                 "total_ptr": "*fp32", "dq_out_ptr": "*bf16",
                 "dx_ptr": "*bf16", "dbeta_ptr": "*fp32", "flag_ptr": "*i32", **cu, "scale": "fp32"}
    bwd_inter = {"v_ptr": "*bf16", "do_ptr": "*bf16", "hs_ptr": states, "ds_ptr": states, "total_ptr": "*fp32",
                 "dq_ptr": inter, "dk_ptr": inter, "dgc_ptr": "*fp32", "d_ptr": "*bf16", "kd_ptr": "*bf16",
                 "a_ptr": a_dtype, "dv_ptr": "*bf16", **cu}
    scan = {"qd_ptr": "*bf16", "kd_ptr": "*bf16", "total_ptr": "*fp32", "v_ptr": "*bf16", "a_ptr": a_dtype,
            "o_ptr": "*bf16", "h0_ptr": "*fp32", "ht_ptr": "*fp32", "hs_ptr": states, "cu_ptr": "*i32",
            "chunk0_ptr": "*i32"}
    dstate = {"qd_ptr": "*bf16", "do_ptr": "*bf16", "total_ptr": "*fp32", "dht_ptr": "*fp32", "dh0_ptr": "*fp32",
              "ds_ptr": states, "cu_ptr": "*i32", "chunk0_ptr": "*i32"}
    dots = {"DOT": tl.bfloat16, "PREC": "tf32"}
    scan_launch = {"num_stages": config["scan_stages"], "maxnreg": config["scan_maxnreg"]}
    return {
        "intra_fwd": (chunk._intra_fwd_kernel, {**intra_fwd, "n_flags": "i32"},
                      {"H": HEADS, "K": DIM, "BT": chunk.CHUNK, "BC": SUB_CHUNK, "BK": tiers["intra_fwd"]["BK"],
                       "HAS_BETA": True, **dots, **chunk._gate_options(),
                       "A_PREC_SPLIT": chunk._a_prec_split(tl.bfloat16), "TIER": tier, "SWISH_Q": True,
                       "WHOLE": config["whole_chunk"], "A_SPLIT": a_split, "STORE_HALVES": True},
                      {"num_warps": tiers["intra_fwd"]["num_warps"], "maxnreg": tiers["intra_fwd"].get("maxnreg"),
                       "num_stages": tiers["intra_fwd"].get("num_stages")}),
        "fwd_scan": (chunk._fwd_scan_kernel, scan,
                     {**SIZES, "BV": chunk._value_block(DIM), "HAS_H0": False, "STORE_HT": False, "STORE_HS": True,
                      **dots, "A_SPLIT": a_split}, {**scan_launch, "num_warps": config["fwd_scan_warps"]}),
        "bwd_dstate": (chunk._bwd_dstate_kernel, dstate,
                       {**SIZES, "BV": chunk._value_block(DIM), "HAS_DHT": False, "STORE_DH0": False, **dots},
                       {**scan_launch, "num_warps": config["dstate_warps"]}),
        "intra_bwd": (chunk._intra_bwd_kernel, {**intra_bwd, "n_flags": "i32"},
                      {**SIZES, "BC": SUB_CHUNK, "BK": tiers["intra_bwd"]["BK"], "HAS_BETA": True,
                       **dots, **chunk._grad_options(torch.bfloat16), **chunk._gate_options(),
                       "TIER": tier, "SWISH_Q": True, "KEY_GROUPS": config["intra_bwd_key_groups"],
                       "ROW_GROUPS": config["dbeta_row_groups"]},
                      {"num_warps": tiers["intra_bwd"]["num_warps"], "maxnreg": tiers["intra_bwd"].get("maxnreg"),
                       "num_stages": tiers["intra_bwd"].get("num_stages")}),
        "intra_fwd_gluon": ("intra_fwd_tier0_kernel", gluon_args(intra_fwd),
                            {"H": HEADS, "K": DIM, "HAS_BETA": True, "SWISH_Q": True, "STORE_HALVES": True},
                            {"num_warps": 4}),
        "intra_bwd_gluon": ("intra_bwd_tier0_kernel",
                            gluon_args({name: kind for name, kind in intra_bwd.items()
                                        if name not in ("v_ptr", "do_ptr")}),
                            {"H": HEADS, "K": DIM, "HAS_BETA": True, "SWISH_Q": True},
                            {"num_warps": 4, "maxnreg": config["gluon_maxnreg"]}),
        "bwd_inter": (chunk._bwd_inter_kernel, bwd_inter, {**SIZES, "BV": config["inter_block_v"], **dots,
                                                           "SPLIT": True, "A_SPLIT": a_split},
                      {"num_warps": config["inter_warps"], "num_stages": config["inter_stages"],
                       "maxnreg": config["inter_maxnreg"]}),
    }


def gluon_args(triton_args: dict) -> dict:
    """A Triton intra kernel's arguments as its Gluon tier 0 takes them: the chunks' spans in place of cu_seqlens and
    the chunk list."""
    args = {name: kind for name, kind in triton_args.items() if name not in ("cu_ptr", "chunks_ptr", "scale")}
    return {**args, "span_ptr": "*i32", "scale": "fp32"}


def compile_for_hopper(fn, arg_types: dict, constexprs: dict, options: dict):
    source_type = ASTSource
    if isinstance(fn, str):  # a Gluon kernel, imported only here (the CPU's Triton may lack this Gluon)
        from triton.experimental.gluon._runtime import GluonASTSource

        from kernels.hgrn2 import gluon_tier0

        fn, source_type = getattr(gluon_tier0, fn), GluonASTSource
    signature = {**arg_types, **{name: "constexpr" for name in constexprs}}
    # as the launcher specialises them: torch's allocations are 16-byte aligned (vectorised loads and stores)
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, kind in arg_types.items()
               if kind.startswith("*")}
    source = source_type(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
    options = {name: value for name, value in options.items() if value is not None}
    return triton.compile(source, target=GPUTarget("cuda", 90, 64), options=options)


def ptxas_report(ptx: str) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    result = subprocess.run([BIN / "ptxas", "-arch=sm_90a", "-v", handle.name, "-o", os.devnull],
                            capture_output=True, text=True)
    return "; ".join(line.split("info    : ")[-1].strip() for line in result.stderr.splitlines()
                     if "Used" in line or "spill" in line)


def sass_by_line(cubin: bytes) -> tuple[int, collections.Counter, dict]:
    """Instruction count, instructions per (file, line), and the most frequent opcodes per line."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    listing = subprocess.run([BIN / "nvdisasm", "-g", "-c", handle.name], capture_output=True, text=True).stdout
    per_line, opcodes, where, total = collections.Counter(), collections.defaultdict(collections.Counter), None, 0
    for text in listing.splitlines():
        marker = re.search(r'//## File "([^"]+)", line (\d+)', text)
        if marker:
            where = (marker.group(1), int(marker.group(2)))
            continue
        instruction = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(@\S+\s+)?([A-Z0-9_.]+)", text)
        if instruction and where:
            total += 1
            per_line[where] += 1
            opcodes[where][instruction.group(2).split(".")[0]] += 1
    return total, per_line, opcodes


def source_text(path: str, line: int) -> str:
    try:
        return Path(path).read_text().splitlines()[line - 1].strip()[:80]
    except (OSError, IndexError):
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="intra_fwd,fwd_scan,bwd_dstate,intra_bwd,bwd_inter")
    parser.add_argument("--config", default="{}", help="a JSON dict merged into kernels.hgrn2.chunk.CONFIG")
    parser.add_argument("--lines", type=int, default=15, help="source lines to list per kernel")
    parser.add_argument("--tier", type=int, default=0, choices=(0, 1),
                        help="launch of the intra kernels: tier 0 or the rare tiers")
    args = parser.parse_args()
    chunk.CONFIG.update(json.loads(args.config))
    specs = kernel_specs(args.tier)
    for name in args.kernels.split(","):
        fn, arg_types, constexprs, options = specs[name]
        compiled = compile_for_hopper(fn, arg_types, constexprs, options)
        total, per_line, opcodes = sass_by_line(compiled.asm["cubin"])
        print(f"== {name} {options}: {total} SASS instructions; {compiled.metadata.shared} B shared memory; "
              f"{ptxas_report(compiled.asm['ptx'])}")
        for (path, line), count in per_line.most_common(args.lines):
            top = ", ".join(f"{op} {n}" for op, n in opcodes[(path, line)].most_common(3))
            print(f"{count:6d}  {Path(path).name}:{line:<5d} {source_text(path, line):80s}  [{top}]")


if __name__ == "__main__":
    main()
