"""Progress of the tools: tqdm bars on a terminal, plain lines anywhere else.

Written to a file or a pipe (a log, CI, ``2> run.log``), tqdm's bars become carriage returns, and
nested bars the cursor-up sequence ``ESC [A`` in the middle of the text. Where the stream is not a
terminal, :func:`progress` gives :class:`PlainProgress` instead: one whole line when the work
starts a new stage (``m2mix-demo: 1/5 stages (20%) pre-training (standard CLIP loss)``), or at
every quarter of a count (``pretrained: test: images: 256/449 images (57%)``), and when it is done.
"""

from __future__ import annotations

import sys
from typing import IO, Optional

__all__ = ["progress", "PlainProgress"]


class PlainProgress:
    """tqdm's ``update`` / ``set_postfix_str`` / ``close`` as whole lines: a line when the postfix
    (the stage) changes and when the work is done; without a postfix, also when the count passes a
    multiple of ``step`` of the total."""

    def __init__(self, total: int, desc: str, unit: str = "it", stream: Optional[IO[str]] = None,
                 step: float = 0.25):
        self.total, self.desc, self.unit, self.step = max(0, int(total)), desc, unit, step
        self.stream = stream if stream is not None else sys.stderr
        self.n, self.postfix, self._printed = 0, "", -1

    def _quarter(self) -> int:
        return int(self.n / self.total / self.step + 1e-9) if self.total else 0

    def _line(self) -> None:
        percent = int(100 * self.n / self.total) if self.total else 100
        text = f"{self.desc}: {self.n}/{self.total} {self.unit} ({percent}%)"
        self.stream.write(text + (f" {self.postfix}" if self.postfix else "") + "\n")
        self.stream.flush()
        self._printed = self._quarter()

    def update(self, n: int = 1) -> None:
        self.n += n
        done = self.total and self.n >= self.total
        if (done or not self.postfix) and self._quarter() > self._printed:
            self._line()

    def set_postfix_str(self, text: str) -> None:
        if text != self.postfix:
            self.postfix = text
            self._line()

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent(PlainProgress):
    def _line(self) -> None:
        pass


def progress(total: int, desc: str, unit: str = "it", leave: bool = True, enabled: bool = True,
             stream: Optional[IO[str]] = None):
    """A progress display of ``total`` steps on ``stream`` (default stderr): a tqdm bar where the
    stream is a terminal, else :class:`PlainProgress` lines; nothing when not ``enabled``."""
    stream = stream if stream is not None else sys.stderr
    if not enabled:
        return _Silent(total, desc, unit, stream)
    if getattr(stream, "isatty", lambda: False)():
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=stream)
    return PlainProgress(total, desc, unit, stream)
