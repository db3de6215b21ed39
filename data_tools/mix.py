"""`hgrn2-build-mix SPEC.yaml`: tokenized datasets → the blended, shuffled sample index for training.

Built once, before training, into the spec's `output_dir` (mix.json + .npy arrays); training
nodes only read it (`load_mix`). The build is cached: mix.json records a key hashing the spec's
content (not its output_dir) and every dataset's identity (sha256 of its .idx, the size of its
.bin, its tokenizer's hash). A rerun with the same key does nothing; any change (a dataset
rebuilt at the same path included) rebuilds. Same spec and seed → byte-identical files.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.blended import MIX_META, SPLITS, BlendedSamples, source_file, split_file
from data_tools.errors import DataToolsError, SpecError
from data_tools.indexed import IndexInfo, bin_path, idx_path
from data_tools.mix_index import (
    TRAIN_SPLIT,
    VALID_SPLIT,
    SourceSamples,
    blend_counts,
    interleave,
    source_rng,
    source_samples,
    split_documents,
)
from data_tools.mix_spec import MixSpec, SourceSpec, load_spec
from data_tools.shard_parts import file_sha256
from data_tools.units import format_count

__all__ = ["BlendedSamples", "build_mix", "load_mix", "main"]

MIX_FORMAT = "hgrn2-mix/2"  # bump when the index construction changes: it is part of the cache key


def load_mix(output_dir: str | Path, split: str) -> BlendedSamples:
    """The built mix's samples for `split` ("train" or "valid")."""
    return BlendedSamples(output_dir, split)


@dataclass
class Dataset:
    prefix: str
    lengths: np.ndarray  # tokens per document, EOD included
    identity: dict[str, Any]
    meta: dict[str, Any]


@dataclass
class Source:
    spec: SourceSpec
    datasets: list[Dataset]
    lengths: np.ndarray  # all datasets' documents, in order

    def describe(self) -> dict[str, Any]:
        return {"name": self.spec.name, "weight": self.spec.weight,
                "datasets": [dataset.identity for dataset in self.datasets]}


def _dataset_prefixes(source: SourceSpec, position: int) -> list[str]:
    pattern = source.path.removesuffix(".idx").removesuffix(".bin")  # accept a file name for its prefix
    if Path(pattern).is_dir():
        pattern = os.path.join(pattern, "*")
    if idx_path(pattern).is_file():
        return [pattern]
    matches = sorted(match.removesuffix(".idx") for match in glob.glob(f"{pattern}.idx"))
    if not matches and glob.has_magic(pattern):
        matches = sorted(match.removesuffix(".idx") for match in glob.glob(pattern) if match.endswith(".idx"))
    if not matches:
        raise SpecError(f"sources[{position}] ({source.name}): no tokenized dataset at {source.path} "
                        f"(looked for {source.path}.idx; run hgrn2-preprocess first)")
    return matches


def _open_dataset(prefix: str) -> Dataset:
    if not bin_path(prefix).is_file():
        raise DataToolsError(f"{bin_path(prefix)}: missing (the .idx is there)")
    info = IndexInfo(idx_path(prefix))
    meta_file = Path(f"{prefix}.meta.json")
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    identity = {
        "prefix": str(Path(prefix).resolve()),
        "idx_sha256": file_sha256(idx_path(prefix)),
        "idx_bytes": idx_path(prefix).stat().st_size,
        "bin_bytes": bin_path(prefix).stat().st_size,
        "tokenizer_sha256": meta.get("tokenizer", {}).get("sha256"),
        "documents": len(info.document_indices) - 1,
        "tokens": int(info.lengths.sum(dtype=np.int64)),
    }
    return Dataset(prefix, info.document_lengths().astype(np.int64), identity, meta)


def _open_sources(spec: MixSpec) -> list[Source]:
    sources = []
    for position, source_spec in enumerate(spec.sources):
        datasets = [_open_dataset(prefix) for prefix in _dataset_prefixes(source_spec, position)]
        lengths = np.concatenate([dataset.lengths for dataset in datasets])
        if len(lengths) == 0:
            raise SpecError(f"sources[{position}] ({source_spec.name}): its datasets hold no documents")
        sources.append(Source(source_spec, datasets, lengths))
    return sources


