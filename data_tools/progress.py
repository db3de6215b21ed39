"""A progress bar over input bytes (that gives the ETA) showing documents/s and tokens/s."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from data_tools.units import format_count


class Progress:
    def __init__(self, total_bytes: int, enabled: bool) -> None:
        self.start = time.perf_counter()
        self.documents = 0
        self.tokens = 0
        self._last_postfix = 0.0
        self._bar = tqdm(
            total=total_bytes, unit="B", unit_scale=True, dynamic_ncols=True, file=sys.stderr,
            disable=not enabled, desc="tokenizing", mininterval=0.5,
        )

    def advance(self, new_bytes: int, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        now = time.perf_counter()
        if now - self._last_postfix > 0.5:
            elapsed = max(now - self.start, 1e-9)
            rates = f"{format_count(self.documents / elapsed)} docs/s, {format_count(self.tokens / elapsed)} tok/s"
            self._bar.set_postfix_str(rates, refresh=False)
            self._last_postfix = now
        if new_bytes:
            self._bar.update(new_bytes)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def close(self) -> None:
        self._bar.close()
