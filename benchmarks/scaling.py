"""Scaling of the distributed engines: tokens/s per GPU for one GPU, TP=2, and DP=2 with ZeRO-2.

Needs 2 GPUs (e.g. the device tool's nvidia-h200-x2; keep NVLink multicast off, as launch/ does):

    python benchmarks/scaling.py                      # runs all three layouts, prints a table, writes JSON
    python benchmarks/scaling.py --preset 150m --steps 30 --micro-batch 4 --out runs/bench/scaling.json

One layout alone (what the driver starts, under torchrun for two processes):

    torchrun --standalone --nproc-per-node 2 benchmarks/scaling.py --worker tp2

Every layout trains the same model on random tokens (bf16 on CUDA; the data pipeline is not timed)
with the trainer's engines (``pretrain.engine.LocalEngine``, ``pretrain.parallel.ParallelEngine``), the
same micro-batch per GPU, and ``--accumulation`` micro-batches (default 1) per step per data-parallel rank.
It times ``--steps`` optimizer steps after ``--warmup`` (Triton autotuning and compilation happen there) and reports the
median step time with the 10th and 90th percentiles (the spread shows how much of a gap is the machine's
jitter). Efficiency: DP=2 tokens/s over 2 × one GPU's (goal ≥ 95%); TP=2 per-GPU tokens/s over one GPU's
(TP trades throughput for memory). ``single-zero2`` is one GPU through the same DeepSpeed ZeRO-2 engine as
DP=2, with no communication: the difference to ``single`` is the engine's own cost. Copy the table into
docs/perf.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this folder comes first on sys.path, where benchmarks/kernels.py would shadow the
# ``kernels`` package: put the repository root there instead.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)

LAYOUTS = {
    "single": dict(nproc=1, tensor=1, zero=0),
    "single-zero2": dict(nproc=1, tensor=1, zero=2),
    "tp2": dict(nproc=2, tensor=2, zero=1),
    "dp2-zero2": dict(nproc=2, tensor=1, zero=2),
}
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="385m")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--accumulation", type=int, default=1,
                        help="micro-batches per optimizer step per data-parallel rank (gradient accumulation)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset of " + ", ".join(LAYOUTS))
    parser.add_argument("--out", default="runs/bench/scaling.json")
    parser.add_argument("--worker", default=None, choices=list(LAYOUTS), help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def train_config(args, layout: dict):
    from pretrain.config import config_from_dict

    dp = layout["nproc"] // layout["tensor"]
    tree = {
        "model": {"preset": args.preset, "vocab_size": args.vocab_size},
        "data": {"mix_dir": "unused"},
        "schedule": {"name": "constant"},
        "batch": {
            "micro_batch_size": args.micro_batch,
            "global_batch_size": args.micro_batch * dp * args.accumulation,
            "seq_length": args.seq_length,
        },
        "run": {"steps": args.warmup + args.steps, "precision": args.precision},
        "parallel": {"tensor": layout["tensor"], "zero_stage": layout["zero"]},
    }
    return config_from_dict(tree)


def worker(args) -> None:
    import torch

    from pretrain.engine import Batch, build_engine

    layout = LAYOUTS[args.worker]
    cfg = train_config(args, layout)
    torch.manual_seed(cfg.run.seed)
    engine = build_engine(cfg, cfg.model_config())
    generator = torch.Generator().manual_seed(1000 + engine.dp_rank)
    shape = (args.micro_batch, args.seq_length + 1)
    times = []
    for step in range(args.warmup + args.steps):
        draws = [torch.randint(0, args.vocab_size, shape, generator=generator) for _ in range(args.accumulation)]
        batches = [Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()) for tokens in draws]
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        stats = engine.train_step(batches)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    world = layout["nproc"]
    step_time = statistics.median(times)
    deciles = statistics.quantiles(times, n=10) if len(times) > 1 else [step_time] * 9
    global_tokens = cfg.batch.global_batch_size * args.seq_length
    result = {
        "layout": args.worker,
        "world": world,
        "preset": args.preset,
        "micro_batch_per_gpu": args.micro_batch,
        "accumulation": args.accumulation,
        "seq_length": args.seq_length,
        "step_time_s": step_time,
        "step_time_p10_p90_s": [deciles[0], deciles[-1]],
        "tokens_per_s": global_tokens / step_time,
        "tokens_per_s_per_gpu": global_tokens / step_time / world,
        "final_loss": stats.loss,
        "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    if engine.is_main and args.result:
        Path(args.result).write_text(json.dumps(result))
    if world > 1:
        from pretrain.parallel.distributed import finish_worker

        finish_worker(0)


def driver(args) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.layouts.split(","):
        layout = LAYOUTS[name]
        result_file = out.with_name(f"{out.stem}.{name}.json")
        passthrough = [
            "--preset", args.preset, "--vocab-size", str(args.vocab_size), "--micro-batch", str(args.micro_batch),
            "--accumulation", str(args.accumulation),
            "--seq-length", str(args.seq_length), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--precision", args.precision, "--worker", name, "--result", str(result_file),
        ]
        script = str(Path(__file__).resolve())
        if layout["nproc"] == 1 and layout["zero"] == 0:  # LocalEngine: no process group
            command = [sys.executable, script, *passthrough]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                       str(layout["nproc"]), script, *passthrough]
        print("$", " ".join(command), flush=True)
        # the repository first, then whatever the caller's path had (e.g. wheels installed with --target)
        python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, **NCCL_ENV, "PYTHONPATH": python_path}
        subprocess.run(command, check=True, env=env)
        results[name] = json.loads(result_file.read_text())
        # printed and saved after every layout: a run cut short still leaves what it finished
        print(f"result {name}: {json.dumps(results[name])}", flush=True)
        out.write_text(json.dumps(results, indent=2))
    single = results.get("single")
    print("\n| layout | GPUs | step s (p10–p90) | tokens/s | tokens/s per GPU | efficiency | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        efficiency = ""
        if single and name != "single":
            ideal = single["tokens_per_s"] * r["world"]
            efficiency = f"{100 * r['tokens_per_s'] / ideal:.1f}% of {r['world']}× one GPU"
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        low, high = r["step_time_p10_p90_s"]
        print(f"| {name} | {r['world']} | {r['step_time_s']:.3f} ({low:.3f}–{high:.3f}) | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s_per_gpu']:,.0f} | {efficiency} | {memory} |")
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
