"""Benchmark the Triton HGRN2 kernels on a GPU against fla's chunk_gla and PyTorch SDPA; check bf16 accuracy.

Usage (on a CUDA machine; fla optional):
    python benchmarks/kernels.py --out results/          # everything: accuracy, timings, decode
    python benchmarks/kernels.py --no-fla --variants      # ours only, trying launch-setting variants

Every timed path starts from the same tensors: pre-activation q, f_logit, i (bf16) and the lower bound. The
fla path does the gate preparation fla's HGRN2 layer does outside its kernel (swish, logsigmoid, logaddexp
with the bound, k = 1 - exp(g)); ours fuses the gates and the swish of q (`swish_q`, as the model calls it).
Timings are medians of triton.testing.do_bench, with the leaves' gradients reset before every forward+backward
(as zero_grad(set_to_none=True) does). Results go to stdout and, with --out, to JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_accuracy import check_case, fla_path, make_inputs, ours  # noqa: E402

from kernels.hgrn2 import chunk as chunk_module  # noqa: E402
from kernels.hgrn2 import chunk_hgrn2, decode_hgrn2  # noqa: E402
from kernels.hgrn2.testing import relative_error  # noqa: E402

SHAPES = [(8, 2048, 16, 128), (4, 4096, 16, 128), (2, 8192, 16, 128), (32, 2048, 8, 128)]
DECODE_BATCHES = (1, 16, 128)
HBM_BYTES_PER_S = 3.02e12  # measured device copy on the H100 (DESIGN.md section 6)
MATMUL_FLOP_PER_S = 750e12
VARIANT_TAG = "variant-result "


def floors(batch, seq_len, heads, dim):
    """Minimum bytes (bf16 q, f, i read; o written; backward adds do read, dq, df, di written) and FLOPs."""
    token_heads = batch * seq_len * heads
    fwd_bytes = token_heads * dim * 2 * 4
    total_bytes = token_heads * dim * 2 * 11
    fwd_flops = token_heads * (2 * 64 * dim * 2 + 2 * dim * dim * 2)  # intra (C=64) + state read and update
    return {
        "fwd_us": 1e6 * max(fwd_bytes / HBM_BYTES_PER_S, fwd_flops / MATMUL_FLOP_PER_S),
        "fwdbwd_us": 1e6 * max(total_bytes / HBM_BYTES_PER_S, 3.5 * fwd_flops / MATMUL_FLOP_PER_S),
    }


def accuracy(shape, use_fla):
    """bf16 runs of ours (and fla) against a float64 reference on the same inputs, batch capped at 2."""
    shape = (min(shape[0], 2),) + tuple(shape[1:])
    rows = check_case(shape, {"ours": ours, "fla": fla_path} if use_fla else {"ours": ours})
    torch.cuda.empty_cache()  # the float64 reference's memory, before the timings
    return rows


def fp32_check():
    """fp32 inputs on the GPU against the float64 step-by-step reference: ordinary and extreme gates, varlen,
    initial state; the fp32 path uses IEEE products, so errors should sit near 1e-6."""
    from kernels.hgrn2 import hgrn2_recurrent_reference

    rows = {}
    cases = {"normal": (1.0, 0.0, None), "extreme f<<0": (8.0, -30.0, None), "f>>0": (4.0, 12.0, None),
             "varlen 3 docs": (1.0, 0.0, [0, 77, 200, 301])}
    for name, (spread, shift, cu) in cases.items():
        gen = torch.Generator(device="cuda").manual_seed(7)
        draw = lambda *shape, gen=gen: torch.randn(*shape, device="cuda", generator=gen)
        n = 1 if cu is None else len(cu) - 1
        leaves = {"q": F.silu(draw(1, 301, 2, 128)), "f_logit": draw(1, 301, 2, 128) * spread + shift,
                  "i": draw(1, 301, 2, 128), "lower_bound": torch.rand(2, 128, device="cuda", generator=gen),
                  "initial_state": draw(n, 2, 128, 128)}
        cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
        do, dht = draw(1, 301, 2, 128), draw(n, 2, 128, 128)
        results = []
        for fn, dtype in ((chunk_hgrn2, torch.float32), (hgrn2_recurrent_reference, torch.float64)):
            xs = {k: v.detach().to(dtype).requires_grad_() for k, v in leaves.items()}
            o, ht = fn(**xs, output_final_state=True, cu_seqlens=cu_t)
            ((o * do.to(dtype)).sum() + (ht * dht.to(dtype)).sum()).backward()
            results.append((o, ht, {k: v.grad for k, v in xs.items()}))
        (o, ht, g), (ro, rht, rg) = results
        rows[name] = {"o": relative_error(o, ro), "final": relative_error(ht, rht),
                      **{f"d{k}": relative_error(g[k], rg[k]) for k in g}}
    return rows


def time_ms(fn, warmup=25, rep=100, grad_to_none=None):
    """Median ms of fn; ``grad_to_none``: leaves whose .grad is reset before every call, so that a backward
    writes fresh gradients as in training (zero_grad(set_to_none=True)) rather than timing torch's
    accumulation into .grad (three to four elementwise kernels, ~0.14 ms at the first shape, in every path)."""
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median", grad_to_none=grad_to_none)


def issue_and_device_ms(step, leaves, calls=10, graph=True):
    """(host ms to issue one forward+backward, device ms of its kernels, ms of one CUDA-graph replay of it):
    when the first exceeds the second the GPU waits for Python and do_bench's wall-clock median times the host,
    not the kernels (docs/kernels.md, v15). Device time is the sum of the kernels' times in the torch profiler
    (means of ``calls``); the graph replay (a median; NaN if not asked for or if the path cannot be captured)
    has no host work."""
    from torch.profiler import ProfilerActivity, profile

    def fresh_step():
        for leaf in leaves:
            leaf.grad = None
        step()

    for _ in range(3):
        fresh_step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fresh_step()
    issue = (time.perf_counter() - start) * 1000 / calls
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fresh_step()
        torch.cuda.synchronize()
    device_us = sum(event.self_device_time_total for event in prof.key_averages())
    replay = math.nan
    if graph:
        try:
            replay = graph_time_us(fresh_step) / 1000
        except RuntimeError as error:
            print(f"  CUDA-graph capture failed: {error}"[:300], flush=True)
    return issue, device_us / 1000 / calls, replay


def time_paths(shape, use_fla, use_sdpa, issue_time=False, rounds=1):
    inputs = make_inputs(*shape)
    leaves = {n: x.detach().clone().requires_grad_() for n, x in inputs.items()}
    do = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    paths = {"ours": ours}
    if use_fla:
        paths["fla chunk_gla"] = fla_path
    steps = {name: (lambda fn=fn: fn(**leaves).backward(do)) for name, fn in paths.items()}
    results = {}
    for name, fn in paths.items():
        with torch.no_grad():
            fwd = time_ms(lambda fn=fn: fn(**inputs))
        fwdbwd = time_ms(steps[name], warmup=50, grad_to_none=list(leaves.values()))
        results[name] = (fwd, fwdbwd)
        if issue_time:
            # fla's path is not replayed as a graph: a failed capture can leave the device in an error state
            results.setdefault("issue/device", {})[name] = issue_and_device_ms(
                steps[name], list(leaves.values()), graph=name == "ours")
    if use_sdpa:
        sdpa = time_sdpa(shape, issue_time)
        results.setdefault("issue/device", {}).update(sdpa.pop("issue/device", {}))
        results.update(sdpa)
        if rounds > 1:
            results["rounds"] = alternating_rounds(shape, steps["ours"], list(leaves.values()), rounds)
    return results


def alternating_rounds(shape, ours_step, ours_leaves, rounds):
    """Forward+backward of ours and of SDPA's default backend timed in turn, ``rounds`` times each: a drift of
    the GPU's clocks or of cuDNN's choice during a run then shows in both columns instead of in one ratio
    (cuDNN's median moved by 8% between runs at 32 x 2048 x 8; docs/perf.md, v17)."""
    sdpa_step, sdpa_leaves = sdpa_fwdbwd(shape)
    times = {"ours": [], "SDPA default": []}
    for _ in range(rounds):
        times["ours"].append(time_ms(ours_step, warmup=50, grad_to_none=ours_leaves))
        times["SDPA default"].append(time_ms(sdpa_step, warmup=50, grad_to_none=sdpa_leaves))
    return times


def sdpa_inputs(shape):
    """q, k, v (leaves) and the output gradient of causal SDPA at ``shape``, in SDPA's [B, H, T, n] layout."""
    batch, seq_len, heads, dim = shape
    q, k, v = (torch.randn(batch, heads, seq_len, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    return q, k, v, torch.randn_like(q)


def sdpa_fwdbwd(shape):
    """One forward+backward of causal SDPA (default backend) at ``shape``, and its leaves."""
    q, k, v, do = sdpa_inputs(shape)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do), [q, k, v]


def time_sdpa(shape, issue_time=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v, do = sdpa_inputs(shape)
    attention = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    results = {}
    for label, backend in (("SDPA default", None), ("SDPA flash", SDPBackend.FLASH_ATTENTION)):
        try:
            if backend is None:
                fwd = time_ms(lambda: attention().detach())
                fwdbwd = time_ms(lambda: attention().backward(do), grad_to_none=[q, k, v])
            else:
                with sdpa_kernel(backend):
                    fwd = time_ms(lambda: attention().detach())
                    fwdbwd = time_ms(lambda: attention().backward(do), grad_to_none=[q, k, v])
            results[label] = (fwd, fwdbwd)
            if issue_time and backend is None:
                results["issue/device"] = {label: issue_and_device_ms(lambda: attention().backward(do), [q, k, v])}
        except RuntimeError as error:  # a backend may not support the shape
            print(f"  {label} failed: {error}", flush=True)
    return results


def graph_time_us(step):
    """Median of replays of a CUDA graph that captures one call of ``step``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return 1000 * time_ms(graph.replay, warmup=20, rep=200)


def decode_row(batch, use_fla, heads=16, dim=128):
    """One batch size: check one step against the reference, then time graph replays of ours (and fla's)."""
    from kernels.hgrn2 import hgrn2_decode_reference

    gen = torch.Generator(device="cuda").manual_seed(batch)
    draw = lambda *s: torch.randn(*s, device="cuda", generator=gen)
    q, f_logit, i = (draw(batch, heads, dim).bfloat16() for _ in range(3))
    lower_bound = torch.rand(heads, dim, device="cuda", generator=gen) * 0.9
    state = draw(batch, heads, dim, dim)
    out = torch.empty_like(i)
    ref_state = state.double()
    ref = hgrn2_decode_reference(q.double(), f_logit.double(), i.double(), ref_state, lower_bound.double())
    check_state = state.clone()
    o = decode_hgrn2(q, f_logit, i, check_state, lower_bound)
    row = {"err_o": relative_error(o, ref), "err_state": relative_error(check_state, ref_state)}
    row["ours_us"] = graph_time_us(lambda: decode_hgrn2(q, f_logit, i, state, lower_bound, out=out))
    if use_fla:
        from fla.ops.gla import fused_recurrent_gla

        g = F.logsigmoid(f_logit.float())
        g = torch.logaddexp(lower_bound.log(), torch.log1p(-lower_bound) + g)
        k = (1 - g.exp()).bfloat16()
        fla_state = state.transpose(-1, -2).contiguous()  # fla's cache is value-first
        row["fla_us"] = graph_time_us(lambda: fused_recurrent_gla(
            q[:, None], k[:, None], i[:, None], g[:, None], initial_state=fla_state, output_final_state=True,
            state_v_first=True))
    row["state_bytes_us"] = 1e6 * batch * heads * dim * dim * 4 * 2 / HBM_BYTES_PER_S
    return row


def decode_times(use_fla):
    return {batch: decode_row(batch, use_fla) for batch in DECODE_BATCHES}


def time_variant(shape, config):
    """fwd and fwd+bwd of ours (bf16) under one launch-setting variant, in this process."""
    chunk_module.CONFIG.update(config)
    inputs = make_inputs(*shape)
    leaves = {n: x.detach().clone().requires_grad_() for n, x in inputs.items()}
    do = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fwd = time_ms(lambda: ours(**inputs))
    return fwd, time_ms(lambda: ours(**leaves).backward(do), grad_to_none=list(leaves.values()))


def variants_sweep(shape_index, configs, base_config):
    """Each variant in its own process: a variant that crashes (an illegal address ends the CUDA context) or
    fails to compile costs only its own row."""
    rows = []
    for config in configs:
        command = [sys.executable, __file__, "--time-variant", json.dumps(config), "--config",
                   json.dumps(base_config), "--shapes", str(shape_index)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            lines = [line for line in done.stdout.splitlines() if line.startswith(VARIANT_TAG)]
            if not lines:
                raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
            fwd, fwdbwd = json.loads(lines[-1][len(VARIANT_TAG):])
            rows.append((config, fwd, fwdbwd))
            print(f"  variant {config}: fwd {fwd:.3f} ms, fwd+bwd {fwdbwd:.3f} ms", flush=True)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            print(f"  variant {config} failed: {error}"[:300], flush=True)
    return rows


def kernel_breakdown(shape):
    """Per-launch timings of ours (torch profiler), to see where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    inputs = make_inputs(*shape)
    leaves = {n: x.detach().clone().requires_grad_() for n, x in inputs.items()}
    do = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    # autograd.grad, not backward: accumulating into .grad would add elementwise kernels of the harness
    step = lambda: torch.autograd.grad(ours(**leaves), list(leaves.values()), do)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)


def markdown(results, accuracy_rows, decode_rows, meta):
    lines = [f"Device: {meta['device']}; torch {meta['torch']}, Triton {meta['triton']}, fla {meta['fla']}. "
             f"Launch config: {meta.get('config', 'default')}. bf16, medians of `triton.testing.do_bench` (ms). "
             "Ratio = other / ours (> 1: ours faster).", "",
             "| B, T, H, n | floor fwd / fwd+bwd | ours fwd / fwd+bwd | fla chunk_gla fwd / fwd+bwd (ratio) "
             "| SDPA default fwd / fwd+bwd (ratio) | SDPA flash fwd / fwd+bwd (ratio) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key, row in results.items():
        ours_f, ours_fb = row["ours"]
        cells = [key, f"{row['floor']['fwd_us'] / 1000:.3f} / {row['floor']['fwdbwd_us'] / 1000:.3f}",
                 f"{ours_f:.3f} / {ours_fb:.3f}"]
        for other in ("fla chunk_gla", "SDPA default", "SDPA flash"):
            if other in row:
                f, fb = row[other]
                cells.append(f"{f:.3f} / {fb:.3f} ({f / ours_f:.2f}× / {fb / ours_fb:.2f}×)")
            else:
                cells.append("—")
        lines.append("| " + " | ".join(cells) + " |")
    issue_rows = [(key, path, times) for key, row in results.items()
                  for path, times in row.get("issue/device", {}).items()]
    if issue_rows:
        lines += ["", "Forward+backward: host time to issue one call, device time of its kernels (ms, means of 10) and "
                  "one CUDA-graph replay of it (median); a wall-clock time above the device time and near the "
                  "host time is host-bound:", "",
                  "| B, T, H, n | path | host issue | device | graph replay |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {key} | {path} | {issue:.3f} | {device:.3f} | {graph:.3f} |"
                  for key, path, (issue, device, graph) in issue_rows]
    round_rows = [(key, row["rounds"]) for key, row in results.items() if "rounds" in row]
    if round_rows:
        lines += ["", "Forward+backward timed in turn (ms, one do_bench median per round):", "",
                  "| B, T, H, n | ours, each round | SDPA default, each round | medians | ratio |",
                  "| --- | --- | --- | --- | --- |"]
        for key, times in round_rows:
            ours_median, sdpa_median = statistics.median(times["ours"]), statistics.median(times["SDPA default"])
            lines.append(f"| {key} | {' '.join(f'{t:.3f}' for t in times['ours'])} | "
                         f"{' '.join(f'{t:.3f}' for t in times['SDPA default'])} | {ours_median:.3f} / "
                         f"{sdpa_median:.3f} | {sdpa_median / ours_median:.2f}× |")
    if accuracy_rows:
        lines += ["", "bf16 relative error vs a float64 reference (same bf16-valued inputs; batch capped at 2):", "",
                  "| B, T, H, n | path | o | dq | df_logit | di | dlower_bound |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for key, rows in accuracy_rows.items():
            for path, errs in rows.items():
                lines.append(f"| {key} | {path} | {errs['o']:.2e} | {errs['dq']:.2e} | {errs['df_logit']:.2e} | "
                             f"{errs['di']:.2e} | {errs['dlower_bound']:.2e} |")
    if decode_rows:
        lines += ["", "Decode step, H 16, n 128, bf16 in, fp32 state, one CUDA-graph replay (µs, median):", "",
                  "| batch | ours | fla fused_recurrent_gla | state bytes floor | ours err (o / state) |",
                  "| --- | --- | --- | --- | --- |"]
        for batch, row in decode_rows.items():
            fla = f"{row['fla_us']:.1f}" if "fla_us" in row else "—"
            lines.append(f"| {batch} | {row['ours_us']:.1f} | {fla} | {row['state_bytes_us']:.1f} | "
                         f"{row['err_o']:.1e} / {row['err_state']:.1e} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-fla", action="store_true")
    parser.add_argument("--no-sdpa", action="store_true")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--variants", nargs="*", default=[],
                        help='launch-setting variants (JSON dicts for chunk.CONFIG) to time at the first shape')
    parser.add_argument("--config", default="{}", help="a JSON dict merged into chunk.CONFIG before anything runs")
    parser.add_argument("--keep-config", action="store_true",
                        help="after --variants, keep the default launch settings (not the fastest variant)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--shapes", default="all",
                        help="'all', 'none' (decode and checks only) or indices into SHAPES, e.g. 0,2")
    parser.add_argument("--fla-shapes", default="all", help="shapes (indices) at which fla is also run")
    parser.add_argument("--fp32-check", action="store_true")
    parser.add_argument("--issue-time", action="store_true",
                        help="also the host time to issue each forward+backward, its kernels' device time and a "
                             "CUDA-graph replay of it")
    parser.add_argument("--rounds", type=int, default=1,
                        help="also time ours and SDPA's default forward+backward in turn, this many times each")
    parser.add_argument("--time-variant", help=argparse.SUPPRESS)  # one --variants row (a child process)
    args = parser.parse_args()
    chunk_module.CONFIG.update(json.loads(args.config))
    named = {"all": SHAPES, "none": []}
    shapes = named[args.shapes] if args.shapes in named else [SHAPES[int(n)] for n in args.shapes.split(",")]
    if args.time_variant:
        print(VARIANT_TAG + json.dumps(time_variant(shapes[0], json.loads(args.time_variant))), flush=True)
        return
    use_fla = not args.no_fla
    if use_fla:
        try:
            import fla  # noqa: F401
        except ImportError:
            print("fla not importable: skipping it", flush=True)
            use_fla = False
    import triton

    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "fla": __import__("fla").__version__ if use_fla else "—"}
    if json.loads(args.config):
        meta["config"] = dict(chunk_module.CONFIG)
    print(meta, flush=True)
    start = time.time()
    if args.variants:
        sweep = [json.loads(v) for v in args.variants]
        first = 0 if args.shapes == "all" else int(args.shapes.split(",")[0])
        rows = variants_sweep(first, sweep, json.loads(args.config))
        if rows and not args.keep_config:  # time everything below with the fastest variant
            best = min(rows, key=lambda row: row[2])[0]
            chunk_module.CONFIG.update(best)
            meta["config"] = dict(chunk_module.CONFIG)
            print(f"best variant {best}; config {chunk_module.CONFIG}", flush=True)
    if args.fp32_check:
        for name, errs in fp32_check().items():
            print(f"fp32 check {name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)
    if args.profile:
        print(kernel_breakdown(shapes[0]), flush=True)
    decode_rows = {} if args.no_decode else decode_times(use_fla)
    if decode_rows:
        print(f"[{time.time() - start:.0f}s] decode: {decode_rows}", flush=True)
    fla_shapes = SHAPES if args.fla_shapes == "all" else [SHAPES[int(n)] for n in args.fla_shapes.split(",")]
    accuracy_rows, results = {}, {}
    for shape in shapes:
        key = ", ".join(map(str, shape))
        if not args.no_accuracy:
            accuracy_rows[key] = accuracy(shape, use_fla and shape in fla_shapes)
            print(f"[{time.time() - start:.0f}s] accuracy {key}: {accuracy_rows[key]}", flush=True)
        row = time_paths(shape, use_fla and shape in fla_shapes, not args.no_sdpa, args.issue_time, args.rounds)
        row["floor"] = floors(*shape)
        results[key] = row
        print(f"[{time.time() - start:.0f}s] timings {key}: {row}", flush=True)
        partial = markdown(results, accuracy_rows, decode_rows, meta)
        if args.out:  # written after every shape: a run cut short still leaves its table
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "kernels.md").write_text(partial)
    table = markdown(results, accuracy_rows, decode_rows, meta)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernels.md").write_text(table)
        payload = {"meta": meta, "timings_ms": results, "accuracy": accuracy_rows,
                   "decode_us": {str(b): r for b, r in decode_rows.items()}}
        (args.out / "kernels.json").write_text(json.dumps(payload, indent=1, default=str))
    errors = [v for rows in accuracy_rows.values() for r in rows.values() for v in r.values() if isinstance(v, float)]
    assert all(math.isfinite(v) for v in errors), "a non-finite error in the accuracy table"


if __name__ == "__main__":
    main()
