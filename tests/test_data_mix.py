"""hgrn2-build-mix / load_mix: blending, determinism, caching, the trainer's interface, spec errors."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_tools.errors import SpecError, StaleDatasetError
from data_tools.indexed import IndexedTokens
from data_tools.mix import build_mix, load_mix, main
from data_tools.mix_index import blend_counts, interleave
from data_tools.preprocess import main as preprocess_main
from data_tools.testing import (
    C4_SAMPLE,
    PILE_SAMPLE,
    WIKI_SAMPLE,
    sample_texts,
    train_small_tokenizer,
    write_c4,
    write_pile,
    write_wikipedia,
)

WEIGHTS = {"pile": 0.5, "c4": 0.3, "wiki": 0.2}


def preprocess(path: Path, model: Path, out: Path) -> Path:
    assert preprocess_main(["--input", str(path), "--tokenizer", str(model), "--output-prefix", str(out),
                            "--no-progress", "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The three sample formats, tokenized: {name: prefix}, plus the tokenizer model."""
    directory = tmp_path_factory.mktemp("mix_inputs")
    model = train_small_tokenizer(directory)
    raw = {
        "pile": write_pile(directory / "pile.jsonl.zst", sample_texts(PILE_SAMPLE, limit=40, max_chars=6000)),
        "c4": write_c4(directory / "c4.json.gz", sample_texts(C4_SAMPLE, limit=40, max_chars=6000)),
        "wiki": write_wikipedia(directory / "wiki.parquet", sample_texts(WIKI_SAMPLE, limit=40, max_chars=6000)),
    }
    return {name: preprocess(path, model, directory / f"tok_{name}") for name, path in raw.items()}, model


def spec(datasets, output_dir, **overrides):
    prefixes, _ = datasets
    value = {
        "output_dir": str(output_dir),
        "seq_length": 128,
        "target_tokens": "1M",
        "seed": 7,
        "valid_fraction": 0.05,
        "sources": [{"name": name, "path": str(prefixes[name]), "weight": w} for name, w in WEIGHTS.items()],
    }
    value.update(overrides)
    return value


