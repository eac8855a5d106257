"""Progress lines for long stages: one line every few seconds, never one per row."""

from __future__ import annotations

import logging
import time


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Logs ``label done/total (rate/s, ETA) extra`` at most every ``interval`` seconds (``total`` may be None)."""

    def __init__(self, logger: logging.Logger, label: str, total: int | None, interval: float = 5.0):
        self.logger, self.label, self.total, self.interval = logger, label, total, interval
        self.start = self._last = time.monotonic()

    def rate(self, done: int) -> float:
        return done / max(time.monotonic() - self.start, 1e-9)

    def line(self, done: int, extra: str = "") -> str:
        rate = self.rate(done)
        if self.total is None:  # a stream of unknown length
            return f"{self.label} {done} ({rate:.1f}/s){' ' + extra if extra else ''}"
        eta = _duration((self.total - done) / rate) if rate > 0 else "?"
        pct = 100.0 * done / self.total if self.total else 100.0
        return f"{self.label} {done}/{self.total} ({pct:.1f}%, {rate:.1f}/s, ETA {eta}){' ' + extra if extra else ''}"

    def maybe_log(self, done: int, extra: str = "") -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.logger.info(self.line(done, extra))

    def finish(self, done: int, extra: str = "") -> None:
        self.logger.info(self.line(done, extra) + f" in {_duration(time.monotonic() - self.start)}")
