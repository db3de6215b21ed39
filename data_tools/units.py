"""Human-friendly counts: `100B`, `4M`, `2.5k`, `1_000_000` or plain integers."""

from __future__ import annotations

_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(value: int | float | str, what: str) -> int:
    """A positive integer count; `what` names the setting in the error message."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a count such as 1000000 or 100B, got {value!r}")
    if isinstance(value, int | float):
        number = value
    elif isinstance(value, str):
        text = value.strip().replace("_", "").replace(",", "").lower()
        scale = _SUFFIXES.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in _SUFFIXES else text
        try:
            number = float(digits) * scale
        except ValueError:
            raise ValueError(f"{what}: expected a count such as 1000000 or 100B, got {value!r}") from None
    else:
        raise ValueError(f"{what}: expected a count such as 1000000 or 100B, got {value!r}")
    if number <= 0 or number != int(number):
        raise ValueError(f"{what}: expected a positive whole count, got {value!r}")
    return int(number)


def format_count(value: float) -> str:
    for suffix, scale in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.0f}"
