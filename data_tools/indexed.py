"""Megatron-core's IndexedDataset format (`PREFIX.bin` + `PREFIX.idx`): write, merge, read.

Layout of the `.idx` file (little endian), as megatron-core 0.16's `_IndexWriter` writes it:
  b"MMIDIDX\\x00\\x00", u64 version = 1, u8 dtype code (1 uint8, 4 int32, 8 uint16, ...),
  u64 sequence count S, u64 document count D (= S + 1 here: one sequence per document),
  i32[S] sequence lengths, i64[S] byte offsets into `.bin`, i64[D] document indices (0..S).
The `.bin` file is the tokens of all sequences back to back in that dtype.

Our writer streams tokens to `.bin` and keeps only the per-document lengths in memory, so it needs
no torch. Merging streams the parts' indices, so it runs in memory bounded by one part.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.uint16: 8}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
HEADER_BYTES = len(INDEX_HEADER) + 8 + 1 + 8 + 8


def token_dtype(vocab_size: int) -> type[np.unsignedinteger] | type[np.signedinteger]:
    """The smallest dtype megatron can read that holds every id below `vocab_size`."""
    if vocab_size <= 1 << 8:
        return np.uint8
    if vocab_size <= 1 << 16:
        return np.uint16
    return np.int32


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def _write_header(stream: BinaryIO, dtype: type, sequence_count: int) -> None:
    stream.write(INDEX_HEADER)
    stream.write(struct.pack("<Q", INDEX_VERSION))
    stream.write(struct.pack("<B", DTYPE_CODES[dtype]))
    stream.write(struct.pack("<Q", sequence_count))
    stream.write(struct.pack("<Q", sequence_count + 1))


class IndexedWriter:
    """Append documents (one sequence each) to `bin_file`; `finish` writes `idx_file`.

    The caller chooses the file names (temporary ones, renamed once complete).
    """

    def __init__(self, bin_file: Path, idx_file: Path, dtype: type) -> None:
        self.dtype = dtype
        self.idx_file = idx_file
        self._bin = open(bin_file, "wb")  # noqa: SIM115 - closed by finish() or abort()
        self._lengths: list[np.ndarray] = []

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """`tokens`: the documents' tokens concatenated; `lengths`: tokens per document."""
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int32))

    def finish(self) -> None:
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        with open(self.idx_file, "wb") as stream:
            write_index(stream, self.dtype, lengths)

    def abort(self) -> None:
        self._bin.close()


def _pointers(lengths: np.ndarray, itemsize: int, start: int = 0) -> np.ndarray:
    pointers = np.empty(len(lengths), dtype=np.int64)
    if len(lengths):
        pointers[0] = 0
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= itemsize
    return pointers + start


def write_index(stream: BinaryIO, dtype: type, lengths: np.ndarray) -> None:
    """A whole `.idx` for documents of `lengths` tokens (one sequence each) into the open `stream`."""
    _write_header(stream, dtype, len(lengths))
    stream.write(lengths.astype(np.int32).tobytes())
    stream.write(_pointers(lengths, np.dtype(dtype).itemsize).tobytes())
    _write_document_indices(stream, len(lengths))


def _write_document_indices(stream: BinaryIO, sequence_count: int, block: int = 1 << 24) -> None:
    # One sequence per document: the document indices are 0..S, written in blocks to bound memory.
    for start in range(0, sequence_count + 1, block):
        stream.write(np.arange(start, min(start + block, sequence_count + 1), dtype=np.int64).tobytes())


class IndexInfo:
    """The parsed `.idx` of one dataset, memory-mapped."""

    def __init__(self, idx_file: Path) -> None:
        self.path = idx_file
        with open(idx_file, "rb") as stream:
            header = stream.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or header[: len(INDEX_HEADER)] != INDEX_HEADER:
            raise ValueError(f"{idx_file}: not a Megatron IndexedDataset index (bad header)")
        (version,) = struct.unpack_from("<Q", header, len(INDEX_HEADER))
        code, sequences, documents = struct.unpack_from("<BQQ", header, len(INDEX_HEADER) + 8)
        if version != INDEX_VERSION or code not in CODE_DTYPES:
            raise ValueError(f"{idx_file}: unsupported index version {version} or dtype code {code}")
        self.dtype = CODE_DTYPES[code]
        self.sequence_count = sequences
        mapped = np.memmap(idx_file, dtype=np.uint8, mode="r")
        offset = HEADER_BYTES
        self.lengths = np.frombuffer(mapped, np.int32, sequences, offset)
        offset += 4 * sequences
        self.pointers = np.frombuffer(mapped, np.int64, sequences, offset)
        offset += 8 * sequences
        self.document_indices = np.frombuffer(mapped, np.int64, documents, offset)

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (a document may span several sequences in general)."""
        bounds = self.document_indices
        cumulative = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        return cumulative[bounds[1:]] - cumulative[bounds[:-1]]


class IndexedTokens:
    """Read-only token access to one dataset by document; `.bin` and `.idx` stay memory-mapped.

    With one sequence per document (what hgrn2-preprocess and Megatron's preprocess_data write)
    the per-document arrays are the index's own, so opening a dataset of hundreds of millions of
    documents copies nothing into memory, however many training processes open it."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = str(prefix)
        self.index = IndexInfo(idx_path(prefix))
        self.tokens = np.memmap(bin_path(prefix), dtype=self.index.dtype, mode="r")
        self.itemsize = np.dtype(self.index.dtype).itemsize
        if _one_sequence_per_document(self.index):
            self.doc_pointers, self.doc_lengths = self.index.pointers, self.index.lengths
        else:
            self.doc_pointers = self.index.pointers[self.index.document_indices[:-1]]
            self.doc_lengths = self.index.document_lengths()

    def __len__(self) -> int:
        return len(self.doc_lengths)

    def document(self, doc: int, offset: int = 0, count: int | None = None) -> np.ndarray:
        start = int(self.doc_pointers[doc]) // self.itemsize + offset
        length = int(self.doc_lengths[doc]) - offset
        return self.tokens[start : start + (length if count is None else min(count, length))]


def _one_sequence_per_document(index: IndexInfo, block: int = 1 << 22) -> bool:
    bounds = index.document_indices
    if len(bounds) != index.sequence_count + 1:
        return False
    for start in range(0, len(bounds), block):  # in blocks, to keep memory flat
        if not np.array_equal(bounds[start : start + block], np.arange(start, min(start + block, len(bounds)))):
            return False
    return True


def merge_parts(part_prefixes: Sequence[Path], out_bin: Path, out_idx: Path, dtype: type) -> None:
    """Concatenate datasets (all in `dtype`) into `out_bin`/`out_idx`, one part in memory at a time."""
    infos = [IndexInfo(idx_path(prefix)) for prefix in part_prefixes]
    for info in infos:
        if info.dtype is not dtype:
            raise ValueError(f"{info.path}: dtype {info.dtype.__name__}, expected {dtype.__name__}")
    with open(out_bin, "wb") as stream:
        for prefix in part_prefixes:
            with open(bin_path(prefix), "rb") as part:
                shutil.copyfileobj(part, stream, 16 << 20)
    total = sum(info.sequence_count for info in infos)
    itemsize = np.dtype(dtype).itemsize
    with open(out_idx, "wb") as stream:
        _write_header(stream, dtype, total)
        for info in infos:
            stream.write(info.lengths.tobytes())
        start = 0
        for info in infos:
            stream.write(_pointers(info.lengths, itemsize, start).tobytes())
            start += int(info.lengths.sum(dtype=np.int64)) * itemsize
        _write_document_indices(stream, total)
