"""Output that ends with the run's result or its error.

OpenCLIP's ``setup_logging`` sets every existing logger, torch's included, to INFO; torch then
prints TorchDynamo and FakeTensor statistics from its exit handlers, after the last line of
the run. These helpers put torch's loggers back to WARNING, and hold back OpenCLIP's lines that
say nothing new: the "no pretrained weights" warning where a checkpoint is loaded right after,
and the ERROR line of a pretrained tag that cannot be had, which the tool's one-line error restates.
"""

from __future__ import annotations

import contextlib
import logging

__all__ = ["quiet_torch_loggers", "dropped_log_messages", "RANDOM_INIT", "PRETRAINED_FAILURE"]


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
    def __init__(self, fragments):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


@contextlib.contextmanager
def dropped_log_messages(*fragments: str):
    """Within the context, log records whose message holds any of ``fragments`` are dropped, on
    the root logger and on its handlers (records of other loggers propagate to those)."""
    handlers = list(logging.root.handlers) or [logging.lastResort]
    drop = _DropMessages(fragments)
    logging.root.addFilter(drop)
    for handler in handlers:
        handler.addFilter(drop)
    try:
        yield
    finally:
        logging.root.removeFilter(drop)
        for handler in handlers:
            handler.removeFilter(drop)
