"""MixOptions: the one source of the mixing options, their checks, the loss constructors'
keywords and signatures, the flags and the README table."""

import argparse
import dataclasses
import inspect
import os
import pydoc
import typing

import pytest

from m2mix_openclip import M2MixCoCaLoss, M2MixDistillLoss, M2MixLoss, M2MixSigLipLoss
from m2mix_openclip.losses.options import MixKeywords, MixOptions, Unpack, add_flags, flag_table, options_from_args

FAMILIES = {  # each loss class, with the arguments it needs besides the options
    M2MixLoss: {}, M2MixSigLipLoss: {}, M2MixDistillLoss: {},
    M2MixCoCaLoss: {"caption_loss_weight": 2.0, "clip_loss_weight": 1.0},
}
OPTION_HINTS = typing.get_type_hints(MixOptions)


def test_flags_parse_into_the_options_the_loss_takes():
    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--m2mix-weight", "0.1", "--unimix-temperature", "0.01",
                              "--m2mix-temperature", "learned", "--mix-pairing", "random"])
    options = options_from_args(args)
    assert options == MixOptions(m2mix_weight=0.1, unimix_temperature=0.01, m2mix_temperature=None,
                                 mix_pairing="random")
    loss = M2MixLoss(**options.as_kwargs())
    assert (loss.m2mix_weight, loss.unimix_temperature, loss.m2mix_temperature) == (0.1, 0.01, None)
    assert parser.parse_args([]).unimix_temperature is None  # default: the model's logit_scale


@pytest.mark.parametrize("kwargs,match", [
    ({"m2mix_weight": -1}, "m2mix_weight: a weight must be >= 0"),
    ({"unimix_alpha": 0}, "unimix_alpha: must be > 0"),
    ({"vmix_weight": float("inf")}, "vmix_weight: expected a finite number"),
    ({"m2mix_temperature": "hot"}, "m2mix_temperature: expected a temperature"),
    ({"mix_pairing": "shuffle"}, "unknown mix_pairing 'shuffle'"),
])
def test_bad_options_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixOptions(**kwargs)
    with pytest.raises(ValueError, match=match):
        M2MixLoss(**kwargs)


def test_options_given_as_text_are_stored_as_the_flag_parses_them():
    given = MixOptions(m2mix_temperature="0.07", unimix_temperature="learned", m2mix_weight="0.5")
    assert given == MixOptions(m2mix_temperature=0.07, unimix_temperature=None, m2mix_weight=0.5)
    assert type(given.m2mix_temperature) is float and type(given.m2mix_weight) is float
    assert MixOptions(m2mix_temperature="Learned").m2mix_temperature is None
    assert M2MixLoss(unimix_temperature="0.01").unimix_temperature == 0.01


@pytest.mark.parametrize("field", ["m2mix_temperature", "unimix_temperature"])
def test_a_temperature_that_is_no_number_nor_learned_names_the_field_and_the_accepted_values(field):
    expected = (f"{field}: expected a temperature > 0 (e.g. 0.07) or 'learned' for the model's logit_scale, "
                "got 'warm'")
    for build in (MixOptions, M2MixLoss):
        with pytest.raises(ValueError) as raised:
            build(**{field: "warm"})
        assert str(raised.value) == expected


def test_docs_flag_table_follows_the_options_dataclass():
    page = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "training.md")
    with open(page) as f:
        text = f.read()
    assert flag_table() in text


# -- the loss constructors take MixOptions, and show its fields -------------------------------------
def test_the_keyword_type_lists_the_options_fields_with_their_types():
    assert list(typing.get_type_hints(MixKeywords).items()) == [
        (f.name, OPTION_HINTS[f.name]) for f in dataclasses.fields(MixOptions)]
    assert MixKeywords.__total__ is False  # every keyword may be left out


@pytest.mark.parametrize("family", FAMILIES, ids=lambda c: c.__name__)
def test_signature_and_help_show_every_option_with_its_type_and_default(family):
    parameters = inspect.signature(family).parameters
    for f in dataclasses.fields(MixOptions):
        parameter = parameters[f.name]
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, f.name
        assert (parameter.default, parameter.annotation) == (f.default, OPTION_HINTS[f.name]), f.name
    for name, default in (("options", None), ("seed", 0), ("calls_per_step", 1)):
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY and parameters[name].default == default
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    # what editors read from the source: **mixing typed by PEP 692
    assert typing.get_type_hints(family.__init__)["mixing"] == Unpack[MixKeywords]
    text = pydoc.render_doc(family, renderer=pydoc.plaintext)
    assert "m2mix_weight: float = 0.02" in text and "mix_schedule: str = 'inverse-epoch'" in text
    assert "m2mix_temperature: Optional[float] = 0.07" in text


