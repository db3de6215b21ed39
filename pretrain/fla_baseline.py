"""Throughput baseline: fla's ``HGRN2ForCausalLM`` trained the way ``hgrn2-pretrain`` trains ours.

    python -m pretrain.fla_baseline --config configs/150m.yaml data.mix_dir=... [--steps 60]

Same training config (model size, vocabulary from the mix, micro-batch, sequence length, AdamW fused
with the same groups and hyperparameters, bf16 autocast, grad clipping) and the same batches in the
same order; one micro-batch per step. Prints the median tokens/s after ``--warmup`` steps (fla compiles
and autotunes its kernels during the first ones), the MFU by the trainer's formula and peak memory.
Needs CUDA and fla (``pip install flash-linear-attention``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from hgrn2.convert import hf_config
from pretrain.config import load_config
from pretrain.data import BatchSource, open_mix
from pretrain.engine import autocast_context, parameter_groups, token_loss_sum
from pretrain.metrics import flops_per_token, peak_flops


def build_fla_model(model_config) -> torch.nn.Module:
    from fla.models import HGRN2Config, HGRN2ForCausalLM

    values = hf_config(model_config, torch.float32)
    for key in ("architectures", "model_type", "torch_dtype"):
        values.pop(key)
    return HGRN2ForCausalLM(HGRN2Config(**values))


def tokens_of(cfg) -> int:
    """Tokens in one step (one micro-batch)."""
    return cfg.batch.micro_batch_size * cfg.batch.seq_length


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.fla_baseline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop early after this long and report the steps timed so far")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not torch.cuda.is_available():
        print("fla_baseline needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    data = open_mix(cfg)
    model_config = cfg.model_config(vocab_size=data.vocab_size)
    torch.manual_seed(cfg.run.seed)
    model = build_fla_model(model_config).to(device)
    opt = cfg.optimizer
    optimizer = torch.optim.AdamW(parameter_groups(model.named_parameters(), opt.weight_decay), lr=opt.lr,
                                  betas=tuple(opt.betas), eps=opt.eps, fused=True)
    source = BatchSource(cfg, data.train, 0, 1)
    times, losses = [], []
    run_started = time.perf_counter()
    for step in range(args.steps):
        if args.max_seconds and time.perf_counter() - run_started > args.max_seconds:
            print(f"stopping at step {step}: --max-seconds {args.max_seconds:g} reached", flush=True)
            break
        batch = source.global_batch(step * cfg.batch.micro_batch_size)[0].to(device)
        torch.cuda.synchronize()
        started = time.perf_counter()
        with autocast_context(cfg.run.precision, device):
            logits = model(input_ids=batch.input_ids).logits
        loss = token_loss_sum(logits, batch.labels) / batch.labels.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronises
        times.append(time.perf_counter() - started)
        if (step + 1) % 10 == 0:
            print(f"step {step + 1}: loss {losses[-1]:.4f}, {tokens_of(cfg) / times[-1] / 1e3:.1f}k tok/s, "
                  f"{time.perf_counter() - run_started:.0f} s elapsed", flush=True)
    if len(times) <= args.warmup:
        print(f"only {len(times)} steps ran, none after the {args.warmup} warm-up steps", file=sys.stderr)
        return 1
    tokens_per_s = tokens_of(cfg) / float(np.median(times[args.warmup :]))
    per_token, formula = flops_per_token(model_config)
    peak, peak_note = peak_flops(device, cfg.logging.peak_tflops)
    result = {"model": "fla HGRN2ForCausalLM", "params": sum(p.numel() for p in model.parameters()),
              "tokens_per_s": tokens_per_s, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
              "mfu": None if peak is None else per_token * tokens_per_s / peak, "first_loss": losses[0],
              "last_loss": losses[-1], "steps": len(times), "warmup": args.warmup, "formula": formula,
              "peak": peak_note, "device": torch.cuda.get_device_name()}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
