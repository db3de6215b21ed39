"""Readers: formats, globs and directories, malformed records, damaged files."""

from __future__ import annotations

import gzip
import json

import pytest
import zstandard

from data_tools.errors import CorruptShardError, InputNotFoundError
from data_tools.readers import ReaderOptions, read_raw_batches
from data_tools.records import iter_documents, parse_batch
from data_tools.sources import Compression, Container, expand_inputs, shard_for_path
from data_tools.testing import (
    C4_SAMPLE,
    PILE_SAMPLE,
    WIKI_SAMPLE,
    json_line,
    sample_texts,
    write_c4,
    write_lines,
    write_pile,
    write_wikipedia,
)

TEXTS = ["First document.\nWith two lines.", "Zweites Dokument: ünïcödé, 日本語, 🦜.", "  third, spaced  "]


def documents(path, **options):
    (shard,) = expand_inputs([str(path)])
    return list(iter_documents(shard, ReaderOptions(**options)))


def parse_all(path, **options):
    """(texts, problem counts, filtered, first problem) over a whole file."""
    (shard,) = expand_inputs([str(path)])
    reader_options = ReaderOptions(**options)
    texts, problems, filtered, first = [], {}, 0, None
    for batch in read_raw_batches(shard, reader_options):
        parsed = parse_batch(batch, shard, reader_options)
        texts += parsed.texts
        for reason, count in parsed.problems.items():
            problems[reason] = problems.get(reason, 0) + count
        filtered += parsed.filtered
        first = first or parsed.first_problem
    return texts, problems, filtered, first


@pytest.mark.parametrize(
    ("name", "container", "compression"),
    [
        ("a.jsonl.zst", Container.JSONL, Compression.ZSTD),
        ("a.json.gz", Container.JSONL, Compression.GZIP),
        ("a.jsonl", Container.JSONL, Compression.NONE),
        ("a.txt", Container.TXT, Compression.NONE),
        ("a.parquet", Container.PARQUET, Compression.NONE),
        ("a.csv", None, None),
    ],
)
def test_format_from_name(tmp_path, name, container, compression):
    shard = shard_for_path(tmp_path / name)
    if container is None:
        assert shard is None
    else:
        assert (shard.container, shard.compression) == (container, compression)


@pytest.mark.parametrize(
    "writer", [lambda p: write_pile(p / "x.jsonl.zst", TEXTS), lambda p: write_c4(p / "x.json.gz", TEXTS),
               lambda p: write_wikipedia(p / "x.parquet", TEXTS)],
    ids=["pile", "c4", "wikipedia"],
)
def test_each_corpus_format_round_trips(tmp_path, writer):
    assert documents(writer(tmp_path)) == TEXTS


def test_plain_jsonl_with_a_configurable_text_field(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [json_line({"body": t}) for t in TEXTS])
    assert documents(path, text_field="body") == TEXTS


def test_txt_sampled_by_line_paragraph_and_document(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("one\ntwo\n\nthree\n", encoding="utf-8")
    assert documents(path) == ["one", "two", "three"]
    assert documents(path, txt_sample_by="paragraph") == ["one\ntwo", "three"]
    assert documents(path, txt_sample_by="document") == ["one\ntwo\n\nthree\n"]


def test_shipped_samples_are_real_and_large_enough():
    chars = {path.name: sum(map(len, sample_texts(path))) for path in (PILE_SAMPLE, C4_SAMPLE, WIKI_SAMPLE)}
    assert all(count > 500_000 for count in chars.values()), chars
    assert sum(chars.values()) >= 3_000_000
    assert sum(path.stat().st_size for path in (PILE_SAMPLE, C4_SAMPLE, WIKI_SAMPLE)) < 8_000_000
    assert "Emma Woodhouse" in "".join(sample_texts(PILE_SAMPLE, limit=5))


def test_pile_subsets_kept_or_dropped(tmp_path):
    path = write_pile(tmp_path / "x.jsonl.zst", TEXTS, ["Pile-CC", "Wikipedia (en)", "Pile-CC"])
    texts, _, filtered, _ = parse_all(path, keep_subsets=("Wikipedia (en)",))
    assert (texts, filtered) == ([TEXTS[1]], 2)
    texts, _, filtered, _ = parse_all(path, drop_subsets=("Wikipedia (en)",))
    assert (texts, filtered) == ([TEXTS[0], TEXTS[2]], 1)


def test_globs_and_directories_expand_in_sorted_order(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "notes.md"):
        write_lines(tmp_path / name, [json_line({"text": name})])
    (tmp_path / "sub").mkdir()
    write_lines(tmp_path / "sub" / "c.jsonl", [json_line({"text": "c"})])
    names = [shard.name for shard in expand_inputs([str(tmp_path)])]
    assert names == ["a.jsonl", "b.jsonl", "c.jsonl"]  # notes.md skipped inside a directory
    assert [s.name for s in expand_inputs([str(tmp_path / "*.jsonl")])] == ["a.jsonl", "b.jsonl"]


@pytest.mark.parametrize(
    ("argument", "message"),
    [("missing.jsonl", "input not found: .*missing.jsonl"), ("nothing*.jsonl", "no readable input files match"),
     ("notes.md", "unsupported input format: .*notes.md")],
)
def test_bad_inputs_are_named(tmp_path, argument, message):
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(InputNotFoundError, match=message):
        expand_inputs([str(tmp_path / argument)])


MALFORMED_LINES = [
    (b'{"text": "fine"', "broken_json", "broken JSON"),
    (b"[1, 2, 3]", "broken_json", "expected a JSON object"),
    (b'{"text": "caf\xe9"}', "invalid_utf8", "invalid UTF-8 byte 0xe9"),
    (b'{"text": "\\ud800 lone"}', "invalid_utf8", "lone surrogate"),
    (b'{"url": "https://example.org"}', "missing_text", "no field 'text'"),
    (b'{"text": 42}', "non_string_text", "field 'text' is int"),
    (b'{"text": null}', "non_string_text", "field 'text' is null"),
    (b'{"text": "   \\n "}', "empty_document", "empty or whitespace"),
]


@pytest.mark.parametrize(("line", "reason", "detail"), MALFORMED_LINES)
def test_each_malformed_record_is_counted_with_its_line(tmp_path, line, reason, detail):
    good = json_line({"text": "good"})
    path = write_lines(tmp_path / "x.json.gz", [good, line, good, line])
    texts, problems, _, first = parse_all(path)
    assert texts == ["good", "good"]
    assert problems == {reason: 2}
    assert first.startswith(f"{path}:line 2: {reason}: ") and detail in first


def test_parquet_without_the_text_column_counts_every_row(tmp_path):
    path = write_wikipedia(tmp_path / "x.parquet", TEXTS)
    texts, problems, _, first = parse_all(path, text_field="body")
    assert texts == [] and problems == {"missing_text": 3}
    assert first == f"{path}:row 1: missing_text: no column 'body'"


def test_parquet_null_and_empty_texts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"text": ["ok", None, ""]}), path)
    texts, problems, _, _ = parse_all(path)
    assert texts == ["ok"] and problems == {"non_string_text": 1, "empty_document": 1}


