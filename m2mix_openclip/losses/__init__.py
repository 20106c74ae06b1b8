"""The m²-Mix loss family: drop-in replacements for OpenCLIP's losses.

- :mod:`.terms`: the formulas, as pure functions (tensors in, a scalar out);
- :mod:`.mixing`: the state every family shares (lambda generator, schedule, per-step draws);
- :mod:`.clip`: ``M2MixLoss``, for OpenCLIP's ``ClipLoss``.
"""

from .clip import M2MixLoss
from .mixing import MIX_PAIRINGS, MIX_SCHEDULES

__all__ = ["M2MixLoss", "MIX_SCHEDULES", "MIX_PAIRINGS"]
