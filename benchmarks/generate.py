"""Whole-model generation speed: our HGRN2LM (eager and CUDA-graph step) vs fla's HGRN2ForCausalLM.generate.

Same weights (random, exported with hgrn2.convert), bf16, greedy, prompt 128 tokens, 256 new tokens.
Prints a markdown table; run on a GPU: `python benchmarks/generate.py --preset 150m`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

# Running this file puts benchmarks/ first on sys.path, where benchmarks/kernels.py would shadow the package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from hgrn2 import HGRN2LM, preset, save_checkpoint  # noqa: E402
from hgrn2.convert import to_hf  # noqa: E402


def timed(fn, repeats: int = 3) -> float:
    fn()  # warm-up: compilation, autotuning, graph capture
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="150m")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = HGRN2LM(preset(args.preset))
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(model, f"{tmp}/ckpt")
        to_hf(f"{tmp}/ckpt", f"{tmp}/hf", verify=False)
        from fla.models import HGRN2ForCausalLM

        theirs = HGRN2ForCausalLM.from_pretrained(f"{tmp}/hf", dtype=torch.bfloat16).cuda().eval()
    ours = model.to(device="cuda", dtype=torch.bfloat16).eval()
    print("| preset | batch | ours eager tok/s | ours CUDA graph tok/s | fla generate tok/s | graph / fla |")
    print("| --- | --- | --- | --- | --- | --- |")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompt = torch.randint(3, model.config.vocab_size, (batch, args.prompt_len), device="cuda")
        eager, graph, fla = generation_rates(ours, theirs, prompt, args.new_tokens)
        print(f"| {args.preset} | {batch} | {eager:,.0f} | {graph:,.0f} | {fla:,.0f} | {graph / fla:.2f}× |")


def generation_rates(ours, theirs, prompt: torch.Tensor, new: int) -> list[float]:
    """Generated tokens per second: ours eager, ours with the CUDA-graph step, fla's generate."""
    seconds = [
        timed(lambda: ours.generate(prompt, new, temperature=0)),
        timed(lambda: ours.generate(prompt, new, temperature=0, use_cuda_graph=True)),
        timed(lambda: theirs.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)),
    ]
    return [prompt.shape[0] * new / t for t in seconds]


if __name__ == "__main__":
    main()
