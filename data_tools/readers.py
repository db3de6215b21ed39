"""Stream raw records out of input shards in batches, with memory bounded by the batch size.

Reading is split in two so that `hgrn2-preprocess` can spread the costly half over workers:
  * `read_raw_batches` (one process per shard): decompression, line splitting, Parquet column
    decoding. Records stay raw bytes where they can, so nothing is parsed twice.
  * `data_tools.records.parse_batch` (in workers): UTF-8 and JSON decoding, field checks.
`data_tools.records.iter_documents` chains both for single-process users.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from data_tools.errors import CorruptShardError
from data_tools.sources import Compression, Container, Shard

READ_CHUNK_BYTES = 1 << 20
TXT_SAMPLE_MODES = ("line", "paragraph", "document")


@dataclass(frozen=True)
class ReaderOptions:
    """How records become documents. Shared by every shard of a run."""

    text_field: str = "text"  # JSON key / Parquet column holding the document text
    keep_subsets: tuple[str, ...] = ()  # Pile: keep only these meta.pile_set_name values
    drop_subsets: tuple[str, ...] = ()  # Pile: drop these meta.pile_set_name values
    txt_sample_by: str = "line"  # .txt: one document per line, paragraph or whole file
    batch_records: int = 256

    def __post_init__(self) -> None:
        if self.txt_sample_by not in TXT_SAMPLE_MODES:
            raise ValueError(f"txt_sample_by must be one of {TXT_SAMPLE_MODES}, got {self.txt_sample_by!r}")
        if self.keep_subsets and self.drop_subsets:
            raise ValueError("give either keep_subsets or drop_subsets, not both")
        if self.batch_records < 1:
            raise ValueError(f"batch_records must be >= 1, got {self.batch_records}")


@dataclass
class RawBatch:
    """Consecutive records of one shard; record i is line/row `first_record + i` (1-based)."""

    records: list[Any]
    first_record: int
    bytes_done: int  # bytes of the (compressed) file consumed so far, for progress and ETA


class _MissingColumn:
    """Stands for a row of a Parquet file that lacks the text column."""


MISSING_COLUMN = _MissingColumn()


def _zstd_decoder() -> zstandard.ZstdDecompressionObj:
    # Files written with `zstd --long` use windows beyond the library's default limit (128 MiB).
    return zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()


def _zstd_chunks(raw: BinaryIO, shard: Shard) -> Iterator[bytes]:
    # zstandard's stream_reader ends silently on a truncated frame, so drive the decoder by hand
    # and check that the last frame was complete.
    decoder = _zstd_decoder()
    pending_frame = False
    while chunk := raw.read(READ_CHUNK_BYTES):
        while chunk:
            try:
                output = decoder.decompress(chunk)
            except zstandard.ZstdError as error:
                raise CorruptShardError(f"{shard.path}: corrupt zstd data: {error}") from error
            pending_frame = not decoder.eof
            if output:
                yield output
            chunk = decoder.unused_data if decoder.eof else b""
            if decoder.eof:
                decoder = _zstd_decoder()
                pending_frame = bool(chunk)
    if pending_frame:
        raise CorruptShardError(f"{shard.path}: truncated zstd file (the last frame is incomplete)")


def _gzip_chunks(raw: BinaryIO, shard: Shard) -> Iterator[bytes]:
    stream = gzip.GzipFile(fileobj=raw, mode="rb")
    try:
        while chunk := stream.read(READ_CHUNK_BYTES):
            yield chunk
    except EOFError as error:
        raise CorruptShardError(f"{shard.path}: truncated gzip file ({error})") from error
    except (gzip.BadGzipFile, zlib.error) as error:
        raise CorruptShardError(f"{shard.path}: corrupt gzip data: {error}") from error


def _plain_chunks(raw: BinaryIO, shard: Shard) -> Iterator[bytes]:
    while chunk := raw.read(READ_CHUNK_BYTES):
        yield chunk


_CHUNKERS = {Compression.ZSTD: _zstd_chunks, Compression.GZIP: _gzip_chunks, Compression.NONE: _plain_chunks}


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines without their newline; a final line without a newline is still a line."""
    remainder = b""
    for chunk in chunks:
        pieces = (remainder + chunk).split(b"\n")
        remainder = pieces.pop()
        yield from pieces
    if remainder:
        yield remainder


def _paragraphs(lines: Iterator[bytes]) -> Iterator[bytes]:
    paragraph: list[bytes] = []
    for line in lines:
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield b"\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield b"\n".join(paragraph)


def _text_records(shard: Shard, raw: BinaryIO, options: ReaderOptions) -> Iterator[bytes]:
    chunks = _CHUNKERS[shard.compression](raw, shard)
    if shard.container is Container.TXT and options.txt_sample_by == "document":
        yield b"".join(chunks)
        return
    lines = _lines(chunks)
    if shard.container is Container.TXT and options.txt_sample_by == "paragraph":
        yield from _paragraphs(lines)
        return
    yield from lines


def _batched_stream(shard: Shard, options: ReaderOptions) -> Iterator[RawBatch]:
    with open(shard.path, "rb") as raw:
        records: list[Any] = []
        first = 1
        for record in _text_records(shard, raw, options):
            records.append(record)
            if len(records) == options.batch_records:
                yield RawBatch(records, first, raw.tell())
                first += len(records)
                records = []
        if records:
            yield RawBatch(records, first, raw.tell())


def _open_parquet(shard: Shard) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(shard.path)
    except (pa.ArrowInvalid, OSError) as error:
        raise CorruptShardError(f"{shard.path}: not a readable Parquet file: {error}") from error


def _batched_parquet(shard: Shard, options: ReaderOptions) -> Iterator[RawBatch]:
    parquet = _open_parquet(shard)
    total_rows = max(parquet.metadata.num_rows, 1)
    file_bytes = shard.path.stat().st_size
    first = 1
    if options.text_field not in parquet.schema_arrow.names:
        rows = parquet.metadata.num_rows
        for start in range(0, rows, options.batch_records):
            count = min(options.batch_records, rows - start)
            yield RawBatch([MISSING_COLUMN] * count, start + 1, file_bytes * (start + count) // total_rows)
        return
    try:
        for batch in parquet.iter_batches(batch_size=options.batch_records, columns=[options.text_field]):
            records = batch.column(0).to_pylist()
            done = first - 1 + len(records)
            yield RawBatch(records, first, file_bytes * done // total_rows)
            first += len(records)
    except (pa.ArrowInvalid, OSError) as error:
        raise CorruptShardError(f"{shard.path}: corrupt Parquet data near row {first}: {error}") from error


def read_raw_batches(shard: Shard, options: ReaderOptions) -> Iterator[RawBatch]:
    """Raw records of `shard` in order; raises CorruptShardError (naming the file) on damage."""
    if shard.container is Container.PARQUET:
        return _batched_parquet(shard, options)
    return _batched_stream(shard, options)

