"""Progress over input bytes (that gives the ETA) with documents/s and tokens/s.

On a terminal: a tqdm bar. Otherwise (batch jobs writing to a log file), a plain line every
`log_every` seconds, since a redrawn bar would fill the log with carriage returns.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from data_tools.units import format_count


class Progress:
    def __init__(self, total_bytes: int, enabled: bool, log_every: float = 30.0) -> None:
        self.start = time.perf_counter()
        self.total_bytes = total_bytes
        self.bytes_done = 0
        self.documents = 0
        self.tokens = 0
        self.log_every = log_every
        self._last_postfix = 0.0
        self._last_log = self.start
        interactive = enabled and sys.stderr.isatty()
        self._logging = enabled and not interactive
        self._bar = tqdm(
            total=total_bytes, unit="B", unit_scale=True, dynamic_ncols=True, file=sys.stderr,
            disable=not interactive, desc="tokenizing", mininterval=0.5,
        )

    def rates(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return f"{format_count(self.documents / elapsed)} docs/s, {format_count(self.tokens / elapsed)} tok/s"

    def advance(self, new_bytes: int, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        self.bytes_done += new_bytes
        now = time.perf_counter()
        if now - self._last_postfix > 0.5:
            self._bar.set_postfix_str(self.rates(), refresh=False)
            self._last_postfix = now
        if new_bytes:
            self._bar.update(new_bytes)
        if self._logging and now - self._last_log >= self.log_every:
            self._log_line(now)
            self._last_log = now

    def _log_line(self, now: float) -> None:
        done = self.bytes_done / max(self.total_bytes, 1)
        elapsed = now - self.start
        eta = elapsed * (1 - done) / done if done > 0 else float("nan")
        print(f"tokenizing: {done:6.1%} of {format_count(self.total_bytes)}B input, {self.rates()}, "
              f"elapsed {elapsed:.0f} s, ETA {eta:.0f} s", file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def close(self) -> None:
        self._bar.close()
