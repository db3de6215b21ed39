"""bf16 accuracy of the Triton chunk kernels on the GPU, case by case, localised to chunks and heads.

    python benchmarks/kernel_accuracy.py                        # the default cases, ours and fla side by side
    python benchmarks/kernel_accuracy.py --no-fla --config '{"fwd_scan_warps": 4}' --model   # one launch variant

Every case draws bf16 inputs (pre-swish q, f_logit, i; fp32 lower bound), runs ours (and fla's chunk_gla with
the gate preparation fla's HGRN2 layer does) and compares the output and every gradient with the float64
chunkwise reference on the same bf16-valued inputs. For ours it also names the worst
64-row chunk and head of the output, so an error confined to one part of the computation shows where it is,
and it repeats the forward without autograd (no chunk states kept). A variant is a dict merged into
``kernels.hgrn2.chunk.CONFIG`` (``{"dot": "fp32"}`` instead runs the kernels' fp32 operand path on the bf16
inputs): ``--config`` applies one to the whole run, ``--variants`` reruns the cases under each. Run one
process per suspect variant: a miscompiled kernel can end the process with an illegal address.
``--model`` repeats tests/test_model_gpu.py's comparison (the model with the Triton backend against the
chunked-PyTorch one under bf16 autocast) and checks the kernel on each layer's captured inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.hgrn2 import chunk as chunk_module  # noqa: E402
from kernels.hgrn2 import chunk_hgrn2, hgrn2_chunk_torch  # noqa: E402
from kernels.hgrn2.testing import relative_error  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke test under TRITON_INTERPRET=1
# (B, T, H, n): the model test's shape first, then the same with T a multiple of the chunk, then head dim 128
# and the benchmark's T.
CASES = [(4, 300, 4, 64), (4, 320, 4, 64), (4, 256, 4, 64), (2, 300, 2, 128), (2, 2048, 4, 64),
         (2, 2048, 4, 128)]


def make_inputs(batch, seq_len, heads, dim, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, device=DEVICE, generator=gen)
    shape = (batch, seq_len, heads, dim)
    return {"q": draw(*shape).bfloat16(), "f_logit": (draw(*shape) * 2).bfloat16(), "i": draw(*shape).bfloat16(),
            "lower_bound": torch.rand(heads, dim, device=DEVICE, generator=gen) * 0.9}


def ours(q, f_logit, i, lower_bound):
    return chunk_hgrn2(q, f_logit, i, lower_bound, swish_q=True)[0]


def fla_path(q, f_logit, i, lower_bound):
    from fla.ops.gla import chunk_gla

    g = F.logsigmoid(f_logit)
    g = torch.logaddexp(lower_bound.log(), torch.log1p(-lower_bound) + g)
    return chunk_gla(F.silu(q), (1 - g.exp()).to(i), i, g)[0]


def reference(q, f_logit, i, lower_bound):
    return hgrn2_chunk_torch(F.silu(q), f_logit, i, lower_bound, chunk_size=16)[0]


def run_with_grads(fn, inputs, do):
    leaves = {name: x.detach().clone().requires_grad_() for name, x in inputs.items()}
    o = fn(**leaves)
    o.backward(do.to(o.dtype))
    return o.detach(), {name: x.grad for name, x in leaves.items()}


def worst_part(o, ref):
    """(chunk, its error) and (head, its error) of the output, errors relative to the part's own norm."""
    diff, ref = (o.double() - ref).float(), ref.float()
    seq_len = o.shape[1]
    chunks = [rel_part(diff[:, s : s + 64], ref[:, s : s + 64]) for s in range(0, seq_len, 64)]
    heads = [rel_part(diff[:, :, h], ref[:, :, h]) for h in range(o.shape[2])]
    c, h = max(range(len(chunks)), key=chunks.__getitem__), max(range(len(heads)), key=heads.__getitem__)
    return {"worst_chunk": (c, round(chunks[c], 5)), "best_chunk": round(min(chunks), 5),
            "worst_head": (h, round(heads[h], 5))}


def rel_part(diff, ref):
    return (diff.norm() / ref.norm().clamp_min(1e-30)).item()


def check_case(shape, paths, seed=1):
    inputs = make_inputs(*shape, seed)
    do = torch.randn(shape, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(seed + 1))
    ref_o, ref_g = run_with_grads(reference, {n: x.double() for n, x in inputs.items()}, do.double())
    rows = {}
    for name, fn in paths.items():
        o, grads = run_with_grads(fn, inputs, do)
        row = {"o": relative_error(o, ref_o), **{f"d{n}": relative_error(grads[n], ref_g[n]) for n in grads}}
        if name == "ours":
            row.update(worst_part(o, ref_o))
        rows[name] = row
    return rows


