"""The work `hgrn2-preprocess` spreads over processes: parse a raw batch, tokenize, append EOD.

Tasks flow in input order through `Pool.imap` (which keeps that order), so the output is the
same for any number of workers. Besides batches there are two markers per shard: the end of the
shard, and (for a damaged file) the error that stopped its reading.
"""

from __future__ import annotations

import signal
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import sentencepiece as spm

from data_tools.readers import RawBatch, ReaderOptions
from data_tools.records import parse_batch
from data_tools.sources import Shard


@dataclass
class BatchTask:
    shard_position: int
    shard: Shard
    batch: RawBatch


@dataclass
class ShardEnd:
    shard_position: int
    corrupt: str | None = None  # set when reading stopped at a truncated or damaged file


@dataclass
class BatchResult:
    shard_position: int
    tokens: np.ndarray  # all documents' tokens, each followed by EOD
    lengths: np.ndarray  # tokens per document, EOD included
    bytes_done: int
    problems: Counter[str] = field(default_factory=Counter)
    filtered: int = 0
    first_problem: str | None = None


@dataclass(frozen=True)
class WorkerSettings:
    model_path: str
    options: ReaderOptions
    eod_id: int
    dtype: type


_processor: spm.SentencePieceProcessor | None = None
_settings: WorkerSettings | None = None


def initialize(settings: WorkerSettings) -> None:
    """Pool initializer: load the tokenizer once per process."""
    global _processor, _settings
    _processor = spm.SentencePieceProcessor(model_file=settings.model_path)
    _settings = settings


def initialize_pool_worker(settings: WorkerSettings) -> None:
    """Pool initializer: Ctrl-C is the main process's to handle (it stops the pool cleanly)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    initialize(settings)


def _tokenize(texts: list[str], settings: WorkerSettings) -> tuple[np.ndarray, np.ndarray]:
    assert _processor is not None
    # One thread per worker process: parallelism comes from processes (--workers).
    encoded = _processor.encode(texts, num_threads=1)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int32, count=len(encoded))
    tokens = np.empty(int(lengths.sum(dtype=np.int64)), dtype=settings.dtype)
    position = 0
    for ids in encoded:
        tokens[position : position + len(ids)] = ids
        position += len(ids)
        tokens[position] = settings.eod_id
        position += 1
    return tokens, lengths


def handle(task: BatchTask | ShardEnd) -> BatchResult | ShardEnd:
    if isinstance(task, ShardEnd):
        return task
    assert _settings is not None, "initialize() must run first"
    parsed = parse_batch(task.batch, task.shard, _settings.options)
    tokens, lengths = _tokenize(parsed.texts, _settings)
    return BatchResult(
        shard_position=task.shard_position,
        tokens=tokens,
        lengths=lengths,
        bytes_done=task.batch.bytes_done,
        problems=parsed.problems,
        filtered=parsed.filtered,
        first_problem=parsed.first_problem,
    )
