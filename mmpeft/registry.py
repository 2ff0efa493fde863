"""Plugin registries read from Python entry points.

Built-in adapters and data recipes register through the project's own
``pyproject.toml`` exactly as a third party's distribution would; nothing here
lists them by hand. A plugin that fails to import, or (an adapter) does not meet the
contract of :mod:`mmpeft.adapters.base`, is reported by name and does not hide the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from mmpeft.errors import ConfigError

ADAPTERS = "mmpeft.adapters"
DATA_RECIPES = "mmpeft.data_recipes"

Check = Callable[[Any, str, str], None]
"""``check(obj, name, distribution)``: raises ConfigError, naming the plugin and what is missing, when
the loaded object does not meet its group's contract (the adapters' is
:func:`mmpeft.adapters.base.check_adapter_class`; the group's own layer passes it in)."""


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin, as ``python -m mmpeft adapters`` shows it."""

    name: str
    distribution: str
    target: str
    error: str | None = None
    """Why the plugin could not be loaded (``None`` when it loads)."""


def _entry_points(group: str) -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        # A name registered twice (e.g. a stale editable install) keeps the first one seen.
        found.setdefault(ep.name, ep)
    return found


def _distribution(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "?"


def describe(group: str, check: Check | None = None) -> list[PluginInfo]:
    """Every plugin of ``group``, sorted by name, each loaded once to report import errors and what ``check``
    finds wrong."""
    rows = []
    for name, ep in sorted(_entry_points(group).items()):
        error = None
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not break the listing
            error = f"{type(exc).__name__}: {exc}"
        else:
            if check is not None:
                try:
                    check(obj, name, _distribution(ep))
                except ConfigError as exc:
                    error = str(exc)
        rows.append(PluginInfo(name, _distribution(ep), ep.value, error))
    return rows


def load(group: str, name: str, check: Check | None = None) -> Any:
    """The object registered as ``name`` in ``group`` (passed through ``check``), with errors that say what to do."""
    eps = _entry_points(group)
    kind = group.rsplit(".", 1)[-1].rstrip("s").replace("_", " ")
    if name not in eps:
        known = ", ".join(sorted(eps)) or "(none)"
        raise ConfigError(
            f"unknown {kind} {name!r}; registered {kind}s: {known}. "
            f"A plugin registers under the entry-point group {group!r} (see docs/plugins.md)."
        )
    ep = eps[name]
    try:
        obj = ep.load()
    except Exception as exc:
        raise ConfigError(
            f"{kind} plugin {name!r} ({ep.value}, from {_distribution(ep)}) failed to import: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if check is not None:
        check(obj, name, _distribution(ep))
    return obj


def build_config(config_class: type, values: dict[str, Any] | None, where: str) -> Any:
    """Instantiate a plugin's config dataclass from a mapping, naming any unknown key."""
    values = dict(values or {})
    fields = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(sorted(fields))}"
        )
    try:
        return config_class(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
