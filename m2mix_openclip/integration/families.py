"""Which m²-Mix loss a run gets: the family OpenCLIP itself would pick from its flags.

OpenCLIP 3.3.0's ``create_loss`` picks ``DistillClipLoss`` (``--distill-model``), else
``CoCaLoss`` ("coca" in ``--model``), else ``SigLipLoss`` (``--siglip``), else ``ClipLoss``;
``--loss m2mix`` picks the m²-Mix class of the same family, passing OpenCLIP's own arguments
the way ``create_loss`` does and the mixing options on top.
"""

from __future__ import annotations

import importlib
from dataclasses import fields
from typing import Optional

from ..losses import M2MixCoCaLoss, M2MixDistillLoss, M2MixLoss, M2MixSigLipLoss
from ..losses.options import MixOptions, siglip_default_weight, siglip_unimodal_error
from . import openclip_compat

__all__ = ["loss_family", "build_m2mix_loss", "validate_family", "FAMILY_CLASSES", "global_batch",
           "resolve_family_defaults", "weight_note"]

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
        unimodal = siglip_unimodal_error(args, as_flags=True)
        if unimodal:
            return unimodal
        if getattr(args, "horovod", False):
            return "--siglip --loss m2mix does not support --horovod (OpenCLIP's SigLipLoss does not either)"
    return None


def _world_size_from_env() -> int:
    """The number of processes, as OpenCLIP's trainer will read it from the launcher's environment
    (torchrun, SLURM, MPI) with its own ``world_info_from_env``."""
    trainer = openclip_compat.require_trainer()
    return importlib.import_module(f"{trainer.package}.distributed").world_info_from_env()[2]


def global_batch(args, world_size: int) -> int:
    """The pairs the loss sees at one call: ``--batch-size`` x processes x ``--accum-freq`` (with
    accumulation OpenCLIP calls the loss with every micro-batch's features)."""
    return int(args.batch_size) * int(world_size) * max(1, int(getattr(args, "accum_freq", 1) or 1))


def resolve_family_defaults(args, world_size: Optional[int] = None) -> None:
    """Sets each mixing flag left at "the family's default" (None; ``--m2mix-weight``) to that
    default: 0.02, or with ``--siglip`` ``siglip_default_weight(G)`` for the global batch G at
    ``world_size`` processes (default: as the launcher's environment says). A weight the user
    passed is kept. ``args.m2mix_weight_default`` records whether the family's default was taken."""
    defaulted = getattr(args, "m2mix_weight_default", None)
    if defaulted is None:
        defaulted = getattr(args, "m2mix_weight", None) is None
        args.m2mix_weight_default = defaulted
    if not defaulted:
        return
    if loss_family(args) == "siglip":
        world_size = _world_size_from_env() if world_size is None else world_size
        args.m2mix_weight = siglip_default_weight(global_batch(args, world_size))
    else:
        args.m2mix_weight = next(f.default for f in fields(MixOptions) if f.name == "m2mix_weight")


def weight_note(args, world_size: int) -> str:
    """Which ``--m2mix-weight`` a run uses and why, for its log."""
    if not getattr(args, "m2mix_weight_default", False):
        return f"--m2mix-weight {args.m2mix_weight:g} (given)"
    if loss_family(args) == "siglip":
        return (f"--m2mix-weight {args.m2mix_weight:g} (the --siglip default 0.02 x (G - 1) for the global batch "
                f"G = {global_batch(args, world_size)}: --batch-size {args.batch_size} x {world_size} processes"
                f" x --accum-freq {max(1, int(getattr(args, 'accum_freq', 1) or 1))})")
    return f"--m2mix-weight {args.m2mix_weight:g} (the default)"


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