def _agreed_value(spec: MixSpec, sources: list[Source], key: str) -> int:
    """vocab_size / eod_id: from the datasets' metadata, which must agree with each other and the spec."""
    found = {(d.prefix, d.meta[key]) for s in sources for d in s.datasets if key in d.meta}
    values = {value for _, value in found}
    explicit = getattr(spec, key)
    if explicit is not None:
        values.add(explicit)
    if len(values) > 1:
        raise SpecError(f"datasets disagree on {key} (tokenized with different tokenizers?): {sorted(found)}"
                        + (f"; spec says {explicit}" if explicit is not None else ""))
    if not values:
        raise SpecError(f"{key} unknown: no dataset has a .meta.json (from hgrn2-preprocess); set {key} in the spec")
    return values.pop()


def _check_one_tokenizer(sources: list[Source]) -> None:
    hashes = {(d.prefix, d.identity["tokenizer_sha256"]) for s in sources for d in s.datasets}
    if len({sha for _, sha in hashes if sha is not None}) > 1:
        raise SpecError(f"datasets were tokenized with different tokenizers: {sorted(hashes)}")


def cache_key(spec: MixSpec, sources: list[Source]) -> str:
    identity = {"format": MIX_FORMAT, "spec": spec.identity(), "sources": [s.describe() for s in sources]}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass
class SplitReport:
    samples: int
    shares: dict[str, float]
    epochs: dict[str, float]


def _build_split(spec: MixSpec, sources: list[Source], pools: list[np.ndarray], split: int, total: int,
                 directory: Path) -> SplitReport:
    name = SPLITS[split]
    counts = blend_counts(np.array([s.spec.weight for s in sources]), total)
    dataset_index, ranks = interleave(counts)
    sample_index = np.empty_like(ranks)
    epochs = {}
    for position, (source, pool, count) in enumerate(zip(sources, pools, counts, strict=True)):
        if count == 0:
            samples = SourceSamples(*(np.zeros(0, np.int64) for _ in range(4)), epochs=0.0)
        else:
            samples = source_samples(pool, source.lengths, int(count), spec.seq_length,
                                     source_rng(spec.seed, position, split))
        mine = dataset_index == position
        sample_index[mine] = samples.shuffle[ranks[mine]]
        for array in ("doc_order", "sample_doc", "sample_offset"):
            np.save(source_file(directory, name, position, array), getattr(samples, array))
        epochs[source.spec.name] = samples.epochs
    np.save(split_file(directory, name, "dataset_index"), dataset_index)
    np.save(split_file(directory, name, "dataset_sample_index"), sample_index)
    shares = {s.spec.name: int(c) / total for s, c in zip(sources, counts, strict=True)}
    return SplitReport(total, shares, epochs)


