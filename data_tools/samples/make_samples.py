"""Regenerate the shipped corpus samples from real public text.

Sources (see README.md in this folder for licences):
  * Debian `r-cran-janeaustenr`: Jane Austen's six novels (public domain), stored as R data.
  * Debian `python3.11-doc`: the CPython documentation as reStructuredText (PSF licence).
  * PyPI `gensim==4.4.0` wheel: its test data holds a slice of an English Wikipedia dump (CC BY-SA).

Outputs, one per corpus format that data_tools reads:
  pile_sample.jsonl.zst    Pile layout: {"text", "meta": {"pile_set_name"}}; Austen chapters as
                           "Gutenberg (PG-19)" and Python tutorial/how-to/FAQ/reference pages as
                           "PythonDocs", so subset filtering has two real subsets to work on.
  c4_sample.json.gz        C4 layout: {"text", "url", "timestamp"}; Python library reference pages.
  wikipedia_sample.parquet Hugging Face wikipedia layout: id, url, title, text (markup stripped).

Usage (needs apt-get, after `apt-get update`, and pip: network access to the Debian and PyPI registries):
  python data_tools/samples/make_samples.py [--download-dir /tmp/samples_src] [--out data_tools/samples]
The outputs are byte-identical across runs given the same source packages.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import io
import json
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

AUSTEN_DEB = "r-cran-janeaustenr"
PYDOC_DEB = "python3.11-doc"
GENSIM_WHEEL = "gensim==4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
AUSTEN_TITLES = ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"]
PILE_DOC_FOLDERS = ("tutorial", "howto", "faq", "reference", "using", "extending")
C4_TEXT_BUDGET_CHARS = 4_000_000
# Fixed so the gzip/parquet bytes do not depend on when the script runs.
C4_TIMESTAMP = "2023-02-07T00:00:00Z"


@dataclass(frozen=True)
class SampleSources:
    austen_rdb: Path
    pydoc_sources: Path
    wiki_dump_bz2: Path


def download_sources(download_dir: Path) -> SampleSources:
    """Fetch the Debian packages and the gensim wheel (if not there yet) and unpack what we need."""
    download_dir.mkdir(parents=True, exist_ok=True)
    for package in (AUSTEN_DEB, PYDOC_DEB):
        if not list(download_dir.glob(f"{package}_*.deb")):
            subprocess.run(["apt-get", "download", package], cwd=download_dir, check=True)
        deb = sorted(download_dir.glob(f"{package}_*.deb"))[-1]
        subprocess.run(["dpkg", "-x", str(deb), str(download_dir / package)], check=True)
    if not list(download_dir.glob("gensim-*.whl")):
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", GENSIM_WHEEL,
             "-d", str(download_dir)],
            check=True,
        )
    wheel = sorted(download_dir.glob("gensim-*.whl"))[-1]
    wiki = download_dir / "enwiki-shortened.xml.bz2"
    with zipfile.ZipFile(wheel) as archive:
        wiki.write_bytes(archive.read(WIKI_MEMBER))
    return SampleSources(
        austen_rdb=download_dir / AUSTEN_DEB / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb",
        pydoc_sources=download_dir / PYDOC_DEB / "usr/share/doc/python3.11/html/_sources",
        wiki_dump_bz2=wiki,
    )


# --- Jane Austen: R's lazy-load database is a run of (length, zlib stream) blocks, each an R
# serialisation (XDR, format 3) of one character vector holding a novel's lines.


def read_r_character_vectors(rdb_path: Path) -> list[list[str]]:
    data = rdb_path.read_bytes()
    vectors, position = [], 0
    while position < len(data):
        decompressor = zlib.decompressobj()
        block = decompressor.decompress(data[position + 4 :])
        position = len(data) - len(decompressor.unused_data)
        vectors.append(parse_r_string_vector(block))
    return vectors


def parse_r_string_vector(block: bytes) -> list[str]:
    assert block[:2] == b"X\n", "expected R XDR serialisation"
    offset = 2 + 12  # format version, writer R version, minimal reader R version
    (encoding_length,) = struct.unpack(">i", block[offset : offset + 4])
    offset += 4 + encoding_length
    flags, count = struct.unpack(">ii", block[offset : offset + 8])
    assert flags & 0xFF == 16, "expected a character vector (STRSXP)"
    offset += 8
    strings = []
    for _ in range(count):
        _, length = struct.unpack(">ii", block[offset : offset + 8])
        offset += 8
        if length < 0:  # NA_character_
            strings.append("")
            continue
        strings.append(block[offset : offset + length].decode("utf-8"))
        offset += length
    return strings


def austen_chapters(rdb_path: Path) -> Iterator[tuple[str, str]]:
    """(title, chapter text) pairs; a chapter starts at a line 'CHAPTER ...' / 'Chapter ...'."""
    for title, lines in zip(AUSTEN_TITLES, read_r_character_vectors(rdb_path), strict=True):
        chapter: list[str] = []
        for line in lines:
            if re.match(r"^(CHAPTER|Chapter) [IVXLC\d]+", line) and any(s.strip() for s in chapter):
                yield title, "\n".join(chapter).strip() + "\n"
                chapter = []
            chapter.append(line)
        if any(s.strip() for s in chapter):
            yield title, "\n".join(chapter).strip() + "\n"


# --- Python documentation (reStructuredText sources shipped beside the HTML)


def pydoc_pages(sources: Path, folders: tuple[str, ...] | None, exclude: tuple[str, ...]) -> Iterator[Path]:
    for page in sorted(sources.rglob("*.rst.txt")):
        top = page.relative_to(sources).parts[0]
        if (folders is None or top in folders) and top not in exclude:
            yield page


def pydoc_url(sources: Path, page: Path) -> str:
    relative = page.relative_to(sources).as_posix().removesuffix(".rst.txt")
    return f"https://docs.python.org/3.11/{relative}.html"


# --- Wikipedia: a MediaWiki XML dump; markup stripped with a few rules, enough for LM text.

WIKI_NAMESPACE = "{http://www.mediawiki.org/xml/export-0.10/}"
WIKI_RULES = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>", re.S), ""),
    (re.compile(r"<ref.*?</ref>", re.S), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),  # tables
    (re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I), ""),
    (re.compile(r"\[\[[^\]|]*\|([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[\[([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://[^\s\]]+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"\[https?://[^\]]*\]"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M), r"\2"),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"&nbsp;"), " "),
    (re.compile(r"\n{3,}"), "\n\n"),
]
WIKI_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")


def strip_wiki_markup(markup: str) -> str:
    previous = None
    while previous != markup:  # templates nest: remove innermost first until none is left
        previous, markup = markup, WIKI_TEMPLATE.sub("", markup)
    for pattern, replacement in WIKI_RULES:
        markup = pattern.sub(replacement, markup)
    return markup.strip()


def wikipedia_articles(dump_bz2: Path) -> Iterator[dict[str, str]]:
    with bz2.open(dump_bz2, "rb") as stream:
        for _, element in ElementTree.iterparse(stream):
            if element.tag != f"{WIKI_NAMESPACE}page":
                continue
            namespace = element.findtext(f"{WIKI_NAMESPACE}ns")
            title = element.findtext(f"{WIKI_NAMESPACE}title") or ""
            page_id = element.findtext(f"{WIKI_NAMESPACE}id") or ""
            markup = element.findtext(f"{WIKI_NAMESPACE}revision/{WIKI_NAMESPACE}text") or ""
            element.clear()
            if namespace != "0" or markup.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = strip_wiki_markup(markup)
            if len(text) > 200:
                url = f"https://en.wikipedia.org/wiki?curid={page_id}"
                yield {"id": page_id, "url": url, "title": title, "text": text}


# --- writers for the three corpus layouts


def write_pile_sample(sources: SampleSources, path: Path) -> None:
    lines = []
    for _, chapter in austen_chapters(sources.austen_rdb):
        lines.append({"text": chapter, "meta": {"pile_set_name": "Gutenberg (PG-19)"}})
    for page in pydoc_pages(sources.pydoc_sources, PILE_DOC_FOLDERS, ()):
        lines.append({"text": page.read_text(encoding="utf-8"), "meta": {"pile_set_name": "PythonDocs"}})
    payload = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")
    path.write_bytes(zstandard.ZstdCompressor(level=19).compress(payload))


def write_c4_sample(sources: SampleSources, path: Path) -> None:
    buffer, used = io.BytesIO(), 0
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=9, mtime=0) as stream:
        for page in pydoc_pages(sources.pydoc_sources, ("library",), ()):
            text = page.read_text(encoding="utf-8")
            record = {"text": text, "url": pydoc_url(sources.pydoc_sources, page), "timestamp": C4_TIMESTAMP}
            stream.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            used += len(text)
            if used >= C4_TEXT_BUDGET_CHARS:
                break
    path.write_bytes(buffer.getvalue())


def write_wikipedia_sample(sources: SampleSources, path: Path) -> None:
    articles = list(wikipedia_articles(sources.wiki_dump_bz2))
    table = pa.table({key: [article[key] for article in articles] for key in ("id", "url", "title", "text")})
    pq.write_table(table, path, compression="zstd", compression_level=19, row_group_size=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--download-dir", type=Path, default=Path("/tmp/hgrn2_sample_sources"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    sources = download_sources(args.download_dir)
    write_pile_sample(sources, args.out / "pile_sample.jsonl.zst")
    write_c4_sample(sources, args.out / "c4_sample.json.gz")
    write_wikipedia_sample(sources, args.out / "wikipedia_sample.parquet")
    for name in ("pile_sample.jsonl.zst", "c4_sample.json.gz", "wikipedia_sample.parquet"):
        print(f"{name}: {(args.out / name).stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
