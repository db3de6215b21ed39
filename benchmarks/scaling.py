"""Scaling of the distributed engines: tokens/s per GPU for one GPU, TP=2, and DP=2 with ZeRO-2.

Needs 2 GPUs (e.g. the device tool's nvidia-h200-x2; keep NVLink multicast off, as launch/ does):

    python benchmarks/scaling.py                      # runs all three layouts, prints a table, writes JSON
    python benchmarks/scaling.py --preset 150m --steps 30 --micro-batch 4 --out runs/bench/scaling.json

One layout alone (what the driver starts, under torchrun for two processes):

    torchrun --standalone --nproc-per-node 2 benchmarks/scaling.py --worker tp2

Every layout trains the same model on random tokens (bf16 on CUDA; the data pipeline is not timed) with the
trainer's engines (``pretrain.engine.LocalEngine``, ``pretrain.parallel.ParallelEngine``), the same micro-batch per
GPU, and ``--accumulation`` micro-batches (default 1) per step per data-parallel rank. It times ``--steps``
optimizer steps after ``--warmup`` (Triton autotuning and compilation happen there) and reports the median step
time with the 10th and 90th percentiles (the spread shows how much of a gap is the machine's jitter). ``--rounds
R`` runs the whole list of layouts R times, one after the other, so that a drift of the machine's speed (clocks,
power) shows as a spread between rounds instead of as a gap between layouts; the table gives each layout's median
over the rounds. Efficiency: DP=2 tokens/s over 2 × one GPU's (goal ≥ 95%); TP=2 per-GPU tokens/s over one GPU's
(TP trades throughput for memory). ``single-zero2`` is one GPU through the same DeepSpeed ZeRO-2 engine as DP=2,
with no communication: the difference to ``single`` is the engine's own cost. ``dp2-zero1`` (gradients all-reduced
after the backward, no per-parameter reduction hooks during it), ``dp2-zero2-overlap`` (DeepSpeed's
``overlap_comm``) and ``dp2-zero2-loops`` (DeepSpeed's own norm and overflow loops) are the variants to
compare against ``dp2-zero2``. Copy the table into docs/perf.md.
"""

from __future__ import annotations

