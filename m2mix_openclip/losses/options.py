"""The mixing options, in one place: ``MixOptions`` validates itself, and the loss
constructors, the ``--loss m2mix`` command-line flags and the README's flag table all follow
from its fields. Nothing here knows OpenCLIP's trainer.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Optional

__all__ = ["MixOptions", "MIX_SCHEDULES", "MIX_PAIRINGS", "add_flags", "options_from_args", "flag_table"]

MIX_SCHEDULES = ("inverse-epoch", "constant")
MIX_PAIRINGS = ("reverse", "random")


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def weight_value(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a weight must be >= 0 (0 turns the term off), got {text!r}")
    return value


def positive_value(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def temperature_value(text: str) -> Optional[float]:
    if text.lower() in ("learned", "none"):
        return None
    try:
        return positive_value(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a temperature > 0 (e.g. 0.07) or 'learned' for the model's logit_scale, got {text!r}") from None


def _option(default, flag_help: str, parse=None, choices=None, shown: Optional[str] = None):
    return field(default=default, metadata={"help": flag_help, "parse": parse, "choices": choices, "shown": shown})


@dataclass(frozen=True)
class MixOptions:
    """The options of every m²-Mix loss (see ``M2MixLoss`` for the maths); ``ValueError`` names a bad one."""

    m2mix_weight: float = _option(0.02, "Weight of the m²-Mix term (0 turns it off); the reference's mmmix 0.01 "
                                         "(it sums the two directions, we average them)", weight_value)
    m2mix_alpha: float = _option(0.5, "lambda ~ Beta(a, a) for the m²-Mix term", positive_value)
    m2mix_temperature: Optional[float] = _option(
        0.07, "Temperature of the m²-Mix logits, or 'learned' for the model's logit_scale (with --siglip a "
              "number t also fixes the bias at -1/t)", temperature_value)
    vmix_weight: float = _option(
        0.0, "Weight of V-Mix, images mixed with images (CLIP, CoCa, distillation; not --siglip)", weight_value)
    lmix_weight: float = _option(0.0, "Weight of L-Mix, captions mixed with captions (not --siglip)", weight_value)
    vlmix_weight: float = _option(0.0, "Weight of VL-Mix, both mixed with one lambda (not --siglip)", weight_value)
    unimix_alpha: float = _option(0.5, "lambda ~ Beta(a, a) for V-Mix, L-Mix and VL-Mix", positive_value)
    unimix_temperature: Optional[float] = _option(
        None, "Temperature of the uni-modal logits, or 'learned' for the model's logit_scale (the reference "
              "fixes 0.01)", temperature_value, shown="learned")
    mix_pairing: str = _option("reverse", "Partner of sample i for the uni-modal mixes: N-1-i ('reverse', the "
                                          "reference) or a random perfect matching ('random')", choices=MIX_PAIRINGS)
    mix_schedule: str = _option("inverse-epoch", "Every mixing term times 1/(epoch+1) ('inverse-epoch', the "
                                                 "reference) or 1 ('constant')", choices=MIX_SCHEDULES)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            parse = f.metadata["parse"]
            if f.metadata["choices"] is not None:
                if value not in f.metadata["choices"]:
                    raise ValueError(f"unknown {f.name} {value!r}; choose one of {list(f.metadata['choices'])}")
            elif value is None and parse is temperature_value:
                continue
            else:
                try:
                    parse(str(float(value)) if isinstance(value, (int, float)) else str(value))
                except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
                    raise ValueError(f"{f.name}: {e}") from None
                object.__setattr__(self, f.name, float(value))

    @property
    def enabled_terms(self):
        return [t for t in ("m2mix", "vmix", "lmix", "vlmix") if getattr(self, f"{t}_weight") > 0]

    def as_kwargs(self) -> dict:
        return asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser) -> None:
    """One command-line flag per field (``--m2mix-weight`` for ``m2mix_weight``)."""
    for f in fields(MixOptions):
        meta = f.metadata
        default = f.default if f.default is not MISSING else None
        shown = meta["shown"] or default
        kwargs = dict(default=default, help=f"{meta['help']}. Default: {shown}.")
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        else:
            kwargs["type"] = meta["parse"]
            kwargs["metavar"] = "T" if meta["parse"] is temperature_value else "X"
        parser.add_argument(_flag(f.name), **kwargs)


def options_from_args(args) -> MixOptions:
    return MixOptions(**{f.name: getattr(args, f.name) for f in fields(MixOptions)})


def flag_table() -> str:
    """The README's table of the mixing flags, in Markdown."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for f in fields(MixOptions):
        shown = f.metadata["shown"] or f.default
        rows.append(f"| `{_flag(f.name)}` | {shown} | {f.metadata['help']} |")
    return "\n".join(rows)
