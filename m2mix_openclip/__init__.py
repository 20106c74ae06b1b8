"""m2mix-openclip: geodesic multi-modal mixup for robust CLIP fine-tuning, on OpenCLIP.

The maths (``geodesic_mix``, ``M2MixLoss``, ``embedding_geometry``) has no dependency on
OpenCLIP's trainer; ``m2mix_openclip.integration`` is the only place that knows it.
"""

from .losses import M2MixCoCaLoss, M2MixDistillLoss, M2MixLoss, M2MixSigLipLoss
from .metrics import embedding_geometry
from .mixup import geodesic_mix, sample_beta

__all__ = ["geodesic_mix", "sample_beta", "M2MixLoss", "M2MixSigLipLoss", "M2MixCoCaLoss", "M2MixDistillLoss",
           "embedding_geometry"]
__version__ = "0.1.0"