def test_txt_invalid_utf8_is_counted(tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes(b"fine\nbad \xff byte\nfine too\n")
    texts, problems, _, first = parse_all(path)
    assert texts == ["fine", "fine too"] and problems == {"invalid_utf8": 1}
    assert first.startswith(f"{path}:line 2: invalid_utf8")


def _lines(count):
    return [json_line({"text": f"document number {i} " * 20}) for i in range(count)]


def test_truncated_zstd_is_reported_by_name(tmp_path):
    path = write_lines(tmp_path / "cut.jsonl.zst", _lines(2000))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptShardError, match=r"cut\.jsonl\.zst: truncated zstd file"):
        documents(path)


def test_corrupt_zstd_is_reported_by_name(tmp_path):
    payload = b"".join(line + b"\n" for line in _lines(2000))
    data = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(payload))
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    path = tmp_path / "bad.jsonl.zst"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"bad\.jsonl\.zst: corrupt zstd data"):
        documents(path)


def test_truncated_gzip_is_reported_by_name(tmp_path):
    path = tmp_path / "cut.json.gz"
    path.write_bytes(gzip.compress(b"".join(line + b"\n" for line in _lines(2000)))[:3000])
    with pytest.raises(CorruptShardError, match=r"cut\.json\.gz: truncated gzip file"):
        documents(path)


def test_corrupt_parquet_is_reported_by_name(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(CorruptShardError, match=r"bad\.parquet: not a readable Parquet file"):
        documents(path)


def test_reading_is_streamed_in_bounded_batches(tmp_path):
    path = write_lines(tmp_path / "x.jsonl.zst", _lines(1000))
    (shard,) = expand_inputs([str(path)])
    batches = list(read_raw_batches(shard, ReaderOptions(batch_records=64)))
    assert max(len(batch.records) for batch in batches) == 64
    assert [batch.first_record for batch in batches[:3]] == [1, 65, 129]
    assert batches[-1].bytes_done == path.stat().st_size
    assert json.loads(batches[-1].records[-1])["text"].startswith("document number 999")


def test_txt_problems_name_the_paragraph_in_paragraph_mode(tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes(b"fine\nparagraph\n\nbad \xff\nbyte\n\nlast\n")
    texts, problems, _, first = parse_all(path, txt_sample_by="paragraph")
    assert texts == ["fine\nparagraph", "last"] and problems == {"invalid_utf8": 1}
    assert first.startswith(f"{path}:paragraph 2: invalid_utf8")


def test_concatenated_zstd_frames_and_a_last_line_without_newline(tmp_path):
    compressor = zstandard.ZstdCompressor()
    first = compressor.compress(json_line({"text": "frame one"}) + b"\n")
    second = compressor.compress(json_line({"text": "frame two"}))  # no final newline
    path = tmp_path / "frames.jsonl.zst"
    path.write_bytes(first + second)
    assert documents(path) == ["frame one", "frame two"]
