"""The mix spec: a YAML file (or dict) describing a blended training set. See docs/data.md.

    output_dir: runs/data/demo_mix      # where hgrn2-build-mix writes the sample index
    seq_length: 256                     # tokens per sample (each sample holds seq_length + 1)
    target_tokens: 4M                   # training tokens: 4M, 100B, 1_000_000 ...
    seed: 1234
    valid_fraction: 0.01                # share of each source's documents held out for "valid"
    sources:
      - name: wiki
        path: runs/data/wikipedia       # a dataset prefix (PREFIX.bin/.idx) or a glob of prefixes
        weight: 0.3
        raw: [data_tools/samples/wikipedia_sample.parquet]   # optional: raw text, for the tokenizer

Relative paths are taken relative to the current directory. Weights need not sum to 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from data_tools.errors import SpecError
from data_tools.units import parse_count

_TOP_KEYS = {"output_dir", "seq_length", "target_tokens", "seed", "valid_fraction", "sources", "vocab_size", "eod_id"}
_SOURCE_KEYS = {"name", "path", "weight", "raw"}


@dataclass(frozen=True)
class SourceSpec:
    name: str
    path: str
    weight: float
    raw: tuple[str, ...] = ()


@dataclass(frozen=True)
class MixSpec:
    sources: tuple[SourceSpec, ...]
    output_dir: Path
    target_tokens: int
    seq_length: int
    seed: int = 1234
    valid_fraction: float = 0.0
    vocab_size: int | None = None  # only needed when a dataset has no PREFIX.meta.json
    eod_id: int | None = None

    def identity(self) -> dict[str, Any]:
        """What the sample index depends on (not where it is written)."""
        return {
            "sources": [{"name": s.name, "path": s.path, "weight": s.weight} for s in self.sources],
            "target_tokens": self.target_tokens,
            "seq_length": self.seq_length,
            "seed": self.seed,
            "valid_fraction": self.valid_fraction,
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
        }


class _Checker:
    """Validates values, naming the spec and the field in every error."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def fail(self, field: str, message: str) -> SpecError:
        return SpecError(f"mix spec {self.origin}: {field}: {message}")

    def integer(self, value: Any, field: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(field, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def count(self, value: Any, field: str) -> int:
        try:
            return parse_count(value, field)
        except ValueError as error:
            raise self.fail(field, str(error).split(": ", 1)[1]) from None

    def fraction(self, value: Any, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise self.fail(field, f"expected a number in [0, 1), got {value!r}")
        return float(value)

    def text(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(field, f"expected a non-empty string, got {value!r}")
        return value

    def keys(self, mapping: Any, allowed: set[str], required: set[str], field: str) -> None:
        if not isinstance(mapping, dict):
            raise self.fail(field, f"expected a mapping, got {type(mapping).__name__}")
        unknown = sorted(set(mapping) - allowed)
        if unknown:
            raise self.fail(field, f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        missing = sorted(required - set(mapping))
        if missing:
            raise self.fail(field, f"missing key(s) {missing}")


def _source(checker: _Checker, raw: Any, index: int) -> SourceSpec:
    field = f"sources[{index}]"
    checker.keys(raw, _SOURCE_KEYS, {"path", "weight"}, field)
    weight = raw["weight"]
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        raise checker.fail(f"{field}.weight", f"expected a number > 0, got {weight!r}")
    inputs = raw.get("raw", [])
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not all(isinstance(item, str) for item in inputs):
        raise checker.fail(f"{field}.raw", f"expected a list of paths or globs, got {inputs!r}")
    path = checker.text(raw["path"], f"{field}.path")
    name = checker.text(raw.get("name", Path(path).name), f"{field}.name")
    return SourceSpec(name=name, path=path, weight=float(weight), raw=tuple(inputs))


def parse_spec(raw: Any, origin: str = "<dict>") -> MixSpec:
    checker = _Checker(origin)
    checker.keys(raw, _TOP_KEYS, {"output_dir", "seq_length", "target_tokens", "sources"}, "top level")
    sources_raw = raw["sources"]
    if not isinstance(sources_raw, list) or not sources_raw:
        raise checker.fail("sources", "expected a non-empty list of sources")
    sources = tuple(_source(checker, item, i) for i, item in enumerate(sources_raw))
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise checker.fail("sources", f"source names must be unique, got {names}")
    optional = {key: raw.get(key) for key in ("vocab_size", "eod_id")}
    return MixSpec(
        sources=sources,
        output_dir=Path(checker.text(str(raw["output_dir"]), "output_dir")),
        target_tokens=checker.count(raw["target_tokens"], "target_tokens"),
        seq_length=checker.integer(raw["seq_length"], "seq_length", 1),
        seed=checker.integer(raw.get("seed", 1234), "seed", 0),
        valid_fraction=checker.fraction(raw.get("valid_fraction", 0.0), "valid_fraction"),
        vocab_size=None if optional["vocab_size"] is None else checker.integer(optional["vocab_size"], "vocab_size", 1),
        eod_id=None if optional["eod_id"] is None else checker.integer(optional["eod_id"], "eod_id", 0),
    )


def load_spec(spec: str | Path | dict[str, Any] | MixSpec) -> MixSpec:
    """A MixSpec from a YAML path, a dict with the same keys, or a MixSpec."""
    if isinstance(spec, MixSpec):
        return spec
    if isinstance(spec, dict):
        return parse_spec(spec)
    path = Path(spec)
    if not path.is_file():
        raise SpecError(f"mix spec not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise SpecError(f"mix spec {path}: not valid YAML: {error}") from None
    return parse_spec(raw, str(path))
