"""Tokenizer training, conventions, loading, and the Hugging Face files beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_tools.errors import DataToolsError
from data_tools.hf_tokenizer import write_hf_tokenizer_files
from data_tools.readers import ReaderOptions
from data_tools.testing import C4_SAMPLE, PILE_SAMPLE, WIKI_SAMPLE, sample_texts, train_small_tokenizer
from data_tools.tokenizer import (
    SampleGroup,
    TrainerSettings,
    build_parser,
    load_tokenizer,
    main,
    sample_group,
    sample_groups_from_args,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_special_ids_match_the_model_config(model):
    tokenizer = load_tokenizer(model)
    assert (tokenizer.vocab_size, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (1000, 0, 1, 2)
    assert tokenizer.pad_id is None
    assert [tokenizer.processor.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]


def test_round_trip_is_exact_with_byte_fallback(model):
    tokenizer = load_tokenizer(model)
    for text in ["  leading and trailing  ", "tabs\tand\nnew\nlines\n\n", "unseen: 🦜 ∮ 漢字", "x=1234567"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("🦜") != [tokenizer.unk_id]  # bytes, not <unk>


def test_load_tokenizer_accepts_prefix_model_file_and_hf_dir(model):
    prefix = str(model).removesuffix(".model")
    expected = load_tokenizer(model).encode("Emma Woodhouse, handsome, clever, and rich")
    for path in (prefix, f"{prefix}.hf"):
        assert load_tokenizer(path).encode("Emma Woodhouse, handsome, clever, and rich") == expected
    with pytest.raises(DataToolsError, match="tokenizer not found: .*nowhere"):
        load_tokenizer(model.parent / "nowhere")


def test_training_writes_model_vocab_and_hf_directory(model):
    prefix = str(model).removesuffix(".model")
    for name in (f"{prefix}.vocab", f"{prefix}.hf/tokenizer.model", f"{prefix}.hf/tokenizer.json",
                 f"{prefix}.hf/tokenizer_config.json", f"{prefix}.hf/special_tokens_map.json"):
        assert Path(name).is_file(), name
    special = json.loads(Path(f"{prefix}.hf/special_tokens_map.json").read_text())
    assert special == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def test_hugging_face_tokenizer_encodes_like_sentencepiece(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    write_hf_tokenizer_files(model, out)
    hf = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    tokenizer = load_tokenizer(model)
    texts = sample_texts(PILE_SAMPLE, limit=40, max_chars=3000) + sample_texts(WIKI_SAMPLE, limit=20)
    texts += ["  two leading spaces", "trailing  ", "</s> is text here", "tab\there\n\nblank", "🦜 ünï 漢字 123"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf(text)["input_ids"] == ids, text[:80]
        assert hf.decode(ids) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id) == (1, 2, 0, None)


def test_the_sample_is_reproducible_and_within_budget():
    group = SampleGroup("wiki", (str(WIKI_SAMPLE),), 200_000)
    first = sample_group(group, ReaderOptions(), seed=3)
    assert first == sample_group(group, ReaderOptions(), seed=3)
    assert first != sample_group(group, ReaderOptions(), seed=4)
    chars = sum(len(text) for _, text in first)
    assert 200_000 <= chars < 200_000 + max(len(text) for _, text in first)


def test_training_twice_gives_the_same_model(tmp_path):
    group = SampleGroup("c4", (str(C4_SAMPLE),), 300_000)
    settings = TrainerSettings(vocab_size=600, threads=2)
    models = [train_tokenizer([group], tmp_path / f"t{i}", settings, ReaderOptions(), seed=1) for i in range(2)]
    assert models[0].read_bytes() == models[1].read_bytes()


def test_mix_spec_sampling_needs_raw_inputs(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("output_dir: x\nseq_length: 8\ntarget_tokens: 100\nsources:\n  - {path: a, weight: 1}\n")
    assert main(["--mix", str(spec), "--output", str(tmp_path / "t")]) == 2
    assert "have no `raw` inputs" in capsys.readouterr().err


def test_cli_rejects_a_vocabulary_too_small_for_byte_fallback(tmp_path, capsys):
    assert main(["--input", str(WIKI_SAMPLE), "--vocab-size", "100", "--output", str(tmp_path / "t")]) == 2
    assert "--vocab-size must be at least 260" in capsys.readouterr().err


def test_cli_reports_missing_input(tmp_path, capsys):
    assert main(["--input", str(tmp_path / "absent.jsonl"), "--output", str(tmp_path / "t")]) == 2
    assert "input not found" in capsys.readouterr().err


def test_cli_trains_from_a_mix_spec_in_proportion_to_the_weights(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "output_dir: x\nseq_length: 8\ntarget_tokens: 100\nsources:\n"
        f"  - {{name: books, path: a, weight: 3, raw: [{PILE_SAMPLE}]}}\n"
        f"  - {{name: wiki, path: b, weight: 1, raw: [{WIKI_SAMPLE}]}}\n"
    )
    prefix = tmp_path / "tok"
    assert main(["--mix", str(spec), "--output", str(prefix), "--vocab-size", "600", "--sample-chars", "200k"]) == 0
    assert f"wrote {prefix}.model (vocab 600)" in capsys.readouterr().out
    assert load_tokenizer(prefix).vocab_size == 600
    args = build_parser().parse_args(["--mix", str(spec), "--output", str(prefix)])
    groups = sample_groups_from_args(args, 200_000)
    assert [(g.name, g.inputs, g.chars) for g in groups] == [
        ("books", (str(PILE_SAMPLE),), 150_000), ("wiki", (str(WIKI_SAMPLE),), 50_000)]
