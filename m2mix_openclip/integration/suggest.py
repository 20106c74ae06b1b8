"""Did-you-mean suggestions for mistyped command-line flags."""

from __future__ import annotations

import difflib
import re
from typing import Iterable, Optional

__all__ = ["suggest_flags"]


def suggest_flags(message: str, known: Iterable[str]) -> Optional[str]:
    """For argparse's ``unrecognized arguments: ...`` message, one line naming each unknown flag
    with the nearest known one (``--m2mix-wieght``: did you mean ``--m2mix-weight``?), or None
    when the message is another error or nothing is near."""
    match = re.match(r"unrecognized arguments: (.*)", message)
    if not match:
        return None
    known = sorted({k for k in known if k.startswith("--")})
    parts = []
    for token in match.group(1).split():
        if not token.startswith("--"):
            continue
        flag = token.split("=", 1)[0]
        # a known flag it abbreviates (abbreviations are off), else the closest spelling
        close = [k for k in known if k.startswith(flag)][:1] or difflib.get_close_matches(flag, known, n=1, cutoff=0.7)
        parts.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
    if not parts:
        return None
    return "unrecognized arguments: " + ", ".join(parts)
