"""`hgrn2-train-tokenizer`: a sentencepiece BPE tokenizer with byte fallback, and its loader.

Conventions (match the model config: bos_token_id=1, eos_token_id=2, pad_token_id=None, as fla's
and Llama's tokenizers): `<unk>`=0, `<s>`=1, `</s>`=2, no pad piece. Training data has an EOS
(`</s>`) after each document and no BOS; nothing is ever padded (sequences are packed). Code that
must pad a batch (e.g. batched generation) pads with EOS and masks by attention mask.
The normaliser is the identity (text round-trips exactly), digits are split, whitespace kept.

Training sample: documents are drawn without replacement by a seeded hash of (seed, source, file
name, document number): the documents with the smallest hashes, up to `--sample-chars` characters
(per source in proportion to its weight when drawn from a mix spec). The sample depends only on
the inputs and the seed, not on file order on disk or on the number of threads.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import sentencepiece as spm

from data_tools.errors import DataToolsError
from data_tools.hf_tokenizer import write_hf_tokenizer_files
from data_tools.mix_spec import load_spec
from data_tools.reader_args import add_reader_arguments, reader_options_from_args
from data_tools.readers import ReaderOptions
from data_tools.records import iter_documents
from data_tools.sources import expand_inputs
from data_tools.units import parse_count

__all__ = ["Tokenizer", "load_tokenizer", "train_tokenizer", "write_hf_tokenizer_files", "main"]

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
MIN_VOCAB = 256 + 3 + 1  # the 256 byte pieces, the three specials, and at least one merge


class Tokenizer:
    """The loaded tokenizer: what preprocessing, training and evaluation code need."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        self.processor = spm.SentencePieceProcessor(model_file=str(model_path))

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def unk_id(self) -> int:
        return self.processor.unk_id()

    @property
    def pad_id(self) -> int | None:
        """None: the vocabulary has no pad piece (pad with eos_id where padding is unavoidable)."""
        pad = self.processor.pad_id()
        return pad if pad >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.processor.encode(list(texts), num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.processor.decode([int(i) for i in ids])


def resolve_model_path(path: str | Path) -> Path:
    """PREFIX.model, PREFIX (without suffix), or a directory holding tokenizer.model."""
    path = Path(path)
    candidates = [path, Path(f"{path}.model"), path / "tokenizer.model"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataToolsError(f"tokenizer not found: {path} (looked for {', '.join(map(str, candidates))})")


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer(resolve_model_path(path))


@dataclass(frozen=True)
class SampleGroup:
    """Inputs that share one character budget (one mix source, or all --input files)."""

    name: str
    inputs: tuple[str, ...]
    chars: int


def _document_key(seed: int, group: str, file_name: str, ordinal: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{group}\0{file_name}\0{ordinal}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def sample_group(group: SampleGroup, options: ReaderOptions, seed: int) -> list[tuple[int, str]]:
    """(key, text) of the documents with the smallest keys that fit the budget, sorted by key."""
    heap: list[tuple[int, str]] = []  # max-heap on key through negation
    total = 0
    for shard in expand_inputs(group.inputs):
        for ordinal, text in enumerate(iter_documents(shard, options)):
            key = _document_key(seed, group.name, shard.name, ordinal)
            if total >= group.chars and key > -heap[0][0]:
                continue
            heapq.heappush(heap, (-key, text))
            total += len(text)
            while total - len(heap[0][1]) >= group.chars:
                total -= len(heapq.heappop(heap)[1])
    return sorted((-negated, text) for negated, text in heap)


def _write_training_lines(samples: Iterable[tuple[int, str]], stream: TextIO) -> int:
    # sentencepiece reads one sentence per line; documents are split at their newlines.
    chars = 0
    for _, text in samples:
        for line in text.split("\n"):
            if line.strip():
                stream.write(line + "\n")
                chars += len(line)
    return chars


@dataclass(frozen=True)
class TrainerSettings:
    vocab_size: int = 32000
    character_coverage: float = 0.9999
    threads: int = os.cpu_count() or 1
    max_sentence_length: int = 16384


def _train_sentencepiece(corpus: Path, prefix: Path, settings: TrainerSettings) -> None:
    try:
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(prefix),
            model_type="bpe",
            vocab_size=settings.vocab_size,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            character_coverage=settings.character_coverage,
            max_sentence_length=settings.max_sentence_length,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            num_threads=settings.threads,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise DataToolsError(f"sentencepiece training failed: {error}") from None
    _forget_training_paths(Path(f"{prefix}.model"))


def _forget_training_paths(model: Path) -> None:
    # The model records its (temporary) input file and output prefix; drop them so the same
    # sample and settings give byte-identical models wherever they are trained.
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    del proto.trainer_spec.input[:]
    proto.trainer_spec.model_prefix = ""
    model.write_bytes(proto.SerializeToString())


def train_tokenizer(
    groups: Sequence[SampleGroup], output: str | Path, settings: TrainerSettings, options: ReaderOptions, seed: int
) -> Path:
    """Train on the sampled documents; write PREFIX.model, PREFIX.vocab and PREFIX.hf/."""
    if settings.vocab_size < MIN_VOCAB:
        raise DataToolsError(f"--vocab-size must be at least {MIN_VOCAB} (256 byte pieces + specials)")
    prefix = Path(output)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hgrn2-tokenizer-") as scratch:
        corpus = Path(scratch) / "sample.txt"
        with open(corpus, "w", encoding="utf-8") as stream:
            chars = sum(_write_training_lines(sample_group(group, options, seed), stream) for group in groups)
        if chars == 0:
            raise DataToolsError("the tokenizer sample is empty: the inputs hold no valid documents")
        _train_sentencepiece(corpus, prefix, settings)
    model = Path(f"{prefix}.model")
    write_hf_tokenizer_files(model, Path(f"{prefix}.hf"))
    return model


def sample_groups_from_args(args: argparse.Namespace, budget: int) -> list[SampleGroup]:
    if args.input:
        return [SampleGroup("files", tuple(args.input), budget)]
    spec = load_spec(args.mix)
    missing = [source.name for source in spec.sources if not source.raw]
    if missing:
        raise DataToolsError(f"mix spec {args.mix}: sources {missing} have no `raw` inputs to sample from")
    total_weight = sum(source.weight for source in spec.sources)
    return [
        SampleGroup(source.name, source.raw, max(1, round(budget * source.weight / total_weight)))
        for source in spec.sources
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hgrn2-train-tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--input", nargs="+", metavar="FILE_OR_GLOB", help="raw text files, directories or globs")
    where.add_argument("--mix", metavar="SPEC.yaml", help="sample each source's `raw` inputs by its weight")
    parser.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.model/.vocab/.hf/")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--sample-chars", default="100M", help="characters of text to train on (default 100M)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--character-coverage", type=float, default=0.9999)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    add_reader_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        budget = parse_count(args.sample_chars, "--sample-chars")
        settings = TrainerSettings(args.vocab_size, args.character_coverage, args.threads)
        model = train_tokenizer(sample_groups_from_args(args, budget), args.output, settings,
                                reader_options_from_args(args), args.seed)
    except (DataToolsError, ValueError) as error:
        print(f"hgrn2-train-tokenizer: error: {error}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(model)
    print(f"wrote {model} (vocab {tokenizer.vocab_size}), {args.output}.vocab and {args.output}.hf/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
