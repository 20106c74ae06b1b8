"""Files written whole or not at all: a temporary file beside the target, then ``os.replace``.

A run that stops (an error, a full disk, Ctrl-C) while a tool writes leaves the old file or no
file, never a truncated one that a later reader would take for a result.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import IO, Callable

__all__ = ["write_atomically", "write_json"]


def write_atomically(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Calls ``write(f)`` on a binary temporary file in ``path``'s folder, then moves it to
    ``path`` in one step; on any error the temporary file is removed and the error raised."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # as open() would make it: mkstemp's file is private (0600)
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_json(path: str, payload) -> None:
    """``payload`` as indented JSON at ``path``, written atomically (:func:`write_atomically`)."""
    text = json.dumps(payload, indent=2)  # serialised first: an unserialisable payload writes nothing
    write_atomically(path, lambda f: f.write(text.encode()))
