"""All data steps for a mix spec whose sources list their `raw` inputs, in one command:

    python -m data_tools.prepare configs/data/demo_mix.yaml --tokenizer runs/data/demo_tokenizer

1. trains the tokenizer on a sample of the sources' raw inputs (skipped if PREFIX.model exists),
2. tokenizes each source's raw inputs into the source's `path` (resumes / skips finished work),
3. builds the mix (cached).
Each step is the same code as its own command (hgrn2-train-tokenizer, hgrn2-preprocess,
hgrn2-build-mix); this only chains them, e.g. for the CPU demo and the tests of the trainer.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from data_tools.errors import DataToolsError
from data_tools.mix import build_mix
from data_tools.mix_spec import load_spec
from data_tools.preprocess import PreprocessConfig, format_summary, preprocess
from data_tools.readers import ReaderOptions
from data_tools.tokenizer import SampleGroup, TrainerSettings, train_tokenizer
from data_tools.units import parse_count


def prepare(spec_path: str | Path, tokenizer: str | Path, vocab_size: int = 8000, sample_chars: int = 20_000_000,
            workers: int = os.cpu_count() or 1, progress: bool = True) -> Path:
    """Run the three steps; returns the mix's output_dir."""
    spec = load_spec(spec_path)
    missing = [source.name for source in spec.sources if not source.raw]
    if missing:
        raise DataToolsError(f"mix spec {spec_path}: sources {missing} have no `raw` inputs to prepare")
    model = Path(f"{tokenizer}.model")
    if not model.is_file():
        total = sum(source.weight for source in spec.sources)
        groups = [SampleGroup(s.name, s.raw, max(1, round(sample_chars * s.weight / total))) for s in spec.sources]
        train_tokenizer(groups, tokenizer, TrainerSettings(vocab_size=vocab_size), ReaderOptions(), seed=spec.seed)
        print(f"trained {model}")
    for source in spec.sources:
        config = PreprocessConfig(inputs=source.raw, tokenizer=str(model), output_prefix=Path(source.path),
                                  workers=workers, progress=progress)
        summary = preprocess(config)
        if summary is not None:
            print(format_summary(summary, Path(source.path)))
    return build_mix(spec)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", metavar="SPEC.yaml")
    parser.add_argument("--tokenizer", required=True, metavar="PREFIX", help="trained here unless PREFIX.model exists")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--sample-chars", default="20M")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        prepare(args.spec, args.tokenizer, args.vocab_size, parse_count(args.sample_chars, "--sample-chars"),
                args.workers, not args.no_progress)
    except (DataToolsError, ValueError) as error:
        print(f"data_tools.prepare: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