def _pools(spec: MixSpec, sources: list[Source]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    train, valid = [], []
    for position, source in enumerate(sources):
        try:
            train_docs, valid_docs = split_documents(len(source.lengths), spec.valid_fraction, spec.seed, position)
        except ValueError as error:
            raise SpecError(f"sources[{position}] ({source.spec.name}): {error}") from None
        train.append(train_docs)
        valid.append(valid_docs)
    return train, valid


def _single_pass_samples(spec: MixSpec, sources: list[Source], pools: list[np.ndarray]) -> int:
    """The most samples a split can have, at the spec's weights, reading no document twice.

    Validation uses it: repeating the few held-out documents of a small source would only spend
    evaluation time on text the estimate has already seen."""
    weights = np.array([source.spec.weight for source in sources])
    weights = weights / weights.sum()
    limits = []
    for source, pool, weight in zip(sources, pools, weights, strict=True):
        windows = (int(source.lengths[pool].sum()) - 1) // spec.seq_length  # whole samples in one pass
        limits.append(int((windows - 1) / weight))  # blend_counts may round a source's count up by one
    return max(1, min(limits))


def _write_empty_split(directory: Path, name: str, source_count: int) -> SplitReport:
    """A split without samples (valid_fraction 0), so load_mix(dir, name) still opens."""
    np.save(split_file(directory, name, "dataset_index"), np.zeros(0, np.int16))
    np.save(split_file(directory, name, "dataset_sample_index"), np.zeros(0, np.int64))
    for position in range(source_count):
        for array in ("doc_order", "sample_doc", "sample_offset"):
            np.save(source_file(directory, name, position, array), np.zeros(0, np.int64))
    return SplitReport(0, {}, {})


def _write_mix(spec: MixSpec, sources: list[Source], key: str, directory: Path) -> dict[str, Any]:
    _check_one_tokenizer(sources)
    vocab_size, eod_id = _agreed_value(spec, sources, "vocab_size"), _agreed_value(spec, sources, "eod_id")
    train_pools, valid_pools = _pools(spec, sources)
    train_samples = -(-spec.target_tokens // spec.seq_length)
    requested = -(-round(spec.target_tokens * spec.valid_fraction) // spec.seq_length)
    valid_samples = min(requested, _single_pass_samples(spec, sources, valid_pools)) if requested else 0
    reports = {"train": _build_split(spec, sources, train_pools, TRAIN_SPLIT, train_samples, directory)}
    if valid_samples:
        reports["valid"] = _build_split(spec, sources, valid_pools, VALID_SPLIT, valid_samples, directory)
    else:
        reports["valid"] = _write_empty_split(directory, "valid", len(sources))
    meta = {
        "format": MIX_FORMAT,
        "cache_key": key,
        "spec": spec.identity(),
        "seq_length": spec.seq_length,
        "vocab_size": vocab_size,
        "eod_id": eod_id,
        "sources": [
            {**source.describe(), "documents": len(source.lengths), "tokens": int(source.lengths.sum()),
             "train_documents": len(train_pools[i]), "valid_documents": len(valid_pools[i])}
            for i, source in enumerate(sources)
        ],
        "splits": {name: report.__dict__ for name, report in reports.items()},
    }
    (directory / MIX_META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def _is_cached(directory: Path, key: str) -> bool:
    meta_file = directory / MIX_META
    if not meta_file.is_file():
        return False
    return json.loads(meta_file.read_text(encoding="utf-8")).get("cache_key") == key


def _replace_directory(built: Path, target: Path) -> None:
    """Swap the finished build into place, so readers never see a half-written mix."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(built, target)
    shutil.rmtree(old, ignore_errors=True)


def build_mix(spec_path_or_dict: str | Path | dict[str, Any] | MixSpec, quiet: bool = False) -> Path:
    """Build (or reuse, when up to date) the mix described by the spec; returns its output_dir."""
    spec = load_spec(spec_path_or_dict)
    sources = _open_sources(spec)
    key = cache_key(spec, sources)
    target = spec.output_dir
    if _is_cached(target, key):
        if not quiet:
            print(f"{target}: up to date (cache key {key[:16]}), nothing to build")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    building = target.with_name(f".{target.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    try:
        meta = _write_mix(spec, sources, key, building)
        _replace_directory(building, target)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    if not quiet:
        print(format_report(meta, target))
    return target


def format_report(meta: dict[str, Any], directory: Path) -> str:
    lines = [f"built {directory}: seq_length {meta['seq_length']}, vocab {meta['vocab_size']}, "
             f"eod {meta['eod_id']}, cache key {meta['cache_key'][:16]}"]
    total_weight = sum(source["weight"] for source in meta["sources"])
    for split, report in meta["splits"].items():
        tokens = report["samples"] * meta["seq_length"]
        lines.append(f"{split}: {report['samples']} samples, {format_count(tokens)} tokens")
        for source in meta["sources"]:
            name = source["name"]
            if name in report["shares"]:
                lines.append(f"  {name:<16} weight {source['weight'] / total_weight:7.2%}  "
                             f"realised {report['shares'][name]:7.2%}  epochs {report['epochs'][name]:8.3f}  "
                             f"(of its {source[f'{split}_documents']} {split} documents; source: "
                             f"{format_count(source['tokens'])} tokens in {source['documents']} documents)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hgrn2-build-mix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", metavar="SPEC.yaml")
    args = parser.parse_args(argv)
    try:
        build_mix(args.spec)
    except (DataToolsError, ValueError) as error:
        print(f"hgrn2-build-mix: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
