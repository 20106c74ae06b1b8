"""Which m²-Mix loss a run gets: the family OpenCLIP itself would pick from its flags.

OpenCLIP 3.3.0's ``create_loss`` picks ``DistillClipLoss`` (``--distill-model``), else
``CoCaLoss`` ("coca" in ``--model``), else ``SigLipLoss`` (``--siglip``), else ``ClipLoss``;
``--loss m2mix`` picks the m²-Mix class of the same family, passing OpenCLIP's own arguments
the way ``create_loss`` does and the mixing options on top.
"""

from __future__ import annotations

from typing import Optional

from ..losses import M2MixCoCaLoss, M2MixDistillLoss, M2MixLoss, M2MixSigLipLoss
from ..losses.options import SIGLIP_UNIMODAL_REASON
from . import openclip_compat

__all__ = ["loss_family", "build_m2mix_loss", "validate_family", "FAMILY_CLASSES"]

FAMILY_CLASSES = {"distill": M2MixDistillLoss, "coca": M2MixCoCaLoss, "siglip": M2MixSigLipLoss, "clip": M2MixLoss}


def loss_family(args) -> str:
    """``"distill"``, ``"coca"``, ``"siglip"`` or ``"clip"``, in OpenCLIP's order of precedence."""
    distill = getattr(args, "distill", None)
    if distill is None:  # before OpenCLIP's main() sets it (at argument validation)
        distill = getattr(args, "distill_model", None) is not None
    if distill:
        return "distill"
    if "coca" in (getattr(args, "model", "") or "").lower():
        return "coca"
    if openclip_compat.siglip_requested(args):
        return "siglip"
    return "clip"


def validate_family(args) -> Optional[str]:
    """An argparse error message for mixing options the family cannot use, else None."""
    family = loss_family(args)
    if family == "siglip":
        unimodal = [f"--{n}-weight" for n in ("vmix", "lmix", "vlmix") if getattr(args, f"{n}_weight", 0) > 0]
        if unimodal:
            return f"{', '.join(unimodal)} cannot be combined with --siglip: {SIGLIP_UNIMODAL_REASON}"
        if getattr(args, "horovod", False):
            return "--siglip --loss m2mix does not support --horovod (OpenCLIP's SigLipLoss does not either)"
    return None


def build_m2mix_loss(args, **mixing):
    """The m²-Mix loss of the run's family; ``mixing``: the keywords of ``M2MixLoss`` after
    OpenCLIP's own (``options``, ``seed``, ``calls_per_step``, ``m2mix_weight``, ...)."""
    family = loss_family(args)
    # With --accum-freq N OpenCLIP calls the loss N times per optimizer step: one lambda per step.
    mixing.setdefault("calls_per_step", getattr(args, "accum_freq", 1))
    if family == "siglip":
        return M2MixSigLipLoss(rank=args.rank, world_size=args.world_size,
                               dist_impl=openclip_compat.loss_dist_impl(args), **mixing)
    softmax_args = dict(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, cache_labels=True,
                        rank=args.rank, world_size=args.world_size, use_horovod=args.horovod)
    if family == "coca":
        return M2MixCoCaLoss(caption_loss_weight=args.coca_caption_loss_weight,
                             clip_loss_weight=args.coca_contrastive_loss_weight, **softmax_args, **mixing)
    return FAMILY_CLASSES[family](**softmax_args, **mixing)
