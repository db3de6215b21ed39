"""Turn raw records into document texts, classifying every record that cannot be one.

Problem reasons (the keys of the per-reason counts that `hgrn2-preprocess` reports):
  broken_json      the line is not valid JSON, or not a JSON object
  invalid_utf8     the bytes are not UTF-8 (or the JSON text holds a lone surrogate escape)
  missing_text     the record has no text field (or the Parquet file no text column)
  non_string_text  the text field is not a string (a number, a list, null, ...)
  empty_document   the text is empty or only whitespace
Records dropped on purpose by the Pile subset filter are counted apart, as `filtered_subset`.
Blank lines in JSON lines files separate nothing and are skipped without being counted.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from data_tools.readers import MISSING_COLUMN, RawBatch, ReaderOptions, read_raw_batches
from data_tools.sources import Container, Shard

PROBLEM_REASONS = ("broken_json", "invalid_utf8", "missing_text", "non_string_text", "empty_document")
FILTERED = "filtered_subset"


class RecordProblem(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class ParsedBatch:
    texts: list[str]
    problems: Counter[str] = field(default_factory=Counter)
    filtered: int = 0
    first_problem: str | None = None  # "path:line N: reason: detail", for --strict and logs


def _decode_utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        bad = data[error.start : error.start + 1].hex()
        raise RecordProblem("invalid_utf8", f"invalid UTF-8 byte 0x{bad} at offset {error.start}") from None


def _check_text(value: Any, field_name: str) -> str:
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise RecordProblem("non_string_text", f"field {field_name!r} is {kind}, not a string")
    if not value.strip():
        raise RecordProblem("empty_document", f"field {field_name!r} is empty or whitespace")
    return value


def _subset_name(record: dict[str, Any]) -> str | None:
    meta = record.get("meta")
    return meta.get("pile_set_name") if isinstance(meta, dict) else None


def _keeps_subset(record: dict[str, Any], options: ReaderOptions) -> bool:
    if options.keep_subsets:
        return _subset_name(record) in options.keep_subsets
    if options.drop_subsets:
        return _subset_name(record) not in options.drop_subsets
    return True


def _json_text(line: bytes, options: ReaderOptions) -> str | None:
    """The record's text, None when the subset filter drops it; RecordProblem when malformed."""
    decoded = _decode_utf8(line)
    try:
        record = json.loads(decoded)
    except json.JSONDecodeError as error:
        raise RecordProblem("broken_json", f"broken JSON: {error}") from None
    if not isinstance(record, dict):
        raise RecordProblem("broken_json", f"expected a JSON object, got {type(record).__name__}")
    if not _keeps_subset(record, options):
        return None
    if options.text_field not in record:
        raise RecordProblem("missing_text", f"no field {options.text_field!r}")
    text = _check_text(record[options.text_field], options.text_field)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RecordProblem("invalid_utf8", "text holds a lone surrogate (\\ud800-\\udfff escape)") from None
    return text


def _parquet_text(value: Any, options: ReaderOptions) -> str:
    if value is MISSING_COLUMN:
        raise RecordProblem("missing_text", f"no column {options.text_field!r}")
    if isinstance(value, bytes):  # a binary column: the bytes are meant to be UTF-8 text
        value = _decode_utf8(value)
    return _check_text(value, options.text_field)


def _txt_text(data: bytes, options: ReaderOptions) -> str:
    return _check_text(_decode_utf8(data), "text")


def _record_text(record: Any, container: Container, options: ReaderOptions) -> str | None:
    if container is Container.JSONL:
        return _json_text(record, options)
    if container is Container.PARQUET:
        return _parquet_text(record, options)
    return _txt_text(record, options)


def _skippable(record: Any, container: Container) -> bool:
    # Blank lines are separators in line-based files, not records.
    return container is not Container.PARQUET and not record.strip()


def _record_unit(shard: Shard, options: ReaderOptions) -> str:
    if shard.container is Container.PARQUET:
        return "row"
    if shard.container is Container.TXT and options.txt_sample_by != "line":
        return options.txt_sample_by
    return "line"


def parse_batch(batch: RawBatch, shard: Shard, options: ReaderOptions) -> ParsedBatch:
    parsed = ParsedBatch(texts=[])
    for offset, record in enumerate(batch.records):
        if _skippable(record, shard.container):
            continue
        try:
            text = _record_text(record, shard.container, options)
        except RecordProblem as problem:
            parsed.problems[problem.reason] += 1
            if parsed.first_problem is None:
                where = f"{shard.path}:{_record_unit(shard, options)} {batch.first_record + offset}"
                parsed.first_problem = f"{where}: {problem.reason}: {problem.detail}"
            continue
        if text is None:
            parsed.filtered += 1
        else:
            parsed.texts.append(text)
    return parsed


def iter_documents(shard: Shard, options: ReaderOptions) -> Iterator[str]:
    """Valid document texts of one shard, parsed in this process (malformed records skipped)."""
    for raw in read_raw_batches(shard, options):
        yield from parse_batch(raw, shard, options).texts
