"""Hugging Face tokenizer files for a sentencepiece BPE model, written without transformers.

`tokenizer.json` reproduces sentencepiece's BPE in the `tokenizers` library's terms, the way the
Llama conversion does: the vocabulary in id order, merges ranked by the id of the merged piece
(sentencepiece ids BPE pieces in merge order), byte fallback to `<0xNN>` pieces, a normaliser that
turns spaces into `▁` and prepends one (sentencepiece's dummy prefix), and a decoder that undoes it.
No special token is added on encoding, and special-token strings inside text are read as text,
so `tokenizer(text).input_ids == sp.encode(text)` for every text: our
training data has no BOS, only an EOS after each document (see docs/data.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import sentencepiece as spm

from data_tools.errors import DataToolsError

SPIECE_UNDERLINE = "\u2581"
HF_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _model_spec(model_path: Path) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    return proto


def _check_convertible(model_path: Path, proto: Any) -> None:
    # tokenizer.json reproduces only what our trainer produces; anything else would encode
    # differently from sentencepiece, so refuse rather than ship a subtly wrong tokenizer.
    bpe = type(proto.trainer_spec).ModelType.Value("BPE")
    problems = []
    if proto.trainer_spec.model_type != bpe:
        problems.append("model type is not BPE")
    if proto.normalizer_spec.name != "identity":
        problems.append(f"normaliser is {proto.normalizer_spec.name!r}, not 'identity'")
    if proto.normalizer_spec.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces is on")
    if not proto.normalizer_spec.add_dummy_prefix:
        problems.append("add_dummy_prefix is off")
    if problems:
        raise DataToolsError(f"{model_path}: cannot write tokenizer.json: {'; '.join(problems)}")


def _vocab_and_merges(processor: spm.SentencePieceProcessor) -> tuple[dict[str, int], list[list[str]]]:
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    mergeable = {
        piece: i
        for piece, i in vocab.items()
        if not (processor.is_byte(i) or processor.is_control(i) or processor.is_unknown(i))
    }
    merges = []
    for piece, piece_id in mergeable.items():
        for split in range(1, len(piece)):
            left, right = piece[:split], piece[split:]
            if left in mergeable and right in mergeable:
                merges.append((piece_id, mergeable[left], mergeable[right], left, right))
    merges.sort()
    return vocab, [[left, right] for *_, left, right in merges]


def _special_tokens(processor: spm.SentencePieceProcessor) -> list[dict[str, Any]]:
    specials = [i for i in range(processor.get_piece_size()) if processor.is_control(i) or processor.is_unknown(i)]
    return [
        {
            "id": i,
            "content": processor.id_to_piece(i),
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i in specials
    ]


def tokenizer_json(processor: spm.SentencePieceProcessor) -> dict[str, Any]:
    vocab, merges = _vocab_and_merges(processor)
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _special_tokens(processor),
        "normalizer": {
            "type": "Sequence",
            "normalizers": [{"type": "Prepend", "prepend": SPIECE_UNDERLINE}, replace],
        },
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SPIECE_UNDERLINE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": processor.id_to_piece(processor.unk_id()),
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def _piece_or_none(processor: spm.SentencePieceProcessor, token_id: int) -> str | None:
    return processor.id_to_piece(token_id) if token_id >= 0 else None


def _special_token_map(processor: spm.SentencePieceProcessor) -> dict[str, str]:
    names = {"bos_token": processor.bos_id(), "eos_token": processor.eos_id(), "unk_token": processor.unk_id()}
    names["pad_token"] = processor.pad_id()
    return {name: piece for name, i in names.items() if (piece := _piece_or_none(processor, i)) is not None}


def _tokenizer_config(processor: spm.SentencePieceProcessor) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **_special_token_map(processor),
        "pad_token": _piece_or_none(processor, processor.pad_id()),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        # sentencepiece reads "</s>" in text as characters, not as EOS; do the same.
        "split_special_tokens": True,
        "model_max_length": 1_000_000_000,
        "added_tokens_decoder": {
            str(token["id"]): {key: value for key, value in token.items() if key != "id"}
            for token in _special_tokens(processor)
        },
    }


def write_hf_tokenizer_files(model_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json into
    `out_dir` (created if needed) so `AutoTokenizer.from_pretrained(out_dir)` loads offline and
    encodes exactly like the sentencepiece model. Returns the written paths."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    if not model_path.is_file():
        raise DataToolsError(f"tokenizer model not found: {model_path}")
    _check_convertible(model_path, _model_spec(model_path))
    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path, out_dir / "tokenizer.model")
    documents = {
        "tokenizer.json": tokenizer_json(processor),
        "tokenizer_config.json": _tokenizer_config(processor),
        "special_tokens_map.json": _special_token_map(processor),
    }
    for name, content in documents.items():
        (out_dir / name).write_text(json.dumps(content, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return [out_dir / name for name in HF_FILES]
