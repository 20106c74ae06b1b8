"""MixOptions: the one source of the mixing options, their flags and the README table."""

import argparse
import os

import pytest

from m2mix_openclip import M2MixLoss
from m2mix_openclip.losses.options import MixOptions, add_flags, flag_table, options_from_args


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


def test_docs_flag_table_follows_the_options_dataclass():
    page = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "training.md")
    with open(page) as f:
        text = f.read()
    assert flag_table() in text
