"""Batches from a built data mix, addressed by consumed samples (so any data-parallel size resumes it).

Global batch g of a run holds samples ``[consumed, consumed + global_batch_size)`` of the mix's
deterministic train order, where ``consumed = g * global_batch_size``. Data-parallel rank r of R takes
the contiguous slice ``r * per_rank ... (r + 1) * per_rank`` of it (``per_rank = global / R``) and cuts
it into micro-batches. Resuming at ``consumed_samples`` with another R continues the same sequence.

A dataset is anything with ``len()``, ``ds[idx] -> int64 array [seq_length + 1]``, ``seq_length``,
``vocab_size`` and ``eod_id`` (``data_tools.mix.load_mix``'s ``BlendedSamples``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pretrain.config import ConfigError, TrainConfig
from pretrain.engine import Batch


class SampleDataset(Protocol):
    seq_length: int
    vocab_size: int
    eod_id: int

    def __len__(self) -> int: ...

    def __getitem__(self, idx: int) -> np.ndarray: ...


@dataclass
class MixData:
    train: SampleDataset
    valid: SampleDataset
    directory: Path | None = None

    @property
    def vocab_size(self) -> int:
        return self.train.vocab_size


def open_mix(cfg: TrainConfig, build: bool = True) -> MixData:
    """The mix of ``data.mix_dir``, or of ``data.spec`` (built first, or reused when up to date)."""
    from data_tools.errors import DataToolsError
    from data_tools.mix import build_mix, load_mix

    try:
        if cfg.data.spec is not None:
            if not Path(cfg.data.spec).is_file():
                raise ConfigError(f"data.spec: mix spec not found: {cfg.data.spec}")
            directory = build_mix(cfg.data.spec, quiet=True) if build else None
        else:
            directory = Path(cfg.data.mix_dir)
            if not (directory / "mix.json").is_file():
                raise ConfigError(f"data.mix_dir: {directory} is not a built mix (no mix.json; run hgrn2-build-mix)")
        return MixData(load_mix(directory, "train"), load_mix(directory, "valid"), directory)
    except DataToolsError as error:
        raise ConfigError(f"data: {error}") from None


def check_data(cfg: TrainConfig, data: MixData, dp_size: int) -> None:
    """Fail before training if the mix cannot feed the whole run as configured."""
    b = cfg.batch
    if data.train.seq_length != b.seq_length:
        raise ConfigError(f"batch.seq_length is {b.seq_length} but the mix's samples hold {data.train.seq_length} "
                          f"tokens (set batch.seq_length={data.train.seq_length} or rebuild the mix)")
    if b.global_batch_size % (b.micro_batch_size * dp_size):
        raise ConfigError(f"batch.global_batch_size ({b.global_batch_size}) must be a multiple of "
                          f"micro_batch_size × data-parallel size ({b.micro_batch_size} × {dp_size})")
    needed = cfg.run.steps * b.global_batch_size
    if needed > len(data.train):
        raise ConfigError(f"run.steps × batch.global_batch_size = {needed} samples, but the mix's train split "
                          f"has {len(data.train)}; raise the spec's target_tokens or lower run.steps")
    evaluates = cfg.eval.every > 0 or cfg.eval.at_end or cfg.eval.at_start
    if evaluates and len(data.valid) < b.micro_batch_size * dp_size:
        raise ConfigError(f"evaluation needs the mix's valid split, which has {len(data.valid)} samples; set "
                          f"valid_fraction in the mix spec, or eval.every=0 eval.at_end=false")


def make_batch(samples: np.ndarray, eod_id: int | None) -> Batch:
    """Samples [B, T + 1] → inputs/labels [B, T]; with ``eod_id``, packed into one row with state resets.

    Packed: ``cu_seqlens`` holds every row start and every position after an EOD input token, so a
    document never sees its predecessor's state (the label at an EOD, the next document's first token,
    is still trained on, as Megatron does by default).
    """
    tokens = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.int64))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    if eod_id is None:
        return Batch(inputs.contiguous(), labels.contiguous())
    rows, length = inputs.shape
    flat = inputs.reshape(1, -1)
    starts = torch.arange(0, rows * length + 1, length)
    after_eod = torch.nonzero(flat[0] == eod_id).flatten() + 1
    bounds = torch.unique(torch.cat([starts, after_eod]))  # sorted; ends at rows * length
    return Batch(flat.contiguous(), labels.reshape(1, -1).contiguous(), bounds.to(torch.int32))


class BatchSource:
    """This rank's micro-batches of any global batch, from the train or valid split."""

    def __init__(self, cfg: TrainConfig, dataset: SampleDataset, dp_rank: int, dp_size: int) -> None:
        self.dataset = dataset
        self.micro = cfg.batch.micro_batch_size
        self.global_size = cfg.batch.global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.eod_id = dataset.eod_id if cfg.data.reset_at_eod else None

    def _micro_batches(self, first: int, count: int) -> list[Batch]:
        samples = np.stack([self.dataset[first + k] for k in range(count * self.micro)])
        return [make_batch(samples[m * self.micro : (m + 1) * self.micro], self.eod_id) for m in range(count)]

    def global_batch(self, consumed_samples: int) -> list[Batch]:
        """The micro-batches of this rank for the global batch starting at ``consumed_samples``."""
        per_rank = self.global_size // self.dp_size
        return self._micro_batches(consumed_samples + self.dp_rank * per_rank, per_rank // self.micro)

    def eval_batches(self, count: int) -> list[Batch]:
        """Up to ``count`` micro-batches of this rank from the start of the split (the same every time)."""
        per_round = self.micro * self.dp_size
        rounds = min(count, len(self.dataset) // per_round)
        return [self._micro_batches(r * per_round + self.dp_rank * self.micro, 1)[0] for r in range(rounds)]