import argparse
import gc
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
    "single-zero1": dict(nproc=1, tensor=1, zero=1),
    "single-zero2": dict(nproc=1, tensor=1, zero=2),
    # the same with DeepSpeed's own per-tensor norm and overflow loops (pretrain.parallel.zero_norms off)
    "single-zero2-loops": dict(nproc=1, tensor=1, zero=2, parallel={"zero_multi_tensor_checks": False}),
    "tp2": dict(nproc=2, tensor=2, zero=1),
    "dp2-zero2": dict(nproc=2, tensor=1, zero=2),
    "dp2-zero2-loops": dict(nproc=2, tensor=1, zero=2, parallel={"zero_multi_tensor_checks": False}),
    # ZeRO-1: gradients all-reduced after the backward instead of reduced by per-parameter hooks during it
    "dp2-zero1": dict(nproc=2, tensor=1, zero=1),
    # the gradient reduction on its own stream while the backward runs, in buckets of 5·10⁷ elements
    "dp2-zero2-overlap": dict(nproc=2, tensor=1, zero=2, parallel={"zero_overlap_comm": True,
                                                                   "zero_bucket_size": 50_000_000}),
}
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="385m")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--model", default="{}",
                        help='JSON dict of model fields over the preset, e.g. \'{"num_layers": 26}\' with --preset '
                             'tiny: the host work of a 26-layer model with next to no GPU work')
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--accumulation", type=int, default=1,
                        help="micro-batches per optimizer step per data-parallel rank (gradient accumulation)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset of " + ", ".join(LAYOUTS))
    parser.add_argument("--profile", type=int, default=0,
                        help="after the timed steps, profile this many more; the main rank writes each step's time "
                             "without compute kernels, in collectives and host-blocked, and its operators by GPU "
                             "and host time (NAME.prof.txt)")
    parser.add_argument("--rounds", type=int, default=1, help="run the list of layouts this many times, interleaved")
    parser.add_argument("--out", default="runs/bench/scaling.json")
    parser.add_argument("--worker", default=None, choices=list(LAYOUTS), help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def train_config(args, layout: dict):
    from pretrain.config import config_from_dict

    dp = layout["nproc"] // layout["tensor"]
    tree = {
        "model": {"preset": args.preset, "vocab_size": args.vocab_size, **json.loads(args.model)},
        "data": {"mix_dir": "unused"},
        "schedule": {"name": "constant"},
        "batch": {
            "micro_batch_size": args.micro_batch,
            "global_batch_size": args.micro_batch * dp * args.accumulation,
            "seq_length": args.seq_length,
        },
        "run": {"steps": args.warmup + args.steps, "precision": args.precision},
        "parallel": {"tensor": layout["tensor"], "zero_stage": layout["zero"], **layout.get("parallel", {})},
    }
    return config_from_dict(tree)


class GcWatch:
    """Counts Python's garbage collections and their time while ``active`` (a full collection of a process
    holding DeepSpeed and megatron-core takes ~0.1-0.2 s on a slow CPU: one on either rank stalls both)."""

    def __init__(self) -> None:
        self.active = False
        self.counts = [0, 0, 0]
        self.seconds = 0.0
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if not self.active:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.counts[info["generation"]] += 1
            self.seconds += time.perf_counter() - self._start

    def summary(self) -> dict:
        return {"collections_per_generation": self.counts, "seconds": self.seconds}


def worker(args) -> None:
    import torch

    from pretrain.engine import Batch, build_engine

    layout = LAYOUTS[args.worker]
    cfg = train_config(args, layout)
    torch.manual_seed(cfg.run.seed)
    engine = build_engine(cfg, cfg.model_config())
    generator = torch.Generator().manual_seed(1000 + engine.dp_rank)
    shape = (args.micro_batch, args.seq_length + 1)

    def timed_step():
        draws = [torch.randint(0, args.vocab_size, shape, generator=generator) for _ in range(args.accumulation)]
        batches = [Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()) for tokens in draws]
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        stats = engine.train_step(batches)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        return stats, time.perf_counter() - start

    times = []
    collections = GcWatch()
    for step in range(args.warmup + args.steps):
        collections.active = step >= args.warmup
        stats, seconds = timed_step()
        if step >= args.warmup:
            times.append(seconds)
    collections.active = False
    if args.profile:
        write_profile(engine, timed_step, args.profile, Path(args.result).with_suffix(".prof.txt"))
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
        "step_times_s": times,  # in order: a tail of slow steps, periodic or not, shows here
        "gc_during_timed_steps": collections.summary(),
        "final_loss": stats.loss,
        "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30) if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    if engine.is_main and args.result:
        Path(args.result).write_text(json.dumps(result))
    if world > 1:
        from pretrain.parallel.distributed import finish_worker

        finish_worker(0)


