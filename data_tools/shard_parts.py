"""Per-shard partial outputs of `hgrn2-preprocess`, the unit of resumption.

Layout, for `--output-prefix OUT`:
    OUT.parts/<key>.bin, <key>.idx   tokens of one finished input shard (Megatron format)
    OUT.parts/<key>.json             its statistics; written last, so its presence marks the part done
    OUT.parts/<key>.*.tmp            a part being written; removed when a run starts
The key hashes what the part depends on: the input file's resolved path, size and modification
time, the tokenizer model's bytes, the reader options and this format's version. A rerun skips
shards whose part is done; a changed input file or tokenizer gets a new key and is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_tools.readers import ReaderOptions
from data_tools.sources import Shard

PART_FORMAT = "hgrn2-preprocess-part/1"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class PartStats:
    input: str
    documents: int = 0
    tokens: int = 0
    problems: dict[str, int] = field(default_factory=dict)
    filtered_subset: int = 0
    corrupt: str | None = None  # the error, when the file is truncated or damaged
    first_problem: str | None = None


class PartStore:
    def __init__(self, output_prefix: Path, tokenizer_sha256: str, options: ReaderOptions) -> None:
        self.directory = Path(f"{output_prefix}.parts")
        self._salt = json.dumps(
            {"format": PART_FORMAT, "tokenizer": tokenizer_sha256, "options": asdict(options)}, sort_keys=True
        )

    def key(self, shard: Shard) -> str:
        stat = shard.path.stat()
        identity = f"{self._salt}\0{shard.path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
        return hashlib.sha256(identity.encode()).hexdigest()[:24]

    def prefix(self, key: str) -> Path:
        return self.directory / key

    def temp_paths(self, key: str) -> tuple[Path, Path]:
        return self.directory / f"{key}.bin.tmp", self.directory / f"{key}.idx.tmp"

    def marker(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def prepare(self) -> None:
        """Create the folder and drop what an interrupted run left half-written."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob("*.tmp"):
            leftover.unlink()

    def is_done(self, key: str) -> bool:
        prefix = self.prefix(key)
        return self.marker(key).is_file() and Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file()

    def load_stats(self, key: str) -> PartStats:
        return PartStats(**json.loads(self.marker(key).read_text(encoding="utf-8")))

    def commit(self, key: str, stats: PartStats) -> None:
        """Move a finished part into place; the marker goes last (a rename, so it is atomic)."""
        temp_bin, temp_idx = self.temp_paths(key)
        prefix = self.prefix(key)
        os.replace(temp_bin, f"{prefix}.bin")
        os.replace(temp_idx, f"{prefix}.idx")
        temp_marker = self.directory / f"{key}.json.tmp"
        temp_marker.write_text(json.dumps(asdict(stats), indent=1) + "\n", encoding="utf-8")
        os.replace(temp_marker, self.marker(key))

    def remove(self) -> None:
        for path in self.directory.iterdir():
            path.unlink()
        self.directory.rmdir()

