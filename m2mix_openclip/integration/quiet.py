"""Output that ends with the run's result or its error.

OpenCLIP's ``setup_logging`` sets every existing logger, torch's included, to INFO; torch then
prints TorchDynamo and FakeTensor statistics from its exit handlers, after the last line of
the run. These helpers put torch's loggers back to WARNING, and hold back the
"no pretrained weights" warning where a checkpoint is loaded right after.
"""

from __future__ import annotations

import contextlib
import logging

__all__ = ["quiet_torch_loggers", "no_random_init_warning"]


def quiet_torch_loggers(level: int = logging.WARNING) -> None:
    """Sets torch's own loggers (``torch``, ``torch._dynamo...``) to ``level``; our and
    OpenCLIP's loggers keep theirs."""
    names = [n for n in list(logging.root.manager.loggerDict) if n == "torch" or n.startswith("torch.")]
    for name in names + ["torch"]:
        logging.getLogger(name).setLevel(level)


class _DropRandomInit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("No pretrained weights loaded" in message or "no CLIP weights found" in message)


@contextlib.contextmanager
def no_random_init_warning():
    """Within the context, OpenCLIP's "Model initialized randomly" warnings are dropped: for tools
    that load a checkpoint into the model right after creating it."""
    handlers = list(logging.root.handlers) or [logging.lastResort]
    drop = _DropRandomInit()
    logging.root.addFilter(drop)
    for handler in handlers:
        handler.addFilter(drop)
    try:
        yield
    finally:
        logging.root.removeFilter(drop)
        for handler in handlers:
            handler.removeFilter(drop)
