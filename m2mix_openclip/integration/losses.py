"""The ``m2mix`` loss plugin. (``clip``, OpenCLIP's own choice, is registered as
:data:`.plugins.OPENCLIP_LOSS`, the protocol's fallback for that name.)"""

from __future__ import annotations

import logging

from ..losses.options import add_flags, options_from_args
from .families import build_m2mix_loss, resolve_family_defaults, validate_family, weight_note
from .registry import LossPlugin


def _add_m2mix_arguments(parser):
    add_flags(parser)  # one flag per MixOptions field
    parser.add_argument("--mix-seed", type=int, default=None,
                        help="Seed of the loss's lambda generator (the same on every rank). Default: --seed.")


def _validate_m2mix(args):
    family_error = validate_family(args)  # SigLIP, CoCa and distillation get their own m²-Mix loss
    if family_error:
        return family_error
    resolve_family_defaults(args)  # --m2mix-weight left out: the family's default
    if not options_from_args(args).enabled_terms:
        return ("--loss m2mix with every mixing weight at 0 is OpenCLIP's own loss; use --loss clip "
                "(or set a weight > 0)")
    return None


def _build_m2mix(args):
    # The processes OpenCLIP actually started, which the environment only foretold at parsing.
    resolve_family_defaults(args, world_size=args.world_size)
    logging.info(f"--loss m2mix: {weight_note(args, args.world_size)}")
    return build_m2mix_loss(args, options=options_from_args(args),
                            seed=args.seed if args.mix_seed is None else args.mix_seed)


M2MIX_LOSS = LossPlugin(build=_build_m2mix, add_arguments=_add_m2mix_arguments, validate=_validate_m2mix,
                        description="OpenCLIP's loss (CLIP, SigLIP, CoCa or distillation) + geodesic multi-modal "
                                    "mixup (Oh et al., NeurIPS 2023)")
