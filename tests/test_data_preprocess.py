"""hgrn2-preprocess: Megatron compatibility, workers, interruption and resume, malformed input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_tools.indexed import IndexInfo, token_dtype
from data_tools.preprocess import main
from data_tools.testing import (
    C4_SAMPLE,
    PILE_SAMPLE,
    WIKI_SAMPLE,
    chunks,
    json_line,
    sample_texts,
    train_small_tokenizer,
    write_c4,
    write_lines,
    write_pile,
    write_wikipedia,
)
from data_tools.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real text in all three formats, a few hundred kB, and the texts in reading order."""
    directory = tmp_path_factory.mktemp("corpus")
    pile = sample_texts(PILE_SAMPLE, limit=30, max_chars=8000)
    c4 = sample_texts(C4_SAMPLE, limit=30, max_chars=8000)
    wiki = sample_texts(WIKI_SAMPLE, limit=30, max_chars=8000)
    write_c4(directory / "a_c4.json.gz", c4)
    write_pile(directory / "b_pile.jsonl.zst", pile)
    write_wikipedia(directory / "c_wiki.parquet", wiki)
    return directory, c4 + pile + wiki


def run(*args: str) -> int:
    return main([*args, "--no-progress"])


def test_megatron_reads_what_we_write_and_documents_decode_to_the_inputs(model, corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    directory, texts = corpus
    out = tmp_path / "out"
    assert run("--input", str(directory), "--tokenizer", str(model), "--output-prefix", str(out), "--workers", "2") == 0
    tokenizer = load_tokenizer(model)
    dataset = IndexedDataset(str(out))
    assert len(dataset) == len(texts)
    assert dataset.index.dtype == np.uint16 == token_dtype(tokenizer.vocab_size)
    for i, text in enumerate(texts):
        tokens = dataset[i]
        assert tokens[-1] == tokenizer.eos_id and tokenizer.eos_id not in tokens[:-1]
        assert tokenizer.decode(tokens[:-1].tolist()) == text
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    assert (meta["vocab_size"], meta["eod_id"], meta["documents"]) == (1000, 2, len(texts))
    assert meta["tokens"] == int(dataset.sequence_lengths.sum())
    assert not Path(f"{out}.parts").exists()


def test_output_does_not_depend_on_worker_count(model, corpus, tmp_path):
    directory, _ = corpus
    for workers in ("1", "2"):
        assert run("--input", str(directory), "--tokenizer", str(model),
                   "--output-prefix", str(tmp_path / f"w{workers}"), "--workers", workers) == 0
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()


def test_dtype_is_the_smallest_that_fits():
    assert [token_dtype(v) for v in (256, 257, 65536, 65537)] == [np.uint8, np.uint16, np.uint16, np.int32]


def test_rerun_of_a_complete_output_does_nothing(model, corpus, tmp_path, capsys):
    directory, _ = corpus
    args = ("--input", str(directory), "--tokenizer", str(model), "--output-prefix", str(tmp_path / "o"))
    assert run(*args) == 0
    assert run(*args) == 0
    assert "complete and up to date; nothing to do" in capsys.readouterr().out


def _many_shards(directory: Path) -> Path:
    texts = sample_texts(PILE_SAMPLE, limit=120, max_chars=20000)
    for i, part in enumerate(chunks(texts, 8)):
        write_pile(directory / f"shard_{i:02d}.jsonl.zst", part)
    return directory


def test_killed_run_leaves_no_output_and_the_rerun_matches_an_uninterrupted_run(model, tmp_path):
    (tmp_path / "in").mkdir()
    inputs = _many_shards(tmp_path / "in")
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "data_tools.preprocess", "--input", str(inputs), "--tokenizer", str(model),
               "--output-prefix", str(out), "--workers", "1", "--no-progress", "--batch-records", "4"]
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    parts = Path(f"{out}.parts")
    deadline = time.time() + 60
    while not list(parts.glob("*.json")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert process.poll() is None, "preprocess finished before it could be interrupted; make the input larger"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not Path(f"{out}.bin").exists() and not Path(f"{out}.idx").exists()
    done = len(list(parts.glob("*.json")))
    assert 1 <= done < 8

    resumed = subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                             capture_output=True, text=True, check=True)
    assert f"{done} reused from an earlier run" in resumed.stdout
    reference = tmp_path / "reference"
    assert run("--input", str(inputs), "--tokenizer", str(model), "--output-prefix", str(reference)) == 0
    for suffix in (".bin", ".idx"):
        assert Path(f"{out}{suffix}").read_bytes() == Path(f"{reference}{suffix}").read_bytes()


