"""A worker for the parallel tests (``tests/test_parallel_*.py``), run under torchrun:

    torchrun --nproc-per-node 4 -m pretrain.parallel.testing --out DIR --tensor 2 --zero 1 --steps 20

It trains the tiny test model on deterministic random tokens with a ``ParallelEngine`` and writes, from
rank 0, ``DIR/result.json`` (per-step losses, grad norms) and ``DIR/grads.safetensors`` (the full
gradients of the first step). ``reference`` computes the same on one process with ``LocalEngine``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

VOCAB = 131  # odd: exercises the vocabulary padding under TP


def tiny_config(
    steps: int = 20, zero: int = 0, tensor: int = 1, pipeline: int = 1, overrides=(), sequence_parallel: bool = False,
    **model,
):
    from pretrain.config import config_from_dict

    tree = {
        "model": {
            "preset": "tiny", "vocab_size": VOCAB, "hidden_size": 64, "num_layers": 4, "expand_ratio": 16,
            "backend": "chunk_torch", **model,
        },
        "data": {"mix_dir": "unused"},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.1, "grad_clip": 1.0},
        "schedule": {"name": "cosine", "warmup_steps": 3},
        "batch": {"micro_batch_size": 2, "global_batch_size": 8, "seq_length": 32},
        "run": {"steps": steps, "seed": 1234, "device": "cpu", "precision": "fp32"},
        "parallel": {
            "tensor": tensor, "pipeline": pipeline, "zero_stage": zero, "sequence_parallel": sequence_parallel
        },
    }
    overrides = list(overrides) + [o for o in os.environ.get("HGRN2_TEST_OVERRIDES", "").split() if o]
    return config_from_dict(tree, overrides)


def global_batch(step: int, cfg) -> torch.Tensor:
    """[G, T + 1] tokens: counting sequences with random starts and strides (learnable), some noise;
    every third step some positions are unlabelled (-1), unevenly over the samples."""
    g, t = cfg.batch.global_batch_size, cfg.batch.seq_length + 1
    generator = torch.Generator().manual_seed(10_000 + step)
    start = torch.randint(0, VOCAB, (g, 1), generator=generator)
    stride = torch.randint(1, 4, (g, 1), generator=generator)
    tokens = (start + stride * torch.arange(t)) % VOCAB
    noise = torch.rand(g, t, generator=generator) < 0.1
    tokens = torch.where(noise, torch.randint(0, VOCAB, (g, t), generator=generator), tokens)
    if step % 3 == 1:
        for row in range(0, g, 3):
            tokens[row, 1 : 2 + 4 * row] = -1
    return tokens


def micro_batches(step: int, cfg, dp_rank: int, dp_size: int):
    """This DP rank's contiguous slice of the global batch, cut into micro-batches (as ``pretrain.train``)."""
    from pretrain.engine import Batch

    tokens = global_batch(step, cfg)
    per_rank = tokens.shape[0] // dp_size
    mine = tokens[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    out = []
    for start in range(0, per_rank, cfg.batch.micro_batch_size):
        chunk = mine[start : start + cfg.batch.micro_batch_size]
        labels = chunk[:, 1:].clone()
        inputs = chunk[:, :-1].clamp(min=0)
        labels[labels < 0] = -100
        out.append(Batch(inputs, labels))
    return out


def perturb(model) -> None:
    """Non-trivial Γ and norm weights (init leaves them uniform), the same on every rank."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name == "lower_bounds" or name.endswith("norm.weight"):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)


def reference(cfg, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single-process losses of ``steps`` steps, and the full gradients of the first step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: one thread is ~10x faster than two on a busy 2-core machine
    try:
        return _reference(cfg, steps)
    finally:
        torch.set_num_threads(threads)


def _reference(cfg, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    from pretrain.engine import LocalEngine, token_loss_sum

    torch.manual_seed(cfg.run.seed)
    single = tiny_config(cfg.run.steps)
    single.model = cfg.model
    engine = LocalEngine(single, single.model_config())
    perturb(engine.model)
    batches = micro_batches(0, cfg, 0, 1)
    tokens = sum(b.token_count() for b in batches)
    for batch in batches:
        (token_loss_sum(engine.model(batch.input_ids), batch.labels) / tokens).backward()
    grads = {n: p.grad.clone() for n, p in engine.model.named_parameters()}
    engine.model.zero_grad(set_to_none=True)
    losses = [engine.train_step(micro_batches(step, cfg, 0, 1)).loss for step in range(steps)]
    return losses, grads


def compare_zero_norms(engine) -> dict | None:
    """``pretrain.parallel.zero_norms`` against DeepSpeed's own loops on the gradients about to be stepped on:
    the norm of every parameter group, and the overflow check on clean gradients and with a NaN planted in
    this rank's first gradient (None where the multi-tensor versions are not installed)."""
    optimizer = engine.engine.optimizer
    if "get_grad_norm_direct" not in vars(optimizer):
        return None
    deepspeed_class = type(optimizer)
    norms = []
    for group, gradients in optimizer.averaged_gradients.items():
        params = optimizer.params_in_partition[group]
        norms.append([float(optimizer.get_grad_norm_direct(gradients, params)),
                      float(deepspeed_class.get_grad_norm_direct(optimizer, gradients, params))])
    overflow = [bool(optimizer.has_overflow_partitioned_grads_serial()),
                bool(deepspeed_class.has_overflow_partitioned_grads_serial(optimizer))]
    planted = next(g for grads in optimizer.averaged_gradients.values() for g in grads if g is not None and g.numel())
    kept = planted.view(-1)[0].clone()
    planted.view(-1)[0] = float("nan")
    overflow += [bool(optimizer.has_overflow_partitioned_grads_serial()),
                 bool(deepspeed_class.has_overflow_partitioned_grads_serial(optimizer))]
    planted.view(-1)[0] = kept
    return {"norms": norms, "overflow": overflow}


def log(message: str) -> None:
    if os.environ.get("RANK") == "0":
        print(f"[worker] {message}", file=sys.stderr, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--pipeline", type=int, default=1)
    parser.add_argument("--zero", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--first-step", type=int, default=0, help="first step (with --resume)")
    parser.add_argument("--resume", default=None, help="checkpoint directory to load first")
    parser.add_argument("--save-at", type=int, default=None, help="save after this many steps into OUT/ckpt")
    parser.add_argument("--tie", action="store_true")
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--partition", default=None, help="HGRN2_PIPELINE_PARTITION for this run (e.g. 1,3)")
    parser.add_argument("--override", action="append", default=[], help="config key=value (repeatable)")
    args = parser.parse_args(argv)
    if args.partition:
        os.environ["HGRN2_PIPELINE_PARTITION"] = args.partition

    from pretrain.parallel.distributed import finish_worker
    from pretrain.parallel.engine import ParallelEngine

    torch.set_num_threads(1)
    cfg = tiny_config(
        args.steps, args.zero, args.tensor, args.pipeline, args.override, sequence_parallel=args.sequence_parallel,
        tie_word_embeddings=args.tie,
    )
    torch.manual_seed(cfg.run.seed)
    started = time.time()
    engine = ParallelEngine(cfg, cfg.model_config())
    log(f"engine built {time.time() - started:.1f}s")
    out = Path(args.out)
    result = {"losses": [], "grad_norms": [], "skipped": [], "world": int(os.environ["WORLD_SIZE"])}
    if engine.pp_size > 1:
        result["stage_blocks"] = engine.stage_blocks
    if args.resume:
        engine.load(Path(args.resume))
        engine.iteration = args.first_step
    else:
        # perturb the same way as the reference: on full weights, then reshard via save/load round trip
        from hgrn2.model import HGRN2LM

        torch.manual_seed(cfg.run.seed)
        full = HGRN2LM(cfg.model_config())
        perturb(full)
        engine._build(full)
        captured = {}

        def hook(eng):
            if not captured:
                captured["grads"] = eng.full_gradients()
                captured["zero_norms"] = compare_zero_norms(eng)
                captured["done"] = True

        engine.grad_hook = hook
    log(f"ready {time.time() - started:.1f}s")
    for step in range(args.first_step, args.steps):
        stats = engine.train_step(micro_batches(step, cfg, engine.dp_rank, engine.dp_size))
        engine.grad_hook = None
        result["losses"].append(stats.loss)
        result["grad_norms"].append(stats.grad_norm)
        result["skipped"].append(stats.skipped)
        if args.save_at is not None and step + 1 == args.save_at:
            engine.save(out / "ckpt")
    log(f"trained {time.time() - started:.1f}s")
    if not args.resume and captured.get("zero_norms") is not None:
        result["zero_norms"] = captured["zero_norms"]
    eval_sum, eval_tokens = engine.eval_loss(micro_batches(99, cfg, engine.dp_rank, engine.dp_size)[0])
    result["eval"] = engine.reduce_sum([eval_sum, eval_tokens])
    result["seconds"] = time.time() - started
    if engine.is_main:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        if not args.resume and captured.get("grads") is not None:
            save_file(captured["grads"], str(out / "grads.safetensors"))
        (out / "result.json").write_text(json.dumps(result))
    finish_worker(0)


if __name__ == "__main__":
    sys.exit(main())
