"""``main.py --help`` shows each flag's default and says what every flag of the original does."""

from __future__ import annotations

import re

from m3dm.config import build_parser


def test_help_shows_defaults_and_explains_every_flag():
    parser = build_parser()
    text = " ".join(parser.format_help().split())  # argparse wraps lines: compare on single spaces
    for shown in ("--f_coreset F_CORESET coreset fraction (default: 0.1)", "(default: DINO+Point_MAE+Fusion)",
                  "--rgb_s_lambda RGB_S_LAMBDA weight of the RGB bank's image score before decision layer fusion "
                  "(default: 0.1)", "(default: datasets/mvtec3d)", "(default: 224)"):
        assert shown in text
    assert "(default: False)" not in text and "(default: None)" not in text
    helps = {a.option_strings[0]: a.help or "" for a in parser._actions}
    assert [flag for flag, help in helps.items() if not help] == []
    # a help that already names its default does not get a second one
    assert [flag for flag, help in helps.items() if len(re.findall("default", help)) > 1] == []
