"""Loss plugins registered by this package: ``clip`` (OpenCLIP's own choice) and ``m2mix``."""

from __future__ import annotations

import argparse

from ..losses import MIX_PAIRINGS, MIX_SCHEDULES
from .families import build_m2mix_loss, validate_family
from .registry import LossPlugin


def _build_clip(args):
    # OpenCLIP's own choice (ClipLoss, or SigLIP / CoCa / distillation as its flags say), unchanged.
    from open_clip import create_loss
    return create_loss(args)


def _positive_float(text):
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _weight(text):
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _temperature(text):
    if text.lower() in ("none", "learned"):
        return None
    return _positive_float(text)


def _add_m2mix_arguments(parser):
    parser.add_argument("--m2mix-weight", type=_weight, default=0.02,
                        help="Weight of the m²-Mix term (0 turns it off). Default 0.02 (the reference's mmmix=0.01).")
    parser.add_argument("--m2mix-alpha", type=_positive_float, default=0.5,
                        help="lambda ~ Beta(a, a) for the m²-Mix term. Default 0.5.")
    parser.add_argument("--m2mix-temperature", type=_temperature, default=0.07,
                        help="Temperature of the m²-Mix logits, or 'learned' for the model's logit_scale "
                             "(with --siglip: a number t also fixes the bias at -1/t; 'learned' uses the model's "
                             "logit_bias). Default 0.07.")
    parser.add_argument("--mix-schedule", choices=MIX_SCHEDULES, default="inverse-epoch",
                        help="Multiply every mixing term by 1/(epoch+1) ('inverse-epoch', default) or by 1.")
    parser.add_argument("--vmix-weight", type=_weight, default=0.0, help="Weight of V-Mix (image-image). Default 0.")
    parser.add_argument("--lmix-weight", type=_weight, default=0.0, help="Weight of L-Mix (text-text). Default 0.")
    parser.add_argument("--vlmix-weight", type=_weight, default=0.0, help="Weight of VL-Mix (both). Default 0.")
    parser.add_argument("--unimix-alpha", type=_positive_float, default=0.5,
                        help="lambda ~ Beta(a, a) for V-Mix, L-Mix and VL-Mix. Default 0.5.")
    parser.add_argument("--mix-pairing", choices=MIX_PAIRINGS, default="reverse",
                        help="Partner of sample i for the uni-modal mixes: N-1-i ('reverse', default) or a random permutation.")
    parser.add_argument("--mix-seed", type=int, default=None,
                        help="Seed of the loss's lambda generator (the same on every rank). Default: --seed.")


def _validate_m2mix(args):
    family_error = validate_family(args)  # SigLIP, CoCa and distillation get their own m²-Mix loss
    if family_error:
        return family_error
    if args.m2mix_weight == 0 and args.vmix_weight == 0 and args.lmix_weight == 0 and args.vlmix_weight == 0:
        return "--loss m2mix with every mixing weight at 0 is OpenCLIP's own loss; use --loss clip (or set a weight > 0)"
    return None


def _build_m2mix(args):
    return build_m2mix_loss(
        args,
        m2mix_weight=args.m2mix_weight,
        m2mix_alpha=args.m2mix_alpha,
        m2mix_temperature=args.m2mix_temperature,
        vmix_weight=args.vmix_weight,
        lmix_weight=args.lmix_weight,
        vlmix_weight=args.vlmix_weight,
        unimix_alpha=args.unimix_alpha,
        mix_pairing=args.mix_pairing,
        mix_schedule=args.mix_schedule,
        seed=args.seed if args.mix_seed is None else args.mix_seed,
    )


CLIP_LOSS = LossPlugin(build=_build_clip, description="OpenCLIP's own loss (ClipLoss, or SigLIP/CoCa/distillation by its flags)")
M2MIX_LOSS = LossPlugin(build=_build_m2mix, add_arguments=_add_m2mix_arguments, validate=_validate_m2mix,
                        description="OpenCLIP's loss (CLIP, SigLIP, CoCa or distillation) + geodesic multi-modal mixup (Oh et al., NeurIPS 2023)")
