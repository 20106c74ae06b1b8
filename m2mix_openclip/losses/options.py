"""The mixing options, in one place: ``MixOptions`` validates itself, and the loss
constructors (their keywords, signatures and checks), the ``--loss m2mix`` command-line flags
and the README's flag table all follow from its fields. Nothing here knows OpenCLIP's trainer.
"""

from __future__ import annotations

import argparse
import inspect
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Callable, List, Optional, TypedDict

try:
    from typing import Unpack  # Python 3.11
except ImportError:  # Python 3.10
    from typing_extensions import Unpack

__all__ = ["MixOptions", "MixKeywords", "MIX_SCHEDULES", "MIX_PAIRINGS", "MIX_TERMS",
           "SIGLIP_UNIMODAL_REASON", "siglip_unimodal_error", "mix_options", "signature_with_options", "add_flags",
           "options_from_args", "flag_table", "siglip_default_weight", "SIGLIP_WEIGHT_PER_NEGATIVE"]

MIX_SCHEDULES = ("inverse-epoch", "constant")
MIX_PAIRINGS = ("reverse", "random")
MIX_TERMS = ("m2mix", "vmix", "lmix", "vlmix")  # each weighted by the option <term>_weight

SIGLIP_UNIMODAL_REASON = (
    "V-Mix, L-Mix and VL-Mix are soft-target softmax terms over the whole batch (a sample's mixing "
    "partner can sit on any process), while SigLIP's sigmoid loss never gathers the batch (it passes "
    "caption chunks between neighbouring processes) and scores each pair on its own, with no soft "
    "targets to share between two samples; with --siglip use the sigmoid m²-Mix term (--m2mix-weight)"
)
SIGLIP_UNIMODAL_WEIGHTS = ("vmix_weight", "lmix_weight", "vlmix_weight")


def siglip_unimodal_error(options, as_flags: bool) -> Optional[str]:
    """The one message for V-Mix, L-Mix or VL-Mix weights > 0 with SigLIP, None when all are 0.

    ``options``: a ``MixOptions`` or parsed flags (a weight it lacks counts as 0). ``as_flags``
    names the weights as the command line spells them (``--vmix-weight``), else as the
    keywords of ``M2MixSigLipLoss`` (``vmix_weight``); the reason and its fix are the same."""
    given = [name for name in SIGLIP_UNIMODAL_WEIGHTS if (getattr(options, name, 0) or 0) > 0]
    if not given:
        return None
    if as_flags:
        return f"{', '.join(map(_flag, given))} cannot be combined with --siglip: {SIGLIP_UNIMODAL_REASON}"
    return f"M2MixSigLipLoss: {', '.join(given)} must be 0: {SIGLIP_UNIMODAL_REASON}"


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


def _option(default, flag_help: str, parse=None, choices=None, shown: Optional[str] = None,
            family_default: Optional[str] = None):
    """A field of :class:`MixOptions`. ``family_default``: the flag's default depends on the loss
    family (the flag's value is then None until ``integration.families`` resolves it); the text
    says which, in ``--help``."""
    return field(default=default, metadata={"help": flag_help, "parse": parse, "choices": choices, "shown": shown,
                                            "family_default": family_default})


@dataclass(frozen=True)
class MixOptions:
    """The options of every m²-Mix loss (see ``M2MixLoss`` for the maths), checked here and only
    here: a ``ValueError`` names a bad one. Each loss takes them as ``options=MixOptions(...)`` or
    as keywords of the same names (:class:`MixKeywords`); ``dataclasses.replace`` gives a changed
    copy, checked again."""

    m2mix_weight: float = _option(0.02, "Weight of the m²-Mix term (0 turns it off); the reference's mmmix 0.01 "
                                         "(it sums the two directions, we average them)", weight_value,
                                  family_default="0.02; with --siglip 0.02 x (G - 1) for a global batch of G pairs "
                                                 "(the mixes then weigh as SigLIP weighs its own negatives; "
                                                 "docs/performance.md)")
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
                # Parsed as the flag would be, and the parsed value stored: "0.07" as 0.07, "learned" as None.
                try:
                    parsed = parse(str(float(value)) if isinstance(value, (int, float)) else str(value))
                except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
                    raise ValueError(f"{f.name}: {e}") from None
                object.__setattr__(self, f.name, parsed)

    @property
    def enabled_terms(self) -> List[str]:
        """The mixing terms with a weight > 0, of ``MIX_TERMS``."""
        return [t for t in MIX_TERMS if getattr(self, f"{t}_weight") > 0]

    def as_kwargs(self) -> dict:
        return asdict(self)