def check_no_grad(shape, seed=1):
    """Ours without autograd (no chunk states kept, no final state): the output's error."""
    inputs = make_inputs(*shape, seed)
    ref = reference(**{n: x.double() for n, x in inputs.items()})
    with torch.no_grad():
        o = ours(**inputs)
    return {"o (no grad)": relative_error(o, ref), **worst_part(o, ref)}


def fp32_dot_config(dtype):
    return tl.float32, "ieee"


def with_variant(variant: dict):
    """Apply a variant; returns a function that undoes it."""
    saved_config, saved_dot = dict(chunk_module.CONFIG), chunk_module._dot_config
    if variant.get("dot") == "fp32":
        chunk_module._dot_config = fp32_dot_config
    chunk_module.CONFIG.update({k: v for k, v in variant.items() if k != "dot"})
    chunk_module._plan.cache_clear()  # plans are keyed by CONFIG, not by a patched _dot_config

    def undo():
        chunk_module.CONFIG.clear()
        chunk_module.CONFIG.update(saved_config)
        chunk_module._dot_config = saved_dot
        chunk_module._plan.cache_clear()

    return undo


def model_check():
    """tests/test_model_gpu.py's bf16 comparison, then the kernel on each layer's captured inputs."""
    import hgrn2.model as model_module
    from hgrn2 import HGRN2LM, preset

    torch.manual_seed(0)
    ours_model = HGRN2LM(preset("tiny", hidden_size=256, expand_ratio=64, backend="triton")).to(DEVICE)
    with torch.no_grad():
        ours_model.lower_bounds.normal_(0, 1)
    ref_model = HGRN2LM(ours_model.config.replace(backend="chunk_torch")).to(DEVICE)
    ref_model.load_state_dict(ours_model.state_dict())
    tokens = torch.randint(0, ours_model.config.vocab_size, (4, 301), device=DEVICE)
    captured = []
    original = model_module.hgrn2_recurrence

    def capture(backend, q, f_logit, i, bound, *args):
        if backend == "triton":
            captured.append([x if x is None else x.detach().clone() for x in (q, f_logit, i, bound)])
        return original(backend, q, f_logit, i, bound, *args)

    model_module.hgrn2_recurrence = capture
    try:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            logits = ours_model(tokens[:, :-1]).float()
            ref_logits = ref_model(tokens[:, :-1]).float()
    finally:
        model_module.hgrn2_recurrence = original
    result = {"logits": relative_error(logits, ref_logits), "layers": []}
    for q, f_logit, i, bound in captured:
        o = chunk_hgrn2(q, f_logit, i, bound)[0]
        ref = hgrn2_chunk_torch(*(x if x is None else x.double() for x in (q, f_logit, i, bound)))[0]
        result["layers"].append({"o": relative_error(o, ref), **worst_part(o, ref),
                                 "f_logit range": (f_logit.min().item(), f_logit.max().item()),
                                 "bound range": None if bound is None else (bound.min().item(), bound.max().item())})
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=[], help="JSON dicts; each reruns ours over the cases")
    parser.add_argument("--no-fla", action="store_true")
    parser.add_argument("--model", action="store_true")
    parser.add_argument("--cases", default="all", help="'all' or indices into CASES")
    parser.add_argument("--config", default=None, help="a variant (JSON) applied to everything this run does")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cases = CASES if args.cases == "all" else [CASES[int(n)] for n in args.cases.split(",")]
    paths = {"ours": ours}
    if not args.no_fla:
        try:
            import fla  # noqa: F401

            paths["fla"] = fla_path
        except ImportError:
            print("fla not importable: ours only", flush=True)
    if args.config:
        with_variant(json.loads(args.config))
        print(f"config {args.config}: {chunk_module.CONFIG}", flush=True)
    report = {"cases": {}, "no_grad": {}, "variants": {}, "model": None}
    for shape in cases:
        key = ", ".join(map(str, shape))
        report["cases"][key] = check_case(shape, paths)
        print(f"{key}: {json.dumps(report['cases'][key])}", flush=True)
    for text in args.variants:
        undo = with_variant(json.loads(text))
        try:
            rows = {", ".join(map(str, s)): check_case(s, {"ours": ours})["ours"] for s in cases}
        finally:
            undo()
        report["variants"][text] = rows
        for key, row in rows.items():
            print(f"variant {text} {key}: {json.dumps(row)}", flush=True)
    for shape in cases:  # after the rest: an illegal memory access here ends the process
        key = ", ".join(map(str, shape))
        report["no_grad"][key] = check_no_grad(shape)
        print(f"{key} no grad: {json.dumps(report['no_grad'][key])}", flush=True)
    if args.model:
        report["model"] = model_check()
        print("model:", json.dumps(report["model"], indent=1, default=str), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernel_accuracy.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
