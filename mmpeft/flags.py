"""One spelling per flag for the tools beside LightningCLI: ``--help`` shows dashes, both spellings work.

``--max-length`` and ``--max_length`` are the same option of ``merge``, ``export``, ``data build``,
``data inspect``, ``tiny-model`` and ``report``; the recipe options of ``data build`` come from
dataclass fields (``samples_per_shard``) through jsonargparse, and are shown with dashes too.
LightningCLI's own options (``--trainer.max_steps``) keep its spelling.
"""

from __future__ import annotations

import argparse
from typing import Any


def _dashed(option: str) -> str:
    return "--" + option[2:].replace("_", "-") if option.startswith("--") else option


def dash_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Respell every long option of ``parser`` (argparse's or jsonargparse's) with dashes; returns it.

    Run after the last ``add_argument``; :func:`parse` then maps either spelling on the command
    line to this one.
    """
    for action in parser._actions:
        names = list(dict.fromkeys(_dashed(option) for option in action.option_strings))
        if names != action.option_strings:
            for option in action.option_strings:
                parser._option_string_actions.pop(option, None)
            for option in names:
                parser._option_string_actions[option] = action
            action.option_strings = names
    return parser


def dashed_argv(argv: list[str]) -> list[str]:
    """``argv`` with the underscores of option names (``--max_length=64``) turned into dashes, up to a ``--``."""
    out: list[str] = []
    for i, token in enumerate(argv):
        if token == "--":
            return out + argv[i:]
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            token = _dashed(name) + eq + value
        out.append(token)
    return out


def parse(parser: Any, argv: list[str]) -> Any:
    """``parser.parse_args(argv)`` taking ``--a_b`` and ``--a-b`` alike, with dashes in its ``--help``."""
    return dash_options(parser).parse_args(dashed_argv(list(argv)))