class MixKeywords(TypedDict, total=False):
    """:class:`MixOptions`' fields as keyword arguments: the loss constructors take
    ``**mixing: Unpack[MixKeywords]`` (PEP 692), so that editors and type checkers know the names
    and types. The same names and types as the fields, in their order (a test keeps them equal)."""

    m2mix_weight: float
    m2mix_alpha: float
    m2mix_temperature: Optional[float]
    vmix_weight: float
    lmix_weight: float
    vlmix_weight: float
    unimix_alpha: float
    unimix_temperature: Optional[float]
    mix_pairing: str
    mix_schedule: str


def mix_options(owner: str, options: Optional[MixOptions] = None, **keywords) -> MixOptions:
    """``options`` (the defaults where None) with ``keywords`` in place of its fields, checked by
    :class:`MixOptions`; ``owner`` names the caller in the ``TypeError`` for a keyword that is no
    option."""
    unknown = sorted(set(keywords) - {f.name for f in fields(MixOptions)})
    if unknown:
        raise TypeError(f"{owner} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; the mixing "
                        f"options are {', '.join(f.name for f in fields(MixOptions))}")
    if options is None:
        return MixOptions(**keywords)
    if not isinstance(options, MixOptions):
        raise TypeError(f"{owner}: options must be a MixOptions, got {type(options).__name__}")
    return replace(options, **keywords) if keywords else options


def signature_with_options(function: Callable) -> inspect.Signature:
    """``function``'s signature with its ``**mixing`` spelled out: one keyword-only parameter per
    :class:`MixOptions` field, with its type and default (what ``help()`` and
    ``inspect.signature`` then show for a loss constructor)."""
    signature = inspect.signature(function, eval_str=True)
    hints = typing.get_type_hints(MixOptions)
    spelled_out = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                     annotation=hints[f.name]) for f in fields(MixOptions)]
    parameters = []
    for parameter in signature.parameters.values():
        if parameter.kind is not inspect.Parameter.VAR_KEYWORD:
            parameters.append(parameter)
        elif parameter.annotation == Unpack[MixKeywords]:
            parameters.extend(spelled_out)
        else:  # a mistake in a loss class, seen when it is defined
            raise TypeError(f"{function.__qualname__}: annotate **{parameter.name} as Unpack[MixKeywords], "
                            "the mixing options")
    return signature.replace(parameters=parameters)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser) -> None:
    """One command-line flag per field (``--m2mix-weight`` for ``m2mix_weight``); a field whose
    default depends on the family gets None (resolved by ``integration.families``)."""
    for f in fields(MixOptions):
        meta = f.metadata
        default = f.default if f.default is not MISSING else None
        shown = meta["family_default"] or meta["shown"] or default
        if meta["family_default"]:
            default = None
        kwargs = dict(default=default, help=f"{meta['help']}. Default: {shown}.")
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        else:
            kwargs["type"] = meta["parse"]
            kwargs["metavar"] = "T" if meta["parse"] is temperature_value else "X"
        parser.add_argument(_flag(f.name), **kwargs)


def options_from_args(args) -> MixOptions:
    """The options of parsed flags; a family-dependent flag still at None (not resolved by
    ``integration.families``) takes the field's default."""
    values = {f.name: getattr(args, f.name) for f in fields(MixOptions)}
    for f in fields(MixOptions):
        if f.metadata["family_default"] and values[f.name] is None:
            values[f.name] = f.default
    return MixOptions(**values)


SIGLIP_WEIGHT_PER_NEGATIVE = 0.02


def siglip_default_weight(global_batch: int) -> float:
    r"""``--m2mix-weight``'s default with ``--siglip``: :math:`0.02\,(G - 1)` for a global batch of
    :math:`G` pairs (the batch ``M2MixSigLipLoss`` sees: ``--batch-size`` x processes x
    ``--accum-freq``).

    The sigmoid m²-Mix term is a mean over each anchor's :math:`G - 1` mixed negatives; SigLIP
    sums over its negatives. Times :math:`G - 1`, the term is that sum, weighted 0.02 as the
    softmax families weigh theirs: measured on the bundled digits, its share of the gradient on
    the pairs is then the softmax default's (docs/performance.md, ``benchmarks/siglip_weight.py``).
    """
    if int(global_batch) != global_batch or global_batch < 2:
        raise ValueError(f"the global batch must be an integer >= 2, got {global_batch!r}")
    return SIGLIP_WEIGHT_PER_NEGATIVE * (int(global_batch) - 1)


def flag_table() -> str:
    """The table of the mixing flags in docs/training.md, in Markdown (a flag's default as the
    command line has it: per family where the family decides it)."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for f in fields(MixOptions):
        shown = f.metadata["family_default"] or f.metadata["shown"] or f.default
        rows.append(f"| `{_flag(f.name)}` | {shown} | {f.metadata['help']} |")
    return "\n".join(rows)