def test_three_formats_blend_to_their_weights(datasets, tmp_path):
    output = build_mix(spec(datasets, tmp_path / "mix"), quiet=True)
    train = load_mix(output, "train")
    assert len(train) == -(-1_000_000 // 128)
    counts = np.bincount(np.asarray(train.dataset_index), minlength=3) / len(train)
    for share, weight in zip(counts, WEIGHTS.values(), strict=True):
        assert abs(share - weight) < 0.01
    meta = json.loads((output / "mix.json").read_text())
    for name, weight in WEIGHTS.items():
        assert abs(meta["splits"]["train"]["shares"][name] - weight) < 0.01
        assert meta["splits"]["train"]["epochs"][name] > 1  # small sources upsampled to reach 1M tokens
    valid = load_mix(output, "valid")
    assert 0 < len(valid) <= -(-50_000 // 128)
    assert all(epochs <= 1 for epochs in meta["splits"]["valid"]["epochs"].values())  # no document read twice
    for name, weight in WEIGHTS.items():
        assert abs(meta["splits"]["valid"]["shares"][name] - weight) < 1.5 / len(valid) + 1e-9


def test_the_trainer_interface(datasets, tmp_path):
    _, model = datasets
    train = load_mix(build_mix(spec(datasets, tmp_path / "mix"), quiet=True), "train")
    sample = train[0]
    assert isinstance(sample, np.ndarray) and sample.dtype == np.int64 and sample.shape == (129,)
    assert (train.seq_length, train.vocab_size, train.eod_id) == (128, 1000, 2)
    assert all(0 <= int(t) < train.vocab_size for t in train[len(train) - 1])
    with pytest.raises(IndexError):
        train[len(train)]
    copy = pickle.loads(pickle.dumps(train))
    assert len(pickle.dumps(train)) < 1000 and np.array_equal(copy[5], train[5])


def _stream(source_tokens: IndexedTokens, doc_order: np.ndarray) -> np.ndarray:
    return np.concatenate([source_tokens.document(int(d)) for d in doc_order]).astype(np.int64)


def test_samples_are_consecutive_windows_of_the_shuffled_document_stream(datasets, tmp_path):
    prefixes, _ = datasets
    output = build_mix(spec(datasets, tmp_path / "mix"), quiet=True)
    train = load_mix(output, "train")
    doc_order = np.load(output / "train.source1.doc_order.npy")
    stream = _stream(IndexedTokens(prefixes["c4"]), doc_order)
    from_c4 = np.flatnonzero(np.asarray(train.dataset_index) == 1)
    starts = set()
    for idx in from_c4[:200]:
        stream_sample = int(train.dataset_sample_index[idx])
        start = stream_sample * 128
        assert np.array_equal(train[idx], stream[start : start + 129])
        starts.add(stream_sample)
    assert len(starts) == 200  # no sample drawn twice
    assert sorted(np.asarray(train.dataset_sample_index)[from_c4]) == list(range(len(from_c4)))


def test_document_boundaries_follow_eod_tokens(datasets, tmp_path):
    train = load_mix(build_mix(spec(datasets, tmp_path / "mix"), quiet=True), "train")
    found = 0
    for idx in range(50):
        sample, boundaries = train[idx], train.document_boundaries(idx)
        assert all(sample[p - 1] == train.eod_id for p in boundaries)
        assert np.count_nonzero(sample[:-1] == train.eod_id) == len(boundaries)
        found += len(boundaries)
    assert found > 0


def test_validation_documents_are_held_out_of_training(datasets, tmp_path):
    output = build_mix(spec(datasets, tmp_path / "mix"), quiet=True)
    for source in range(3):
        train_docs = set(np.load(output / f"train.source{source}.doc_order.npy").tolist())
        valid_docs = set(np.load(output / f"valid.source{source}.doc_order.npy").tolist())
        assert valid_docs and not train_docs & valid_docs


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_same_seed_is_byte_identical_and_another_seed_differs(datasets, tmp_path):
    first = _files(build_mix(spec(datasets, tmp_path / "a"), quiet=True))
    second = _files(build_mix(spec(datasets, tmp_path / "b"), quiet=True))
    other = _files(build_mix(spec(datasets, tmp_path / "c", seed=8), quiet=True))
    assert first == second
    assert first["train.dataset_sample_index.npy"] != other["train.dataset_sample_index.npy"]
    assert first["train.source0.doc_order.npy"] != other["train.source0.doc_order.npy"]


def test_cache_is_reused_and_invalidated_by_a_rebuilt_dataset(tmp_path, capsys):
    model = train_small_tokenizer(tmp_path)
    texts = sample_texts(WIKI_SAMPLE, limit=12, max_chars=4000)
    prefix = preprocess(write_wikipedia(tmp_path / "w.parquet", texts), model, tmp_path / "wiki")
    value = {"output_dir": str(tmp_path / "mix"), "seq_length": 64, "target_tokens": 20_000,
             "sources": [{"name": "wiki", "path": str(prefix), "weight": 1}]}
    build_mix(value)
    first = load_mix(tmp_path / "mix", "train")[0]
    build_mix(value)
    assert "up to date" in capsys.readouterr().out
    # Rebuild the dataset at the same path from the same documents in another order: same sizes,
    # other contents. The cache key (the .idx hash) must change, so the mix is rebuilt.
    (tmp_path / "w.parquet").unlink()
    preprocess(write_wikipedia(tmp_path / "w2.parquet", texts[::-1]), model, tmp_path / "wiki")
    build_mix(value)
    assert "built" in capsys.readouterr().out
    assert not np.array_equal(load_mix(tmp_path / "mix", "train")[0], first)


def test_a_dataset_that_shrank_after_the_build_is_refused(tmp_path):
    model = train_small_tokenizer(tmp_path)
    texts = sample_texts(WIKI_SAMPLE, limit=12, max_chars=4000)
    prefix = preprocess(write_wikipedia(tmp_path / "w.parquet", texts), model, tmp_path / "wiki")
    build_mix({"output_dir": str(tmp_path / "mix"), "seq_length": 64, "target_tokens": 20_000,
               "sources": [{"name": "wiki", "path": str(prefix), "weight": 1}]}, quiet=True)
    preprocess(write_wikipedia(tmp_path / "w2.parquet", texts[:6]), model, tmp_path / "wiki2")
    for suffix in (".bin", ".idx"):
        Path(f"{tmp_path / 'wiki2'}{suffix}").replace(f"{prefix}{suffix}")
    with pytest.raises(StaleDatasetError, match=r"wiki\.(idx|bin): changed since the mix was built"):
        load_mix(tmp_path / "mix", "train")


def test_interleaving_keeps_every_prefix_on_its_share():
    weights = np.array([0.62, 0.3, 0.08])
    counts = blend_counts(weights, 10_001)
    assert counts.sum() == 10_001 and np.all(np.abs(counts - weights * 10_001) < 1)
    sources, _ = interleave(counts)
    seen = np.cumsum(np.eye(3, dtype=np.int64)[sources], axis=0)
    ideal = np.arange(1, 10_002)[:, None] * counts / counts.sum()
    assert np.abs(seen - ideal).max() < 1.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target_tokens": "12Q"}, "target_tokens: expected a count such as 1000000 or 100B, got '12Q'"),
        ({"seq_length": 0}, "seq_length: expected an integer >= 1, got 0"),
        ({"valid_fraction": 1.5}, "valid_fraction: expected a number in [0, 1), got 1.5"),
        ({"shuffle": True}, "top level: unknown key(s) ['shuffle']"),
        ({"sources": []}, "sources: expected a non-empty list of sources"),
        ({"sources": [{"path": "x", "weight": -1}]}, "sources[0].weight: expected a number > 0, got -1"),
        ({"sources": [{"path": "x"}]}, "sources[0]: missing key(s) ['weight']"),
        ({"sources": [{"name": "gone", "path": "/nonexistent/data", "weight": 1}]},
         "sources[0] (gone): no tokenized dataset at /nonexistent/data"),
    ],
)
def test_bad_spec_values_are_named(datasets, tmp_path, change, message):
    with pytest.raises(SpecError) as error:
        build_mix(spec(datasets, tmp_path / "mix", **change))
    assert message in str(error.value)


