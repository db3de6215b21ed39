"""`BlendedSamples`: what the trainer reads from a built mix (see data_tools.mix.build_mix).

Every array is memory-mapped, so opening a mix costs next to nothing on each training node, and
sample k is the same on every node and every run. Pickling carries only (directory, split), so a
DataLoader's worker processes reopen the files instead of copying them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.errors import DataToolsError, StaleDatasetError
from data_tools.indexed import IndexedTokens, bin_path, idx_path

MIX_META = "mix.json"
SPLITS = ("train", "valid")


def split_file(directory: Path, split: str, name: str) -> Path:
    return directory / f"{split}.{name}.npy"


def source_file(directory: Path, split: str, source: int, name: str) -> Path:
    return directory / f"{split}.source{source}.{name}.npy"


@dataclass
class _Source:
    datasets: list[IndexedTokens]
    first_document: np.ndarray  # global id of each dataset's first document, plus the total
    doc_order: np.ndarray
    sample_doc: np.ndarray
    sample_offset: np.ndarray

    def document(self, global_doc: int, offset: int, count: int) -> np.ndarray:
        dataset = int(np.searchsorted(self.first_document, global_doc, side="right")) - 1
        local = global_doc - int(self.first_document[dataset])
        return self.datasets[dataset].document(local, offset, count)


def _check_dataset(prefix: str, recorded: dict[str, Any]) -> None:
    for path, key in ((idx_path(prefix), "idx_bytes"), (bin_path(prefix), "bin_bytes")):
        if not path.is_file():
            raise StaleDatasetError(f"{path}: missing; the mix was built from it (rerun hgrn2-build-mix)")
        if path.stat().st_size != recorded[key]:
            raise StaleDatasetError(
                f"{path}: changed since the mix was built ({path.stat().st_size} bytes, recorded "
                f"{recorded[key]}); rerun hgrn2-build-mix"
            )


def _load(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")


class BlendedSamples:
    """Samples of `seq_length + 1` token ids (int64): inputs are `[:-1]`, labels `[1:]`."""

    def __init__(self, directory: str | Path, split: str) -> None:
        self.directory = Path(directory)
        self.split = split
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        meta_file = self.directory / MIX_META
        if not meta_file.is_file():
            raise DataToolsError(f"{self.directory}: no {MIX_META}; build the mix first (hgrn2-build-mix SPEC.yaml)")
        self.meta = json.loads(meta_file.read_text(encoding="utf-8"))
        self.seq_length: int = self.meta["seq_length"]
        self.vocab_size: int = self.meta["vocab_size"]
        self.eod_id: int = self.meta["eod_id"]
        self.source_names: list[str] = [source["name"] for source in self.meta["sources"]]
        self.dataset_index = _load(split_file(self.directory, split, "dataset_index"))
        self.dataset_sample_index = _load(split_file(self.directory, split, "dataset_sample_index"))
        self._sources = [self._open_source(i, source) for i, source in enumerate(self.meta["sources"])]

    def _open_source(self, position: int, source: dict[str, Any]) -> _Source:
        for dataset in source["datasets"]:
            _check_dataset(dataset["prefix"], dataset)
        counts = [dataset["documents"] for dataset in source["datasets"]]
        return _Source(
            datasets=[IndexedTokens(dataset["prefix"]) for dataset in source["datasets"]],
            first_document=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            doc_order=_load(source_file(self.directory, self.split, position, "doc_order")),
            sample_doc=_load(source_file(self.directory, self.split, position, "sample_doc")),
            sample_offset=_load(source_file(self.directory, self.split, position, "sample_offset")),
        )

    def __len__(self) -> int:
        return len(self.dataset_index)

    def source_of(self, idx: int) -> str:
        return self.source_names[int(self.dataset_index[idx])]

    def __getitem__(self, idx: int) -> np.ndarray:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples ({self.split})")
        source = self._sources[int(self.dataset_index[idx])]
        stream_sample = int(self.dataset_sample_index[idx])
        position = int(source.sample_doc[stream_sample])
        offset = int(source.sample_offset[stream_sample])
        sample = np.empty(self.seq_length + 1, dtype=np.int64)
        filled = 0
        while filled < len(sample):
            piece = source.document(int(source.doc_order[position]), offset, len(sample) - filled)
            sample[filled : filled + len(piece)] = piece
            filled += len(piece)
            position, offset = position + 1, 0
        return sample

    def document_boundaries(self, idx: int) -> np.ndarray:
        """Positions p in 1..seq_length where a new document starts (sample[p - 1] is EOD).

        For packed-sequence training: input position p begins a document, so state resets there.
        """
        sample = self[idx]
        return np.flatnonzero(sample[:-1] == self.eod_id) + 1

    def __getstate__(self) -> tuple[str, str]:
        return str(self.directory), self.split

    def __setstate__(self, state: tuple[str, str]) -> None:
        self.__init__(*state)
