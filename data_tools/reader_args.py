"""Command-line options shared by every command that reads raw text (tokenizer, preprocess)."""

from __future__ import annotations

import argparse

from data_tools.readers import TXT_SAMPLE_MODES, ReaderOptions


def add_reader_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-field", default="text", help="JSON key / Parquet column of the text")
    subsets = parser.add_mutually_exclusive_group()
    subsets.add_argument("--keep-subsets", nargs="+", default=(), metavar="NAME",
                         help="Pile: keep only records whose meta.pile_set_name is one of these")
    subsets.add_argument("--drop-subsets", nargs="+", default=(), metavar="NAME",
                         help="Pile: drop records whose meta.pile_set_name is one of these")
    parser.add_argument("--txt-sample-by", choices=TXT_SAMPLE_MODES, default="line",
                        help=".txt files: one document per line (default), paragraph or file")


def reader_options_from_args(args: argparse.Namespace, batch_records: int = 256) -> ReaderOptions:
    return ReaderOptions(
        text_field=args.text_field,
        keep_subsets=tuple(args.keep_subsets),
        drop_subsets=tuple(args.drop_subsets),
        txt_sample_by=args.txt_sample_by,
        batch_records=batch_records,
    )
