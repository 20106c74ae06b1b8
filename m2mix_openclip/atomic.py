"""Files written whole or not at all: a temporary file beside the target, then ``os.replace``.

A run that stops (an error, a full disk, Ctrl-C) while a tool writes leaves the old file or no
file, never a truncated one that a later reader would take for a result.
"""

from __future__ import annotations

import json
from typing import IO, Callable

from .integration.plugins import write_whole

__all__ = ["write_atomically", "write_json"]


def write_atomically(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Calls ``write(f)`` on a binary temporary file in ``path``'s folder, then moves it to
    ``path`` in one step; on any error the temporary file is removed and the error raised. The
    protocol module's :func:`~m2mix_openclip.integration.plugins.write_whole`, which checkpoints
    use too (a patched OpenCLIP carries it)."""
    write_whole(path, write)


def write_json(path: str, payload) -> None:
    """``payload`` as indented JSON at ``path``, written atomically (:func:`write_atomically`)."""
    text = json.dumps(payload, indent=2)  # serialised first: an unserialisable payload writes nothing
    write_atomically(path, lambda f: f.write(text.encode()))
