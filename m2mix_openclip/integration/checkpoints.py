"""Checkpoints a long run can rely on: written whole, chosen only when they load.

Saving is the protocol's :func:`.plugins.save_checkpoint` (a temporary file renamed into place,
never non-finite weights), which a patched OpenCLIP calls too. Here is what ``m2mix-train`` adds
around OpenCLIP's ``--resume``:

- :func:`checkpoint_problem`: a look at a file's ends that tells an empty, cut-short or foreign
  file from a whole checkpoint without loading it (the pre-flight message uses it);
- :func:`latest_loadable`: ``--resume latest`` takes OpenCLIP's choice when it loads, else the
  newest one that does, with a warning for each one skipped;
- :func:`remove_unfinished_saves`: the temporary files of saves that a killed process left.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import zipfile
from typing import Callable, List, Optional, Tuple

__all__ = ["CheckpointLoadError", "checkpoint_problem", "load_problem", "checkpoints_newest_first",
           "latest_loadable", "remove_unfinished_saves"]

# the temporary names of plugins.save_checkpoint: ".NAME.<random>.tmp"
UNFINISHED_SAVE = re.compile(r"^\..+\.pt\.[^./]+\.tmp$")


class CheckpointLoadError(RuntimeError):
    """``--resume`` of a checkpoint that does not load, or ``--resume latest`` where none loads;
    the message is one line naming the file and the reason."""


def checkpoint_problem(path: str) -> Optional[str]:
    """Why the file at ``path`` is not a whole checkpoint, judged from its ends without loading it
    ("is empty (0 bytes)", "is cut short ..."), or None where it looks whole (loading may still fail)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if size == 0:
        return "is empty (0 bytes)"
    if head == b"PK":  # torch's format: a zip whose directory is written last
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return (f"is cut short ({size} bytes and no zip directory at its end: a save that was interrupted or "
                    "ran out of space)")
        if not any(name.endswith("data.pkl") for name in names):
            return "is a zip file but not a torch checkpoint (no data.pkl in it)"
        return None
    if head[:1] == b"\x80":  # a pickle: torch's legacy format, only loading tells
        return None
    return "is not a torch checkpoint (neither torch's zip format nor a pickle)"


def load_problem(error: BaseException) -> str:
    """The reason a load failed, on one line (torch's messages run to dozens of lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def checkpoints_newest_first(folder: str, newest: Optional[str], sort_key: Callable[[str], object]) -> List[str]:
    """The ``*.pt`` files of ``folder``, ``newest`` (OpenCLIP's own choice) first, then the others
    by ``sort_key`` (OpenCLIP's natural order of names), last first."""
    found = set(glob.glob(os.path.join(glob.escape(folder), "*.pt")))
    rest = sorted(found - {newest}, key=sort_key, reverse=True)
    return ([newest] if newest else []) + rest


def latest_loadable(candidates: List[str], load: Callable[[str], object],
                    folder: str) -> Tuple[Optional[str], object]:
    """The first of ``candidates`` (newest first) that is whole and that ``load`` reads, with what
    it read: (path, checkpoint), or (None, None) where there are none. Each one skipped gets a
    warning that names it and why.

    Raises:
        CheckpointLoadError: there are checkpoints and none loads, or one cannot be read at all
            (an I/O error is the disk's, not the file's: going back to an older checkpoint would
            quietly throw away training).
    """
    skipped = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            try:
                return path, load(path)
            except OSError as e:
                raise CheckpointLoadError(f"--resume latest: {path} cannot be read ({e.strerror or e}); nothing was "
                                          "resumed: check the file system and run again") from None
            except Exception as e:  # a cut-short, foreign or refused (weights_only) file: the next one may load
                problem = f"cannot be loaded ({load_problem(e)})"
        skipped.append(f"{os.path.basename(path)} {problem}")
        logging.warning(f"--resume latest: skipped {path}: it {problem}")
    if skipped:
        raise CheckpointLoadError(
            f"--resume latest: none of the {len(skipped)} checkpoint(s) in {folder} loads ({skipped[0]}); remove them "
            "to start again, or --resume a checkpoint that loads")
    return None, None


def remove_unfinished_saves(folder: str) -> List[str]:
    """Removes the temporary files of saves that never finished (a process killed while saving:
    :func:`.plugins.save_checkpoint` removes its own otherwise) from ``folder``; returns their names."""
    removed = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if UNFINISHED_SAVE.match(name):
            path = os.path.join(folder, name)
            size = os.path.getsize(path)
            os.remove(path)
            removed.append(name)
            logging.info(f"removed {path} ({size / 1e6:.1f} MB), a checkpoint save that a stopped run never finished")
    return removed
