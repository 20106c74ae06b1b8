"""The m²-Mix loss family: drop-in replacements for OpenCLIP's losses.

- :mod:`.terms`: the formulas, as pure functions (tensors in, a scalar out);
- :mod:`.mixing`: the state every family shares (lambda generator, schedule, per-step draws);
- :mod:`.clip`: ``M2MixLoss``, for OpenCLIP's ``ClipLoss`` (and the softmax mixing shared with
  :mod:`.coca`: ``M2MixCoCaLoss`` and :mod:`.distill`: ``M2MixDistillLoss``);
- :mod:`.siglip`: ``M2MixSigLipLoss``, for OpenCLIP's ``SigLipLoss`` (mixes as sigmoid negatives).
"""

from open_clip import loss as _open_clip_loss

from .clip import M2MixLoss
from .coca import M2MixCoCaLoss
from .distill import M2MixDistillLoss
from .mixing import MIX_PAIRINGS, MIX_SCHEDULES

if hasattr(_open_clip_loss, "SigLipLoss"):
    from .siglip import M2MixSigLipLoss
else:  # OpenCLIP 2.20 has no SigLipLoss (nor --siglip); the other families work there
    M2MixSigLipLoss = None

__all__ = ["M2MixLoss", "M2MixSigLipLoss", "M2MixCoCaLoss", "M2MixDistillLoss", "MIX_SCHEDULES", "MIX_PAIRINGS"]
