"""The arithmetic of a blended sample index (numpy only, deterministic for a given seed).

A source is a pool of documents (their token counts, EOD included). For one split:
  1. `blend_counts`: samples per source, proportional to the weights (largest remainder).
  2. `interleave`: which source each blended sample comes from, spread so that every prefix of
     training sees each source within one sample of its share (not just the whole run).
  3. `SourceSamples`: per source, documents in a fresh seeded order every epoch, concatenated into
     one token stream; sample j is the seq_length + 1 tokens starting at j * seq_length (samples
     overlap by one token: the last input's label). As many epochs as the sample count needs, so
     small sources are upsampled. Samples are then drawn in a seeded shuffled order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TRAIN_SPLIT, VALID_SPLIT = 0, 1


def split_documents(document_count: int, valid_fraction: float, seed: int, source: int,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) document ids: a seeded `valid_fraction` of the documents is held out."""
    if valid_fraction == 0:
        return np.arange(document_count, dtype=np.int64), np.zeros(0, dtype=np.int64)
    valid_count = max(1, round(document_count * valid_fraction))
    if valid_count >= document_count:
        raise ValueError(f"{document_count} document(s): too few to hold out a validation share")
    order = np.random.default_rng([seed, source, 0]).permutation(document_count)
    return np.sort(order[valid_count:]), np.sort(order[:valid_count])


def blend_counts(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer samples per source summing to `total`, each within one of weight * total."""
    ideal = weights / weights.sum() * total
    counts = np.floor(ideal).astype(np.int64)
    shortfall = total - int(counts.sum())
    # The largest fractional parts get the remaining samples; ties go to the earlier source.
    order = np.lexsort((np.arange(len(weights)), -(ideal - counts)))
    counts[order[:shortfall]] += 1
    return counts


def interleave(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source of each blended sample, its rank within that source), evenly interleaved."""
    sources = np.repeat(np.arange(len(counts), dtype=np.int16), counts)
    ranks = np.concatenate([np.arange(count, dtype=np.int64) for count in counts])
    # Sample k of a source with n samples sits at time (k + 0.5) / n; sort all by time.
    times = (ranks + 0.5) / np.repeat(counts.astype(np.float64), counts)
    order = np.lexsort((sources, times))
    return sources[order], ranks[order]


@dataclass
class SourceSamples:
    doc_order: np.ndarray  # document ids, epoch after epoch (only as far as needed)
    sample_doc: np.ndarray  # per stream sample: position in doc_order where it starts
    sample_offset: np.ndarray  # per stream sample: token offset inside that document
    shuffle: np.ndarray  # blended rank k of this source reads stream sample shuffle[k]
    epochs: float  # tokens read / tokens in the pool


def source_samples(pool: np.ndarray, lengths: np.ndarray, sample_count: int, seq_length: int,
                   rng: np.random.Generator) -> SourceSamples:
    """Samples from the documents `pool` (ids into `lengths`)."""
    pool_tokens = int(lengths[pool].sum())
    needed = sample_count * seq_length + 1
    epochs = -(-needed // pool_tokens)
    doc_order = np.concatenate([rng.permutation(pool) for _ in range(epochs)])
    ends = np.cumsum(lengths[doc_order], dtype=np.int64)
    doc_order = doc_order[: int(np.searchsorted(ends, needed)) + 1]
    ends = ends[: len(doc_order)]
    starts = np.arange(sample_count, dtype=np.int64) * seq_length
    sample_doc = np.searchsorted(ends, starts, side="right")
    sample_offset = starts - (ends[sample_doc] - lengths[doc_order[sample_doc]])
    return SourceSamples(
        doc_order=doc_order.astype(np.int64),
        sample_doc=sample_doc.astype(np.int64),
        sample_offset=sample_offset.astype(np.int64),
        shuffle=rng.permutation(sample_count).astype(np.int64),
        epochs=sample_count * seq_length / pool_tokens,
    )


def source_rng(seed: int, source: int, split: int) -> np.random.Generator:
    return np.random.default_rng([seed, source, split, 1])
