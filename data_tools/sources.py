"""Turn the user's FILE_OR_GLOB... arguments into an ordered list of input shards.

A shard is one file; its format comes from its name: the container (`.jsonl`/`.json`, `.txt`,
`.parquet`) and an optional compression suffix (`.zst`, `.gz`). The Pile ships `.jsonl.zst`,
C4 ships `.json.gz` (one JSON object a line), Hugging Face's Wikipedia dump ships `.parquet`.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from data_tools.errors import InputNotFoundError


class Container(str, Enum):
    JSONL = "jsonl"
    TXT = "txt"
    PARQUET = "parquet"


class Compression(str, Enum):
    NONE = "none"
    ZSTD = "zst"
    GZIP = "gz"


_CONTAINER_SUFFIXES = {".jsonl": Container.JSONL, ".json": Container.JSONL, ".txt": Container.TXT}
_COMPRESSION_SUFFIXES = {".zst": Compression.ZSTD, ".zstd": Compression.ZSTD, ".gz": Compression.GZIP}


@dataclass(frozen=True)
class Shard:
    path: Path
    container: Container
    compression: Compression

    @property
    def name(self) -> str:
        return self.path.name


def shard_for_path(path: Path) -> Shard | None:
    """The shard for `path`, or None when its name is not a format we read."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] == ".parquet":
        return Shard(path, Container.PARQUET, Compression.NONE)
    compression = Compression.NONE
    if suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        compression = _COMPRESSION_SUFFIXES[suffixes.pop()]
    if suffixes and suffixes[-1] in _CONTAINER_SUFFIXES:
        return Shard(path, _CONTAINER_SUFFIXES[suffixes[-1]], compression)
    return None


def _files_in_directory(directory: Path) -> list[Path]:
    return sorted(Path(root) / name for root, _, names in os.walk(directory) for name in names)


def _paths_for_argument(argument: str) -> list[Path]:
    path = Path(argument)
    if path.is_dir():
        return _files_in_directory(path)
    if path.is_file():
        return [path]
    if glob.has_magic(argument):
        matches = sorted(Path(match) for match in glob.glob(argument, recursive=True))
        return [match for match in matches if match.is_file()]
    raise InputNotFoundError(f"input not found: {argument} (no such file or directory)")


def expand_inputs(arguments: Iterable[str]) -> list[Shard]:
    """Shards for files, directories (recursively) and globs, in argument order, each sorted.

    An explicitly named file of an unknown format is an error; files of unknown format inside a
    directory or a glob are skipped (shard folders often hold checksums and READMEs).
    """
    shards: list[Shard] = []
    seen: set[Path] = set()
    for argument in arguments:
        paths = _paths_for_argument(argument)
        explicit = Path(argument).is_file()
        found = 0
        for path in paths:
            shard = shard_for_path(path)
            if shard is None:
                if explicit:
                    raise InputNotFoundError(
                        f"unsupported input format: {path} (expected .jsonl[.zst|.gz], .json[.zst|.gz], "
                        ".txt[.zst|.gz] or .parquet)"
                    )
                continue
            found += 1
            resolved = path.resolve()
            if resolved not in seen:
                seen.add(resolved)
                shards.append(shard)
        if found == 0:
            raise InputNotFoundError(f"no readable input files match: {argument}")
    return shards
