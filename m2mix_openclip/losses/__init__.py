"""The m²-Mix loss family: drop-in replacements for OpenCLIP's losses.

- :mod:`.options`: ``MixOptions``, the options every family takes, checked in one place;
- :mod:`.terms`: the formulas, as pure functions (tensors in, a scalar out);
- :mod:`.mixing`: the state every family shares (lambda generator, schedule, per-step draws);
- :mod:`.clip`: ``M2MixLoss``, for OpenCLIP's ``ClipLoss`` (and the softmax mixing shared with
  :mod:`.coca`: ``M2MixCoCaLoss`` and :mod:`.distill`: ``M2MixDistillLoss``);
- :mod:`.siglip`: ``M2MixSigLipLoss``, for OpenCLIP's ``SigLipLoss`` (mixes as sigmoid negatives).
"""

from ..integration import openclip_compat
from .clip import M2MixLoss
from .coca import M2MixCoCaLoss
from .distill import M2MixDistillLoss
from .options import MIX_PAIRINGS, MIX_SCHEDULES, MixKeywords, MixOptions

if openclip_compat.has_siglip_loss():
    from .siglip import M2MixSigLipLoss
else:  # no SigLipLoss (nor --siglip) in this OpenCLIP; the other families work
    M2MixSigLipLoss = None

__all__ = ["M2MixLoss", "M2MixSigLipLoss", "M2MixCoCaLoss", "M2MixDistillLoss", "MixOptions", "MixKeywords",
           "MIX_SCHEDULES", "MIX_PAIRINGS"]