def test_cli_reports_a_bad_spec_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\nseq_length: 128\nsources: [{path: a, weight: 1}]\n")
    assert main([str(bad)]) == 2
    assert f"mix spec {bad}: top level: missing key(s) ['target_tokens']" in capsys.readouterr().err
    assert main([str(tmp_path / "absent.yaml")]) == 2
    assert "mix spec not found" in capsys.readouterr().err


def test_cli_builds_the_yaml_spec_and_reports_shares(datasets, tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec(datasets, tmp_path / "mix")))
    assert main([str(path)]) == 0
    report = capsys.readouterr().out
    rows = re.findall(r"^  (\w+) +weight +([\d.]+)% +realised +([\d.]+)% +epochs +([\d.]+)", report, re.M)
    assert [name for name, *_ in rows] == ["pile", "c4", "wiki"] * 2
    assert all(abs(float(weight) - float(share)) < 1.0 for _, weight, share, _ in rows[:3])  # train
    assert all(float(epochs) <= 1 for *_, epochs in rows[3:])  # valid reads no held-out document twice


def test_prepare_chains_tokenizer_preprocess_and_mix(tmp_path, capsys):
    from data_tools.prepare import prepare

    raw = {
        "pile": write_pile(tmp_path / "p.jsonl.zst", sample_texts(PILE_SAMPLE, limit=10, max_chars=5000)),
        "wiki": write_wikipedia(tmp_path / "w.parquet", sample_texts(WIKI_SAMPLE, limit=10, max_chars=5000)),
    }
    value = {"output_dir": str(tmp_path / "mix"), "seq_length": 64, "target_tokens": "50k", "valid_fraction": 0.1,
             "sources": [{"name": n, "path": str(tmp_path / f"tok_{n}"), "weight": 1, "raw": [str(p)]}
                         for n, p in raw.items()]}
    output = prepare(value, tmp_path / "tokenizer", vocab_size=600, sample_chars=100_000, workers=1, progress=False)
    train = load_mix(output, "train")
    assert (len(train), train.vocab_size) == (-(-50_000 // 64), 600)
    assert (tmp_path / "tokenizer.hf" / "tokenizer.json").is_file()
    capsys.readouterr()
    prepare(value, tmp_path / "tokenizer", vocab_size=600, workers=1, progress=False)
    printed = capsys.readouterr().out
    assert "trained" not in printed and "up to date" in printed


def test_a_source_may_span_several_datasets_by_glob(tmp_path):
    model = train_small_tokenizer(tmp_path)
    texts = sample_texts(WIKI_SAMPLE, limit=12, max_chars=3000)
    for part, chunk in enumerate((texts[:5], texts[5:])):
        preprocess(write_wikipedia(tmp_path / f"w{part}.parquet", chunk), model, tmp_path / f"wiki_{part}")
    output = build_mix({"output_dir": str(tmp_path / "mix"), "seq_length": 64, "target_tokens": 30_000,
                        "sources": [{"name": "wiki", "path": str(tmp_path / "wiki_*"), "weight": 1}]}, quiet=True)
    meta = json.loads((output / "mix.json").read_text())
    assert [Path(d["prefix"]).name for d in meta["sources"][0]["datasets"]] == ["wiki_0", "wiki_1"]
    assert meta["sources"][0]["documents"] == 12
    doc_order = np.load(output / "train.source0.doc_order.npy")
    assert set(doc_order.tolist()) == set(range(12))  # documents of both datasets are drawn
    train = load_mix(output, "train")
    tokens = [IndexedTokens(tmp_path / f"wiki_{p}") for p in (0, 1)]
    stream = np.concatenate([(tokens[0] if d < 5 else tokens[1]).document(d if d < 5 else d - 5)
                             for d in doc_order.tolist()]).astype(np.int64)
    for idx in range(20):
        start = int(train.dataset_sample_index[idx]) * 64
        assert np.array_equal(train[idx], stream[start : start + 65])


def test_without_a_validation_fraction_the_valid_split_is_empty_but_opens(datasets, tmp_path):
    output = build_mix(spec(datasets, tmp_path / "mix", valid_fraction=0), quiet=True)
    assert len(load_mix(output, "valid")) == 0
    train_docs = np.load(output / "train.source2.doc_order.npy")
    assert len(set(train_docs.tolist())) == 40  # every document is in training