def test_ctrl_c_with_worker_processes_stops_cleanly_and_resumes(model, tmp_path):
    (tmp_path / "in").mkdir()
    inputs = _many_shards(tmp_path / "in")
    out = tmp_path / "interrupted"
    command = [sys.executable, "-m", "data_tools.preprocess", "--input", str(inputs), "--tokenizer", str(model),
               "--output-prefix", str(out), "--workers", "2", "--no-progress", "--batch-records", "4"]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    # A shell starts background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt handler:
    # give the child the default disposition so that the test holds however the suite itself was started.
    process = subprocess.Popen(command, cwd=REPO, env=environment, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    parts = Path(f"{out}.parts")
    deadline = time.time() + 60
    while not list(parts.glob("*.json")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, error = process.communicate(timeout=60)
    assert process.returncode == 130 and "interrupted; finished input files are kept" in error
    assert not Path(f"{out}.bin").exists() and not Path(f"{out}.idx").exists()
    subprocess.run(command, cwd=REPO, env=environment, capture_output=True, check=True)
    assert IndexInfo(Path(f"{out}.idx")).sequence_count == 120


def test_a_changed_input_is_redone_not_reused(model, tmp_path, capsys):
    write_c4(tmp_path / "a.json.gz", ["first version of the text"])
    args = ("--input", str(tmp_path / "a.json.gz"), "--tokenizer", str(model),
            "--output-prefix", str(tmp_path / "o"), "--keep-parts")
    assert run(*args) == 0
    write_c4(tmp_path / "a.json.gz", ["second, longer version of the text"])
    os.utime(tmp_path / "a.json.gz", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert run(*args) == 0
    out = capsys.readouterr().out
    assert "reused" not in out.splitlines()[-2]
    tokenizer = load_tokenizer(model)
    info = IndexInfo(tmp_path / "o.idx")
    assert info.lengths.tolist() == [len(tokenizer.encode("second, longer version of the text")) + 1]


MALFORMED = [
    b'{"text": "broken',
    b'{"text": "bad \xff byte"}',
    b'{"title": "no text"}',
    b'{"text": ["a", "list"]}',
    b'{"text": ""}',
    b'{"text": 7}',
]


def test_malformed_records_are_counted_per_reason(model, tmp_path, capsys):
    good = [json_line({"text": f"good document {i}"}) for i in range(3)]
    path = write_lines(tmp_path / "x.jsonl.zst", [good[0], *MALFORMED, good[1], good[2]])
    out = tmp_path / "o"
    assert run("--input", str(path), "--tokenizer", str(model), "--output-prefix", str(out)) == 0
    printed = capsys.readouterr().out
    assert ("skipped malformed records: 6 (broken_json: 1, empty_document: 1, invalid_utf8: 1, "
            "missing_text: 1, non_string_text: 2)") in printed
    meta = json.loads(Path(f"{out}.meta.json").read_text())
    assert meta["problems"] == {"broken_json": 1, "invalid_utf8": 1, "missing_text": 1,
                                "non_string_text": 2, "empty_document": 1}
    assert meta["documents"] == 3


@pytest.mark.parametrize(
    ("line", "message"),
    [(MALFORMED[0], "line 2: broken_json: broken JSON"), (MALFORMED[1], "line 2: invalid_utf8"),
     (MALFORMED[2], "line 2: missing_text: no field 'text'"),
     (MALFORMED[3], "line 2: non_string_text: field 'text' is list"),
     (MALFORMED[4], "line 2: empty_document")],
)
def test_strict_stops_at_the_first_malformed_record(model, tmp_path, capsys, line, message):
    path = write_lines(tmp_path / "x.json.gz", [json_line({"text": "fine"}), line, json_line({"text": "more"})])
    out = tmp_path / "o"
    assert run("--input", str(path), "--tokenizer", str(model), "--output-prefix", str(out), "--strict") == 1
    error = capsys.readouterr().err
    assert "malformed record (--strict)" in error and f"{path}:{message}" in error
    assert not Path(f"{out}.bin").exists()


def test_damaged_file_is_reported_by_name_and_strict_stops(model, tmp_path, capsys):
    good = write_c4(tmp_path / "good.json.gz", ["a fine document"] * 50)
    damaged = write_pile(tmp_path / "damaged.jsonl.zst", [f"text {i} " * 50 for i in range(2000)])
    damaged.write_bytes(damaged.read_bytes()[:-100])
    args = ("--input", str(good), str(damaged), "--tokenizer", str(model))
    assert run(*args, "--output-prefix", str(tmp_path / "lenient")) == 0
    printed = capsys.readouterr().out
    assert f"WARNING: damaged input file, read up to the damage only: {damaged}" in printed
    assert "truncated zstd file" in printed
    assert str(damaged) in json.loads((tmp_path / "lenient.meta.json").read_text())["corrupt_files"]
    assert run(*args, "--output-prefix", str(tmp_path / "strict"), "--strict") == 1
    assert f"damaged input (--strict): {damaged}: truncated zstd file" in capsys.readouterr().err
    assert not (tmp_path / "strict.bin").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [(("--input", "/nonexistent/x.jsonl.zst"), "input not found: /nonexistent/x.jsonl.zst"),
     (("--input", "{corpus}", "--workers", "0"), "--workers must be >= 1"),
     (("--input", "{corpus}", "--tokenizer", "/nonexistent/tok.model"), "tokenizer not found: /nonexistent/tok")],
)
def test_bad_arguments_name_the_problem(model, corpus, tmp_path, capsys, args, message):
    arguments = [a.replace("{corpus}", str(corpus[0])) for a in args]
    if "--tokenizer" not in arguments:
        arguments += ["--tokenizer", str(model)]
    assert run(*arguments, "--output-prefix", str(tmp_path / "o")) == 2
    assert message in capsys.readouterr().err


def test_progress_without_a_terminal_logs_plain_lines(capsys):
    from data_tools.progress import Progress

    progress = Progress(total_bytes=1000, enabled=True, log_every=0.0)
    progress.advance(250, documents=10, tokens=5000)
    progress.close()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("tokenizing:  25.0% of 1.00kB input, ") and "docs/s" in line and "tok/s" in line
    assert "ETA" in line and "\r" not in line
