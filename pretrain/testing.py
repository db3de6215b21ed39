"""Helpers for the trainer's tests: a small synthetic mix in Megatron's format, and a tiny config.

The synthetic corpus is learnable (documents walk a fixed random successor table with some noise), so
a few steps lower the loss, and it is written with ``data_tools``' own writer and mix builder, exactly
as real data would be.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SYNTH_VOCAB = 96
SYNTH_EOD = 2


def write_synthetic_mix(directory: Path, seq_length: int = 32, documents: int = 120, target_tokens: int = 60_000,
                        seed: int = 0) -> Path:
    """Tokenize nothing: write ``documents`` synthetic documents as one dataset and build a mix of them."""
    from data_tools.indexed import IndexedWriter, bin_path, idx_path, token_dtype
    from data_tools.mix import build_mix

    rng = np.random.default_rng(seed)
    successor = rng.integers(3, SYNTH_VOCAB, size=SYNTH_VOCAB)
    docs = []
    for _ in range(documents):
        length = int(rng.integers(20, 120))
        tokens = [int(rng.integers(3, SYNTH_VOCAB))]
        for _ in range(length - 1):
            noisy = rng.random() < 0.2
            tokens.append(int(rng.integers(3, SYNTH_VOCAB)) if noisy else int(successor[tokens[-1]]))
        docs.append(np.array([*tokens, SYNTH_EOD]))
    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / "synthetic"
    dtype = token_dtype(SYNTH_VOCAB)
    writer = IndexedWriter(bin_path(prefix), idx_path(prefix), dtype)
    writer.add_documents(np.concatenate(docs), np.array([len(d) for d in docs]))
    writer.finish()
    spec = {
        "output_dir": str(directory / "mix"),
        "seq_length": seq_length,
        "target_tokens": target_tokens,
        "seed": seed,
        "valid_fraction": 0.1,
        "vocab_size": SYNTH_VOCAB,
        "eod_id": SYNTH_EOD,
        "sources": [{"name": "synthetic", "path": str(prefix), "weight": 1.0}],
    }
    return build_mix(spec, quiet=True)


def tiny_config(mix_dir: Path, output_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config tree for a 2-layer d-64 model on the synthetic mix; ``sections`` update its sections."""
    tree: dict[str, Any] = {
        "model": {"preset": "tiny", "hidden_size": 64, "num_layers": 2, "expand_ratio": 16,
                  "max_position_embeddings": 64},
        "data": {"mix_dir": str(mix_dir)},
        "optimizer": {"lr": 3e-3},
        "schedule": {"name": "cosine", "warmup_steps": 2},
        "batch": {"micro_batch_size": 4, "global_batch_size": 8, "seq_length": 32},
        "run": {"steps": 8, "seed": 7, "output_dir": str(output_dir), "device": "cpu", "torch_threads": 1},
        "checkpoint": {"every": 4, "keep": 3},
        "logging": {"every": 1, "tensorboard": False},
        "eval": {"every": 0, "batches": 2, "at_end": False},
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return tree
