"""`hgrn2-preprocess`: documents → OUT.bin/OUT.idx (megatron-core IndexedDataset), EOD after each.

Pipeline: this process reads the shards (decompression, line splitting) and hands batches of raw
records to `--workers` processes, which parse, validate and tokenize them; results come back in
input order and are appended to a part per input shard. Each finished shard is committed under
OUT.parts/ (see data_tools.shard_parts), so an interrupted run resumes by skipping finished
shards. When every shard is done, the parts are merged into OUT.bin/OUT.idx under temporary names
that are renamed into place, with the run's statistics in OUT.meta.json: the final files appear
only complete. Malformed records are counted per reason (data_tools.records); `--strict` stops at
the first one, or at the first damaged file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.errors import CorruptShardError, DataToolsError, MalformedRecordError
from data_tools.indexed import IndexedWriter, bin_path, idx_path, merge_parts, token_dtype
from data_tools.progress import Progress
from data_tools.reader_args import add_reader_arguments, reader_options_from_args
from data_tools.readers import ReaderOptions, read_raw_batches
from data_tools.records import FILTERED, PROBLEM_REASONS
from data_tools.shard_parts import PartStats, PartStore, file_sha256
from data_tools.sources import Shard, expand_inputs
from data_tools.tokenize_worker import (
    BatchResult,
    BatchTask,
    ShardEnd,
    WorkerSettings,
    handle,
    initialize,
    initialize_pool_worker,
)
from data_tools.tokenizer import load_tokenizer
from data_tools.units import format_count

META_FORMAT = "hgrn2-preprocess/1"
TASKS_IN_FLIGHT_PER_WORKER = 4


@dataclass(frozen=True)
class PreprocessConfig:
    inputs: tuple[str, ...]
    tokenizer: str
    output_prefix: Path
    workers: int = 1
    strict: bool = False
    keep_parts: bool = False
    progress: bool = True
    options: ReaderOptions = field(default_factory=ReaderOptions)


@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    problems: Counter[str] = field(default_factory=Counter)
    filtered_subset: int = 0
    corrupt_files: dict[str, str] = field(default_factory=dict)
    shards_total: int = 0
    shards_resumed: int = 0
    seconds: float = 0.0
    tokens_this_run: int = 0

    def add(self, stats: PartStats) -> None:
        self.documents += stats.documents
        self.tokens += stats.tokens
        self.problems.update(stats.problems)
        self.filtered_subset += stats.filtered_subset
        if stats.corrupt:
            self.corrupt_files[stats.input] = stats.corrupt


def meta_path(prefix: Path) -> Path:
    return Path(f"{prefix}.meta.json")


# --- producing tasks (runs in the pool's feeder thread)


class Backpressure:
    """Bounds how far reading runs ahead of the consumer (Pool.imap would read everything).

    `stop` unblocks the reader for good, so a failing run can shut its pool down."""

    def __init__(self, slots: int) -> None:
        self._slots = threading.Semaphore(slots)
        self._stopped = threading.Event()

    def acquire(self) -> bool:
        while not self._slots.acquire(timeout=0.1):
            if self._stopped.is_set():
                return False
        return not self._stopped.is_set()

    def release(self) -> None:
        self._slots.release()

    def stop(self) -> None:
        self._stopped.set()


def _tasks(shards: Sequence[tuple[int, Shard]], options: ReaderOptions, slots: Backpressure,
           ) -> Iterator[BatchTask | ShardEnd]:
    for position, shard in shards:
        corrupt = None
        try:
            for batch in read_raw_batches(shard, options):
                if not slots.acquire():
                    return
                yield BatchTask(position, shard, batch)
        except CorruptShardError as error:
            corrupt = str(error)
        except OSError as error:
            corrupt = f"{shard.path}: unreadable: {error}"
        if not slots.acquire():
            return
        yield ShardEnd(position, corrupt)


@contextmanager
def _mapper(config: PreprocessConfig, settings: WorkerSettings) -> Iterator[Callable]:
    if config.workers == 1:
        initialize(settings)
        yield map
        return
    context = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    pool = context.Pool(config.workers, initializer=initialize_pool_worker, initargs=(settings,))
    try:
        yield lambda function, tasks: pool.imap(function, tasks, chunksize=1)
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# --- consuming results: one part per shard


class PartBuilder:
    """Collects the results of one shard into its temporary part files."""

    def __init__(self, store: PartStore, key: str, shard: Shard, dtype: type) -> None:
        self.key = key
        self.stats = PartStats(input=str(shard.path))
        self.bytes_reported = 0
        temp_bin, temp_idx = store.temp_paths(key)
        self.writer = IndexedWriter(temp_bin, temp_idx, dtype)

    def add(self, result: BatchResult) -> None:
        self.writer.add_documents(result.tokens, result.lengths)
        self.stats.documents += len(result.lengths)
        self.stats.tokens += len(result.tokens)
        for reason, count in result.problems.items():
            self.stats.problems[reason] = self.stats.problems.get(reason, 0) + count
        self.stats.filtered_subset += result.filtered
        self.stats.first_problem = self.stats.first_problem or result.first_problem


class Run:
    def __init__(self, config: PreprocessConfig) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer)
        self.tokenizer_sha256 = file_sha256(self.tokenizer.model_path)
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        self.shards = expand_inputs(config.inputs)
        self.store = PartStore(config.output_prefix, self.tokenizer_sha256, config.options)
        self.keys = [self.store.key(shard) for shard in self.shards]
        self.summary = Summary(shards_total=len(self.shards))

    def run_key(self) -> str:
        return hashlib.sha256("\0".join(self.keys).encode()).hexdigest()

    def is_up_to_date(self) -> bool:
        prefix = self.config.output_prefix
        if not (bin_path(prefix).is_file() and idx_path(prefix).is_file() and meta_path(prefix).is_file()):
            return False
        meta = json.loads(meta_path(prefix).read_text(encoding="utf-8"))
        return meta.get("run_key") == self.run_key()

    def execute(self) -> Summary:
        self.store.prepare()
        pending = [(i, shard) for i, shard in enumerate(self.shards) if not self.store.is_done(self.keys[i])]
        self.summary.shards_resumed = len(self.shards) - len(pending)
        progress = Progress(sum(shard.path.stat().st_size for _, shard in pending), self.config.progress)
        try:
            self._tokenize(pending, progress)
        finally:
            progress.close()
        self.summary.seconds = progress.elapsed()
        self.summary.tokens_this_run = progress.tokens
        for key in self.keys:
            self.summary.add(self.store.load_stats(key))
        self._merge()
        return self.summary

    def _tokenize(self, pending: list[tuple[int, Shard]], progress: Progress) -> None:
        settings = WorkerSettings(str(self.tokenizer.model_path), self.config.options,
                                  self.tokenizer.eos_id, self.dtype)
        slots = Backpressure(TASKS_IN_FLIGHT_PER_WORKER * self.config.workers)
        builders: dict[int, PartBuilder] = {}
        with _mapper(self.config, settings) as mapper:
            try:
                for result in mapper(handle, _tasks(pending, self.config.options, slots)):
                    slots.release()
                    self._consume(result, builders, progress)
            finally:
                slots.stop()
                for builder in builders.values():
                    builder.writer.abort()

    def _consume(self, result: BatchResult | ShardEnd, builders: dict[int, PartBuilder], progress: Progress) -> None:
        position = result.shard_position
        shard = self.shards[position]
        if position not in builders:
            builders[position] = PartBuilder(self.store, self.keys[position], shard, self.dtype)
        builder = builders[position]
        if isinstance(result, BatchResult):
            if self.config.strict and result.first_problem:
                raise MalformedRecordError(f"malformed record (--strict): {result.first_problem}")
            builder.add(result)
            progress.advance(result.bytes_done - builder.bytes_reported, len(result.lengths), len(result.tokens))
            builder.bytes_reported = result.bytes_done
            return
        if result.corrupt and self.config.strict:
            raise CorruptShardError(f"damaged input (--strict): {result.corrupt}")
        builder.stats.corrupt = result.corrupt
        builder.writer.finish()
        self.store.commit(builder.key, builder.stats)
        progress.advance(shard.path.stat().st_size - builder.bytes_reported, 0, 0)
        del builders[position]

    def _merge(self) -> None:
        prefix = self.config.output_prefix
        temp_bin, temp_idx = Path(f"{prefix}.bin.tmp"), Path(f"{prefix}.idx.tmp")
        merge_parts([self.store.prefix(key) for key in self.keys], temp_bin, temp_idx, self.dtype)
        temp_meta = Path(f"{meta_path(prefix)}.tmp")
        temp_meta.write_text(json.dumps(self._meta(), indent=1) + "\n", encoding="utf-8")
        # .idx last among the dataset files: megatron needs both, and the .idx is what names a dataset.
        os.replace(temp_bin, bin_path(prefix))
        os.replace(temp_idx, idx_path(prefix))
        os.replace(temp_meta, meta_path(prefix))
        if not self.config.keep_parts:
            self.store.remove()

    def _meta(self) -> dict[str, Any]:
        summary = self.summary
        return {
            "format": META_FORMAT,
            "run_key": self.run_key(),
            "tokenizer": {
                "path": str(self.tokenizer.model_path.resolve()),
                "sha256": self.tokenizer_sha256,
                "vocab_size": self.tokenizer.vocab_size,
                "bos_id": self.tokenizer.bos_id,
                "eos_id": self.tokenizer.eos_id,
            },
            "eod_id": self.tokenizer.eos_id,
            "vocab_size": self.tokenizer.vocab_size,
            "dtype": np.dtype(self.dtype).name,
            "documents": summary.documents,
            "tokens": summary.tokens,
            "problems": {reason: summary.problems.get(reason, 0) for reason in PROBLEM_REASONS},
            FILTERED: summary.filtered_subset,
            "corrupt_files": summary.corrupt_files,
            "reader_options": asdict(self.config.options),
            "inputs": [str(shard.path) for shard in self.shards],
        }


def format_summary(summary: Summary, prefix: Path) -> str:
    rate = summary.tokens_this_run / summary.seconds if summary.seconds else 0.0
    lines = [
        f"wrote {prefix}.bin / {prefix}.idx: {summary.documents} documents, {summary.tokens} tokens "
        f"(EOD included) from {summary.shards_total} input file(s)"
        + (f", {summary.shards_resumed} reused from an earlier run" if summary.shards_resumed else ""),
        f"this run: {format_count(summary.tokens_this_run)} tokens in {summary.seconds:.1f} s "
        f"({format_count(rate)} tokens/s)",
    ]
    skipped = {reason: count for reason, count in summary.problems.items() if count}
    if skipped:
        details = ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items()))
        lines.append(f"skipped malformed records: {sum(skipped.values())} ({details})")
    if summary.filtered_subset:
        lines.append(f"records dropped by the subset filter: {summary.filtered_subset}")
    for path, error in summary.corrupt_files.items():
        lines.append(f"WARNING: damaged input file, read up to the damage only: {path}: {error}")
    return "\n".join(lines)


def preprocess(config: PreprocessConfig) -> Summary | None:
    """Run preprocessing; None when the output is already complete and up to date."""
    if config.workers < 1:
        raise DataToolsError(f"--workers must be >= 1, got {config.workers}")
    run = Run(config)
    if run.is_up_to_date():
        return None
    return run.execute()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hgrn2-preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB",
                        help="input files, directories (recursive) or globs; the format comes from the name")
    parser.add_argument("--tokenizer", required=True, metavar="PREFIX.model", help="from hgrn2-train-tokenizer")
    parser.add_argument("--output-prefix", required=True, type=Path, metavar="OUT",
                        help="writes OUT.bin, OUT.idx, OUT.meta.json")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizer processes (default: all cores)")
    parser.add_argument("--strict", action="store_true", help="stop at the first malformed record or damaged file")
    parser.add_argument("--keep-parts", action="store_true", help="keep OUT.parts/ after the merge")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--batch-records", type=int, default=256, help="records per task sent to a worker")
    add_reader_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    options = reader_options_from_args(args, args.batch_records)
    return PreprocessConfig(
        inputs=tuple(args.input),
        tokenizer=args.tokenizer,
        output_prefix=args.output_prefix,
        workers=args.workers,
        strict=args.strict,
        keep_parts=args.keep_parts,
        progress=not args.no_progress,
        options=options,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        summary = preprocess(config)
    except (MalformedRecordError, CorruptShardError) as error:
        print(f"hgrn2-preprocess: stopped: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hgrn2-preprocess: interrupted; finished input files are kept in {args.output_prefix}.parts/, "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    except (DataToolsError, ValueError) as error:
        print(f"hgrn2-preprocess: error: {error}", file=sys.stderr)
        return 2
    if summary is None:
        print(f"{args.output_prefix}.bin / .idx are complete and up to date; nothing to do")
    else:
        print(format_summary(summary, args.output_prefix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