def test_a_package_loss_class_whose_mixing_keywords_are_untyped_is_refused_where_it_is_defined():
    from open_clip.loss import ClipLoss

    from m2mix_openclip.losses.clip import SoftmaxMixingMixin

    with pytest.raises(TypeError, match=r"Untyped.__init__: annotate \*\*mixing as Unpack\[MixKeywords\]"):
        class Untyped(SoftmaxMixingMixin, ClipLoss):
            __module__ = "m2mix_openclip.losses.untyped"  # as if written in the package

            def __init__(self, **mixing):
                super().__init__(**mixing)


def test_a_users_subclass_with_plain_or_unresolvable_keywords_builds_and_gives_its_parents_loss():
    import torch

    class UserLoss(M2MixLoss):  # defined outside the package: never refused
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

    class UnresolvedLoss(M2MixLoss):
        def __init__(self, *args, note: "NameNotDefinedAnywhere" = None, **mixing: Unpack[MixKeywords]):  # noqa: F821
            super().__init__(*args, **mixing)

    with pytest.raises(NameError):  # what the spelled-out signature would have raised
        inspect.signature(UnresolvedLoss.__init__, eval_str=True)
    generator = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    chosen = dict(m2mix_weight=0.3, vmix_weight=0.2, mix_schedule="constant")
    expected = M2MixLoss(seed=5, **chosen)(image, text, torch.tensor(10.0), output_dict=True)
    for user_class in (UserLoss, UnresolvedLoss):
        loss = user_class(seed=5, **chosen)
        assert loss.options == MixOptions(**chosen)
        got = loss(image, text, torch.tensor(10.0), output_dict=True)
        assert got.keys() == expected.keys() == {"contrastive_loss", "m2mix_loss", "vmix_loss"}
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


BAD_OPTIONS = [
    {"m2mix_weight": -1}, {"m2mix_weight": float("nan")}, {"vmix_weight": float("inf")}, {"m2mix_alpha": 0},
    {"unimix_alpha": -0.5}, {"m2mix_temperature": 0.0}, {"unimix_temperature": "hot"},
    {"mix_pairing": "shuffle"}, {"mix_schedule": "cosine"},
]


@pytest.mark.parametrize("bad", BAD_OPTIONS, ids=lambda kw: next(iter(kw)))
def test_bad_options_raise_the_same_error_from_every_constructor(bad):
    with pytest.raises(ValueError) as reference:
        MixOptions(**bad)
    expected = str(reference.value)
    assert next(iter(bad)) in expected  # it names the option
    ways = []
    for family, needed in FAMILIES.items():
        ways += [lambda f=family, n=needed: f(**n, **bad),
                 lambda f=family, n=needed: f(**n, options=MixOptions(m2mix_weight=0.1), **bad)]
        loss = family(**needed)
        ways.append(lambda loss=loss: setattr(loss, next(iter(bad)), next(iter(bad.values()))))
    for way in ways:
        with pytest.raises(ValueError) as raised:
            way()
        assert str(raised.value) == expected


@pytest.mark.parametrize("family", FAMILIES, ids=lambda c: c.__name__)
def test_options_and_keywords_give_the_same_loss(family):
    needed = FAMILIES[family]
    chosen = MixOptions(m2mix_weight=0.1, m2mix_temperature=None, mix_schedule="constant")
    by_options = family(**needed, options=chosen, seed=3, calls_per_step=2)
    by_keywords = family(**needed, seed=3, calls_per_step=2, **chosen.as_kwargs())
    assert by_options.options == by_keywords.options == chosen
    assert (by_options.seed, by_options.calls_per_step) == (3, 2)
    assert by_options.m2mix_temperature is None and by_options.enabled_terms == ["m2mix"]
    # keywords replace the fields of the options they come with
    assert family(**needed, options=chosen, m2mix_alpha=0.2).options == dataclasses.replace(chosen, m2mix_alpha=0.2)
    assert family(**needed).options == MixOptions()


