"""Helpers for tests and benchmarks: small corpora cut from the shipped samples, in each format."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from data_tools.readers import ReaderOptions
from data_tools.records import iter_documents
from data_tools.sources import shard_for_path
from data_tools.tokenizer import SampleGroup, TrainerSettings, train_tokenizer

SAMPLES = Path(__file__).resolve().parent / "samples"
PILE_SAMPLE = SAMPLES / "pile_sample.jsonl.zst"
C4_SAMPLE = SAMPLES / "c4_sample.json.gz"
WIKI_SAMPLE = SAMPLES / "wikipedia_sample.parquet"


def sample_texts(path: Path, limit: int | None = None, max_chars: int | None = None) -> list[str]:
    """Documents of a shipped sample, optionally the first `limit`, each cut to `max_chars`."""
    shard = shard_for_path(path)
    assert shard is not None, path
    texts = islice(iter_documents(shard, ReaderOptions()), limit)
    return [text[:max_chars] if max_chars else text for text in texts]


def write_lines(path: Path, lines: Sequence[bytes]) -> Path:
    """Raw lines (bytes, no newline) into `path`, compressed by its suffix (.zst, .gz or none)."""
    payload = b"".join(line + b"\n" for line in lines)
    if path.suffix == ".zst":
        payload = zstandard.ZstdCompressor(level=3).compress(payload)
    elif path.suffix == ".gz":
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path


def json_line(record: object) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


def write_pile(path: Path, texts: Sequence[str], subsets: Sequence[str] | None = None) -> Path:
    names = subsets or ["Pile-CC"] * len(texts)
    records = [{"text": t, "meta": {"pile_set_name": s}} for t, s in zip(texts, names, strict=True)]
    return write_lines(path, [json_line(record) for record in records])


def write_c4(path: Path, texts: Sequence[str]) -> Path:
    records = [{"text": t, "url": f"https://example.org/{i}", "timestamp": "2019-04-25T12:57:54Z"}
               for i, t in enumerate(texts)]
    return write_lines(path, [json_line(record) for record in records])


def write_wikipedia(path: Path, texts: Sequence[str], row_group_size: int = 16) -> Path:
    ids = [str(i) for i in range(len(texts))]
    table = pa.table({"id": ids, "url": [f"https://en.wikipedia.org/wiki?curid={i}" for i in ids],
                      "title": [f"Article {i}" for i in ids], "text": list(texts)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def chunks(items: Sequence[str], parts: int) -> Iterator[Sequence[str]]:
    size = -(-len(items) // parts)
    for start in range(0, len(items), size):
        yield items[start : start + size]


def train_small_tokenizer(directory: Path, vocab_size: int = 1000, sample_chars: int = 400_000) -> Path:
    """A quick tokenizer over all three samples (about a second); returns PREFIX.model."""
    group = SampleGroup("samples", (str(PILE_SAMPLE), str(C4_SAMPLE), str(WIKI_SAMPLE)), sample_chars)
    return train_tokenizer([group], directory / "tok", TrainerSettings(vocab_size=vocab_size, threads=2),
                           ReaderOptions(), seed=0)
