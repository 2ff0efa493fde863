"""One spelling per flag for the tools beside LightningCLI: ``--help`` shows dashes, both spellings work.

``--max-length`` and ``--max_length`` are the same option of ``merge``, ``export``, ``data build``,
``data inspect``, ``tiny-model`` and ``report``; the recipe options of ``data build`` come from
dataclass fields (``samples_per_shard``) through jsonargparse, and are shown with dashes too.
LightningCLI's own options (``--trainer.max_steps``) keep its spelling.

The tools build their parsers with :class:`ArgumentParser` (argparse's) or :func:`json_parser`
(jsonargparse's): each long option is added spelled with dashes (through the parser's public
``add_argument``, which jsonargparse's ``add_class_arguments`` also calls), and :func:`parse` turns
the underscores of the command line's option names into dashes before parsing. The destination
(``args.max_length``) is argparse's own: a long option's name with its dashes made underscores.
"""

from __future__ import annotations

import argparse
import functools
import re
from typing import Any


def _dashed(option: str) -> str:
    return "--" + option[2:].replace("_", "-") if option.startswith("--") else option


class DashedOptions:
    """Mixin for argparse's or jsonargparse's ``ArgumentParser``: every long option is added with dashes.

    ``add_argument("--max_length")`` adds ``--max-length`` (destination ``max_length``, as
    argparse derives it from either spelling). Options added to an argument group
    (``add_argument_group``) go through the group, not the parser, and keep their spelling: the
    tools add none.
    """

    def add_argument(self, *names: Any, **kwargs: Any) -> Any:
        dashed = dict.fromkeys(_dashed(name) if isinstance(name, str) else name for name in names)
        return super().add_argument(*dashed, **kwargs)  # type: ignore[misc]


class ArgumentParser(DashedOptions, argparse.ArgumentParser):
    """argparse's parser with every long option spelled with dashes (:class:`DashedOptions`)."""


@functools.cache
def _json_parser_class() -> type:
    from jsonargparse import ArgumentParser as JsonArgumentParser

    class DashedJsonParser(DashedOptions, JsonArgumentParser):
        """jsonargparse's parser with every long option spelled with dashes (:class:`DashedOptions`)."""

    return DashedJsonParser


def json_parser(**kwargs: Any) -> Any:
    """jsonargparse's ``ArgumentParser(**kwargs)`` with every long option spelled with dashes, dataclass fields
    (``add_class_arguments``) included. jsonargparse is imported on first use: the other tools do without it."""
    return _json_parser_class()(**kwargs)


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
    """``parser.parse_args(argv)`` taking ``--a_b`` and ``--a-b`` alike; ``parser`` is one of this module's."""
    if not isinstance(parser, DashedOptions):
        raise TypeError(
            f"mmpeft.flags.parse needs a parser built by mmpeft.flags.ArgumentParser or json_parser, "
            f"not {type(parser).__module__}.{type(parser).__qualname__}: its options would keep their underscores"
        )
    return parser.parse_args(dashed_argv(list(argv)))


def readable_parse_error(message: str) -> str:
    """jsonargparse's "Parser key "X": Expected a <class 'str'>. Got value: None" as "X is not set", with where to
    set it."""
    missing = re.match(r"""Parser key "([^"]+)":\s*Expected a <class '[^']+'>\. Got value: None""", message)
    if missing:
        key = missing.group(1)
        return (
            f"{key} is not set: give a config with --config FILE (configs/demo.yaml is one to start from) "
            f"or set it with --{key} VALUE"
        )
    return message