def test_setting_an_option_replaces_the_checked_options():
    loss = M2MixLoss(m2mix_weight=0.1)
    loss.vmix_weight = 0.3
    assert loss.options == MixOptions(m2mix_weight=0.1, vmix_weight=0.3) and loss.enabled_terms == ["m2mix", "vmix"]
    siglip = M2MixSigLipLoss(m2mix_weight=0.1)
    with pytest.raises(ValueError, match="vmix_weight must be 0"):  # the family's own limits, as at construction
        siglip.vmix_weight = 0.3
    assert siglip.options == MixOptions(m2mix_weight=0.1)


def test_unknown_keywords_and_wrong_options_are_named():
    with pytest.raises(TypeError, match=r"^M2MixLoss\(\) got unexpected keyword argument\(s\) 'm2mix_wieght'; the "
                                        r"mixing options are m2mix_weight, m2mix_alpha, "):
        M2MixLoss(m2mix_wieght=0.1)
    with pytest.raises(TypeError, match=r"M2MixCoCaLoss\(\): options must be a MixOptions, got dict"):
        M2MixCoCaLoss(1.0, 1.0, options={"m2mix_weight": 0.1})
    with pytest.raises(ValueError, match="calls_per_step must be an integer >= 1"):
        M2MixSigLipLoss(calls_per_step=0)


# -- --m2mix-weight: the family's default, resolved when the arguments are parsed ---------------------
@pytest.mark.parametrize("argv,world,expected", [
    ([], "1", 0.02),
    (["--siglip"], "1", 0.02 * (64 - 1)),  # the trainer's default --batch-size 64
    (["--siglip", "--batch-size", "8", "--accum-freq", "2"], "4", 0.02 * (8 * 4 * 2 - 1)),
    (["--siglip", "--m2mix-weight", "0.5"], "4", 0.5),  # a weight the user passes is kept
    (["--m2mix-weight", "0.1"], "1", 0.1),
])
def test_the_m2mix_weight_default_is_the_familys(monkeypatch, argv, world, expected):
    from m2mix_openclip.integration.launcher import parse_args

    monkeypatch.setenv("WORLD_SIZE", world)  # as torchrun sets it: OpenCLIP's world_info_from_env reads it
    args = parse_args(["--loss", "m2mix", *argv], check_data=False)
    assert args.m2mix_weight == pytest.approx(expected, rel=1e-12)
    assert args.m2mix_weight_default == ("--m2mix-weight" not in argv)
    assert options_from_args(args).m2mix_weight == args.m2mix_weight


def test_the_loss_gets_the_weight_of_the_processes_openclip_started_and_the_log_says_which():
    from argparse import Namespace

    from m2mix_openclip.integration.families import resolve_family_defaults, weight_note
    from m2mix_openclip.integration.losses import M2MIX_LOSS

    flags = {f.name: f.default for f in dataclasses.fields(MixOptions)}
    flags["m2mix_weight"] = None  # left out: the family's default
    args = Namespace(model="ViT-B-32", siglip=True, distill=False, distill_model=None, horovod=False, batch_size=32,
                     accum_freq=1, rank=0, world_size=8, loss_dist_impl=None, seed=0, mix_seed=None, **flags)
    resolve_family_defaults(args, world_size=2)  # at parsing, the environment's guess
    assert args.m2mix_weight == pytest.approx(0.02 * 63)
    loss = M2MIX_LOSS(args)  # at build, OpenCLIP's own count of processes
    assert loss.m2mix_weight == pytest.approx(0.02 * (32 * 8 - 1))
    assert weight_note(args, 8) == ("--m2mix-weight 5.1 (the --siglip default 0.02 x (G - 1) for the global batch "
                                    "G = 256: --batch-size 32 x 8 processes x --accum-freq 1)")
    args.siglip = False
    args.m2mix_weight_default = False
    assert weight_note(args, 8) == "--m2mix-weight 5.1 (given)"


def test_siglip_default_weight_refuses_a_batch_without_negatives():
    from m2mix_openclip.losses.options import siglip_default_weight
    assert siglip_default_weight(2) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="the global batch must be an integer >= 2, got 1"):
        siglip_default_weight(1)


def test_help_says_the_m2mix_weight_default_depends_on_the_family():
    parser = argparse.ArgumentParser()
    add_flags(parser)
    text = " ".join(parser.format_help().split())
    assert "Default: 0.02; with --siglip 0.02 x (G - 1) for a global batch of G pairs" in text
    assert parser.parse_args([]).m2mix_weight is None  # until the family is known