def run_layout(args, name: str, result_file: Path) -> dict:
    layout = LAYOUTS[name]
    passthrough = [
        "--preset", args.preset, "--vocab-size", str(args.vocab_size), "--model", args.model,
        "--micro-batch", str(args.micro_batch),
        "--accumulation", str(args.accumulation),
        "--seq-length", str(args.seq_length), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--precision", args.precision, "--worker", name, "--result", str(result_file),
        "--profile", str(args.profile),
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
    return json.loads(result_file.read_text())


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Each layout's run with the median tokens/s over the rounds (the lower of the middle two for an even
    count), with every round's figure beside it."""
    summary = {}
    for name, results in runs.items():
        ranked = sorted(results, key=lambda r: r["tokens_per_s"])
        summary[name] = {**ranked[(len(ranked) - 1) // 2], "tokens_per_s_rounds": [r["tokens_per_s"] for r in results]}
    return summary


def print_table(summary: dict[str, dict]) -> None:
    single = summary.get("single")
    print("\n| layout | GPUs | step s (p10–p90) | tokens/s (rounds) | tokens/s per GPU | efficiency | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in summary.items():
        efficiency = ""
        if single and name != "single":
            ideal = single["tokens_per_s"] * r["world"]
            efficiency = f"{100 * r['tokens_per_s'] / ideal:.1f}% of {r['world']}× one GPU"
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        low, high = r["step_time_p10_p90_s"]
        rounds = " / ".join(f"{value:,.0f}" for value in r["tokens_per_s_rounds"])
        print(f"| {name} | {r['world']} | {r['step_time_s']:.3f} ({low:.3f}–{high:.3f}) | {r['tokens_per_s']:,.0f} "
              f"({rounds}) | {r['tokens_per_s_per_gpu']:,.0f} | {efficiency} | {memory} |")


def merged_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping intervals."""
    covered, reach = 0.0, float("-inf")
    for begin, finish in sorted(intervals):
        if finish > reach:
            covered += finish - max(begin, reach)
            reach = finish
    return covered


def step_breakdown(events, steps: int) -> list[str]:
    """Per profiled step: wall, time with no compute kernel on any stream, the part of the step spent in NCCL
    collectives, and host time blocked in CUDA syncs. A collective's kernel spins while it waits for the other
    rank, so on DP layouts a host-bound rank shows as collective time on its peer rather than as idle time;
    without compute and with little blocking means the host could not launch fast enough."""
    from torch.autograd import DeviceType

    windows = {e.name: e.time_range for e in events if e.name.startswith("timed step ")}
    gpu = [e for e in events if e.device_type == DeviceType.CUDA]
    compute = [(e.time_range.start, e.time_range.end) for e in gpu if not e.name.startswith("nccl")]
    collectives = [(e.time_range.start, e.time_range.end) for e in gpu if e.name.startswith("nccl")]
    syncs = [(e.time_range.start, e.time_range.end) for e in events
             if e.device_type == DeviceType.CPU and "Synchronize" in e.name]

    def inside(spans, window):
        return merged_length([(max(b, window.start), min(f, window.end)) for b, f in spans
                              if f > window.start and b < window.end])

    lines = []
    for index in range(steps):
        window = windows.get(f"timed step {index}")
        if window is None:
            continue
        wall = window.end - window.start
        line = f"step {index}: {wall / 1e3:.1f} ms wall"
        if gpu:  # a CUDA run
            line += (f", no compute kernel {(wall - inside(compute, window)) / 1e3:.1f} ms, in collectives "
                     f"{inside(collectives, window) / 1e3:.1f} ms, host blocked in syncs "
                     f"{inside(syncs, window) / 1e3:.1f} ms")
        lines.append(line)
    return lines


def write_profile(engine, timed_step, steps: int, path: Path) -> None:
    """Profile ``steps`` more steps; the main rank writes each step's breakdown (step_breakdown), then its
    operators by GPU time and by host time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall = 0.0
        for index in range(steps):
            with record_function(f"timed step {index}"):
                wall += timed_step()[1]
    if not engine.is_main:
        return
    averages = prof.key_averages()
    kernel_seconds = sum(event.self_device_time_total for event in averages) / 1e6
    text = [f"{steps} steps, {wall:.3f} s wall, {kernel_seconds:.3f} s of GPU kernels "
            f"({100 * kernel_seconds / wall:.1f}% busy; overlapping streams count twice)"]
    text += step_breakdown(prof.events(), steps)
    if engine.device.type == "cuda":
        text.append(averages.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=70))
    text.append(averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
    path.write_text("\n".join(text) + "\n")


def driver(args) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = args.layouts.split(",")
    unknown = [name for name in names if name not in LAYOUTS]
    if unknown:
        raise SystemExit(f"--layouts: unknown {unknown}; choose from {', '.join(LAYOUTS)}")
    runs: dict[str, list[dict]] = {}
    for round_index in range(args.rounds):
        for name in names:
            result = run_layout(args, name, out.with_name(f"{out.stem}.{name}.json"))
            result["round"] = round_index
            runs.setdefault(name, []).append(result)
            # printed and saved after every run: a call cut short still leaves what it finished
            brief = {key: value for key, value in result.items() if key != "step_times_s"}
            print(f"result {name}: {json.dumps(brief)}", flush=True)
            out.write_text(json.dumps({"summary": summarize(runs), "runs": runs}, indent=2))
    print_table(summarize(runs))
    print(f"\nwrote {out}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
