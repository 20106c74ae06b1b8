"""Output that ends with the run's result or its error.

OpenCLIP's ``setup_logging`` sets every existing logger, torch's included, to INFO; torch then
prints TorchDynamo and FakeTensor statistics from its exit handlers, after the last line of
the run. These helpers put torch's loggers back to WARNING, and hold back OpenCLIP's lines that
say nothing new: the "no pretrained weights" warning where a checkpoint is loaded right after,
and the ERROR line of a pretrained tag that cannot be had, which the tool's one-line error restates.
Where the output is not a terminal (a log file, a scheduler's output), progress bars become
plain lines (:class:`LineProgress`) instead of one line redrawn with carriage returns.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Callable, Optional

import tqdm

__all__ = ["quiet_torch_loggers", "dropped_log_messages", "RANDOM_INIT", "PRETRAINED_FAILURE", "LineProgress",
           "plain_progress"]


def quiet_torch_loggers(level: int = logging.WARNING) -> None:
    """Sets torch's own loggers (``torch``, ``torch._dynamo...``) to ``level``; our and
    OpenCLIP's loggers keep theirs."""
    names = [n for n in list(logging.root.manager.loggerDict) if n == "torch" or n.startswith("torch.")]
    for name in names + ["torch"]:
        logging.getLogger(name).setLevel(level)


# OpenCLIP's log lines that a tool holds back, and why
RANDOM_INIT = ("No pretrained weights loaded", "no CLIP weights found")  # a checkpoint is loaded right after
PRETRAINED_FAILURE = ("Failed to download weights for tag", "Pretrained tag or path (")  # restated in the error


class _DropMessages(logging.Filter):
    def __init__(self, fragments, when):
        super().__init__()
        self.fragments, self.when = fragments, when

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (any(fragment in message for fragment in self.fragments) and (self.when is None or self.when()))


@contextlib.contextmanager
def dropped_log_messages(*fragments: str, when: Optional[Callable[[], bool]] = None):
    """Within the context, log records whose message holds any of ``fragments`` (and, where
    ``when`` is given, that are logged while ``when()`` is true) are dropped, on the root logger and
    on its handlers (records of other loggers propagate to those). Handlers set up later (OpenCLIP's
    ``setup_logging``) get the root logger's filter only: the records logged to the root logger."""
    handlers = list(logging.root.handlers) or [logging.lastResort]
    drop = _DropMessages(fragments, when)
    logging.root.addFilter(drop)
    for handler in handlers:
        handler.addFilter(drop)
    try:
        yield
    finally:
        logging.root.removeFilter(drop)
        for handler in handlers:
            handler.removeFilter(drop)


class _PlainLines:
    """A text stream for tqdm that writes each state of the bar it is given as a line of its own:
    tqdm redraws a bar by writing a carriage return and the new state."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, text: str) -> None:
        for part in text.replace("\r", "\n").split("\n"):
            line = part.strip()
            if line and line != self.last:
                self.stream.write(line + "\n")
                self.last = line

    def flush(self) -> None:
        self.stream.flush()


class LineProgress(tqdm.tqdm):
    """``tqdm`` for output that is not a terminal: a plain line at most every 30 s (``mininterval``)
    and at the end, where a bar would be redrawn with carriage returns."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("mininterval", 30.0)
        kwargs.setdefault("ascii", True)
        kwargs["file"] = _PlainLines(kwargs.get("file") or sys.stderr)
        super().__init__(*args, **kwargs)


@contextlib.contextmanager
def plain_progress(*modules):
    """Within the context, where stderr is not a terminal, ``tqdm.tqdm`` and the ``tqdm`` name of
    each of ``modules`` (bound by ``from tqdm import tqdm``) are :class:`LineProgress`."""
    if sys.stderr.isatty():
        yield
        return
    saved = [(target, target.tqdm) for target in [tqdm, *modules] if getattr(target, "tqdm", None) is tqdm.tqdm]
    for target, _ in saved:
        target.tqdm = LineProgress
    try:
        yield
    finally:
        for target, original in saved:
            target.tqdm = original
