"""Source records plus image files: the shared base of the recipes that read them (``data_recipes/``).

Part of the library because ``data.predict`` reads the ``chat`` record format (:mod:`mmpeft.data.chat`)
itself; the recipes in ``data_recipes/`` build on it and nothing here imports them.

A :class:`SourceRecipe` reads ``src`` (a JSON list of records, or JSONL: one record per line)
once, on first use, and turns record ``i`` into sample ``i``. A subclass says only how one
record becomes a chat: :meth:`SourceRecipe.convert` returns the messages, with a
``{"type": "image"}`` part per image, and the image paths in the same order. Everything else
is shared here:

- **ids**: ``Record.id`` (and the id in bad-record reports) is the record's own id (the first
  of :attr:`SourceRecipe.id_fields` it has), else where it is: ``line 7`` (JSONL, 1-based) or
  ``item 3`` (JSON list, 0-based). Sample keys are the record's position, ``000000003``.
- **task labels**: a fixed ``task`` wins; otherwise the raw label is the record's
  ``task_field``, else the recipe's rule (:meth:`SourceRecipe.default_task`), and a
  ``task_map`` file renames it: the record id is looked up first, then the raw label.
- **images**: paths are relative to ``images`` (default: the folder of ``src``); each file is
  decoded completely to check it but written unchanged (bytes and format).
- **checks** every recipe gets: roles are system/user/assistant, there is an assistant turn,
  no image sits in an assistant turn, as many images as image places.

A bad record raises :class:`BadRecord` (the build reports it with its id and goes on), with
one of the reasons ``bad_json`` (a malformed JSONL line), ``bad_record`` (fields missing or of
the wrong type), ``bad_task``, ``no_assistant_turn``, ``image_count_mismatch``,
``missing_image`` or ``bad_image``. A missing or malformed source file is an error that names
it, raised when the recipe first reads its files (:meth:`SourceRecipe.build` does so before it
touches the output folder), not when it is constructed: ``data.prepare`` constructs the recipe
on every run to see whether its shards are built, which must work once the sources are gone.
A source none of whose records becomes a sample (a one-line JSON object that is not a record,
say) is an error too, naming the file and the reasons.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mmpeft.data.build import BadRecord, Record, ShardRecipe, checked_image
from mmpeft.errors import ConfigError

Message = dict[str, Any]
Part = dict[str, Any]

ROLES = ("system", "user", "assistant")
IMAGE_TOKEN = "<image>"
"""Marks where an image goes in a text (LLaVA's convention)."""
_IMAGE_TOKEN_SPLIT = re.compile(r"\n?" + re.escape(IMAGE_TOKEN) + r"\n?")


# ----------------------------------------------------------------------------- chat helpers


def image_part() -> Part:
    return {"type": "image"}


def text_parts(text: str) -> list[Part]:
    """``text`` as parts: each ``<image>`` becomes an image part (with the newline next to it dropped)."""
    parts: list[Part] = []
    for k, piece in enumerate(_IMAGE_TOKEN_SPLIT.split(text)):
        if k:
            parts.append(image_part())
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def message(role: str, parts: list[Part]) -> Message:
    return {"role": role, "content": parts}


def count_images(parts: list[Part]) -> int:
    return sum(p.get("type") == "image" for p in parts)


def image_paths(value: Any, field: str) -> list[str]:
    """A record's image field (absent, one path or a list of paths) as a list of paths."""
    if value is None:
        return []
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p.strip() for p in paths):
        raise BadRecord("bad_record", f"{field!r} must be a path or a list of paths, got {value!r:.200}")
    return paths


def images_first(messages: list[Message], n_images: int) -> None:
    """LLaVA's convention: when no text marks where the images go, they open the first user turn."""
    if n_images == 0 or any(count_images(m["content"]) for m in messages):
        return
    for m in messages:
        if m["role"] == "user":
            m["content"][:0] = [image_part() for _ in range(n_images)]
            return
    raise BadRecord("bad_record", f"{n_images} image(s) but no user turn to put them in")


def _check_chat(messages: list[Message], n_images: int, assistant_required: bool = True) -> None:
    for k, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise BadRecord("bad_record", f"turn {k}: role {m['role']!r}, expected one of {', '.join(ROLES)}")
        if m["role"] == "assistant" and count_images(m["content"]):
            raise BadRecord("bad_record", f"turn {k}: an image ({IMAGE_TOKEN} or image part) in an assistant turn")
    if assistant_required and not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no_assistant_turn", f"{len(messages)} turn(s), none from the assistant")
    places = sum(count_images(m["content"]) for m in messages)
    if places != n_images:
        raise BadRecord(
            "image_count_mismatch",
            f"{places} image place(s) in the chat ({IMAGE_TOKEN} or image parts), {n_images} image(s)",
        )


# ----------------------------------------------------------------------------- source files


@dataclass(frozen=True)
class _Entry:
    """One record of the source file as read: its value, or why its line did not parse."""

    where: str
    value: Any = None
    error: str | None = None


def _json_error(what: str, exc: json.JSONDecodeError) -> str:
    return f"{what}, line {exc.lineno}, column {exc.colno}: malformed JSON: {exc.msg}"


def _read_records(path: Path) -> list[_Entry]:
    """The records of a JSON list or a JSONL file (``.jsonl``, or a file whose first character is ``{``)."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    head = data.lstrip()[:1]
    jsonl = path.suffix.lower() == ".jsonl" or head == b"{"
    if not jsonl:
        if head != b"[":
            found = f"first character {head.decode('latin-1')!r}" if head else "an empty file"
            raise ConfigError(
                f"src {path}: expected a JSON list of records or JSONL (one object per line), found {found}"
            )
        try:
            records = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"src {path}: not UTF-8 text ({exc})") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(_json_error(f"src {path}", exc)) from exc
        entries = [_Entry(f"item {i}", value) for i, value in enumerate(records)]
    else:
        entries = []
        # Split on "\n" only: str.splitlines would also split inside strings holding U+2028 and kin.
        for n, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                entries.append(_Entry(f"line {n}", json.loads(line.decode("utf-8"))))
            except UnicodeDecodeError as exc:
                entries.append(_Entry(f"line {n}", error=f"{path}, line {n}: not UTF-8 text ({exc.reason})"))
            except json.JSONDecodeError as exc:
                entries.append(
                    _Entry(f"line {n}", error=f"{path}, line {n}, column {exc.colno}: malformed JSON: {exc.msg}")
                )
        if entries and entries[0].error is not None and path.suffix.lower() != ".jsonl":
            try:  # a pretty-printed object, not JSONL with a bad first line?
                json.loads(data)
            except ValueError:
                pass
            else:
                raise ConfigError(
                    f"src {path} holds one JSON object; expected a JSON list of records or JSONL (one object per line)"
                )
    if not entries:
        raise ConfigError(f"src {path} holds no records")
    return entries


def _read_task_map(path: Path) -> dict[str, str]:
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ConfigError(_json_error(f"task_map {path}", exc)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"task_map {path}: not UTF-8 text ({exc})") from exc
    if not isinstance(value, dict):
        raise ConfigError(
            f"task_map {path} must hold a JSON object mapping record ids or labels to task names, "
            f"got a {type(value).__name__}"
        )
    bad = [key for key, task in value.items() if not isinstance(task, str) or not task]
    if bad:
        raise ConfigError(
            f"task_map {path}: task names must be non-empty strings; they are not for {', '.join(map(repr, bad[:5]))}"
        )
    return value


# ----------------------------------------------------------------------------- the base recipe


@dataclass(kw_only=True)
class SourceRecipe(ShardRecipe):
    """Base of the recipes that read records from a JSON or JSONL file: subclasses implement :meth:`convert`."""

    id_fields: ClassVar[tuple[str, ...]] = ("id",)
    """Record fields holding the source's own id, the first present one wins."""

    assistant_required: ClassVar[bool] = True
    """A record without an assistant turn is bad (``no_assistant_turn``); off for prompts to generate from."""

    src: str
    """The source file: a JSON list of records, or JSONL (one record per line; a ``.jsonl`` name or a first character
    ``{``)."""
    images: str | None = None
    """Folder that relative image paths in the records are relative to (default: the folder of ``src``)."""
    task: str | None = None
    """One task label for every record, overriding ``task_map``, ``task_field`` and the recipe's rule."""
    task_map: str | None = None
    """A JSON file ``{"<record id or raw label>": "<task name>"}``: renames the raw label (the record id is looked up
    first)."""
    task_field: str | None = "task"
    """The record field holding the raw task label; a record without it (or ``null``) falls back to the recipe's rule.
    ``None``: always the rule."""

    def __post_init__(self) -> None:
        super().__post_init__()
        # No file is looked at here: `data.prepare` constructs the recipe on every run to see whether
        # its shards are built, which must keep working once the source files are gone.
        self.src = os.fspath(self.src)
        self.images = None if self.images is None else os.fspath(self.images)
        self.task_map = None if self.task_map is None else os.fspath(self.task_map)
        if self.task is not None and (not isinstance(self.task, str) or not self.task):
            raise ConfigError(f"task must be a non-empty string, got {self.task!r}")
        if self.task_field is not None and (not isinstance(self.task_field, str) or not self.task_field):
            raise ConfigError(f"task_field must be a field name or None, got {self.task_field!r}")
        self._entries: list[_Entry] | None = None
        self._task_names: dict[str, str] = {}

    # -- what a source recipe implements ----------------------------------------------------
    def convert(self, raw: dict[str, Any]) -> tuple[list[Message], list[str]]:
        """The chat of record ``raw`` (image parts in place) and the paths of its images, in order."""
        raise NotImplementedError

    def default_task(self, raw: dict[str, Any]) -> str | None:
        """The raw task label of a record without ``task_field``: the stem of ``src`` (``None``: no label)."""
        return Path(self.src).stem

    # -- shared ------------------------------------------------------------------------------
    def _source(self) -> list[_Entry]:
        """The records, read on first use (with the task map); errors name the file."""
        if self._entries is None:
            if not Path(self.src).is_file():
                raise ConfigError(f"src {self.src}: {'not a file' if Path(self.src).exists() else 'no such file'}")
            if self.images is not None and not Path(self.images).is_dir():
                raise ConfigError(f"images {self.images}: no such folder")
            if self.task_map is not None:
                if not Path(self.task_map).is_file():
                    raise ConfigError(f"task_map {self.task_map}: no such file")
                self._task_names = _read_task_map(Path(self.task_map))
            self._entries = _read_records(Path(self.src))
        return self._entries

    def build(self, out_dir: str | os.PathLike, progress: bool = True, **options: Any) -> dict[str, Any]:
        self._source()  # a malformed source file fails here, before the output folder is touched
        return super().build(out_dir, progress, **options)

    def describe_source(self) -> str:
        return f"src {self.src}"

    def no_sample_hint(self) -> str:
        entries = self._source()
        if len(entries) == 1 and isinstance(entries[0].value, dict) and Path(self.src).suffix.lower() != ".jsonl":
            return (
                "; the file holds one JSON object, read as JSONL with one record: "
                "expected a JSON list of records, or JSONL (one record per line)"
            )
        return ""

    def __len__(self) -> int:
        return len(self._source())

    def _id(self, entry: _Entry) -> str:
        if isinstance(entry.value, dict):
            for name in self.id_fields:
                value = entry.value.get(name)
                if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value):
                    return str(value)
        return entry.where

    def record_id(self, index: int) -> str:
        return self._id(self._source()[index])

    def record_place(self, index: int) -> str:
        """Where record ``index`` is in ``src``: ``line 7`` (JSONL, from 1) or ``item 3`` (JSON list, from 0)."""
        return self._source()[index].where

    def _task(self, raw: dict[str, Any], record_id: str) -> str:
        if self.task is not None:
            return self.task
        field = self.task_field
        label = raw[field] if field is not None and raw.get(field) is not None else self.default_task(raw)
        if record_id in self._task_names:
            label = self._task_names[record_id]
        elif isinstance(label, str) and label in self._task_names:
            label = self._task_names[label]
        if label is None:
            missing = f"no {field!r} field, " if field is not None else ""
            raise BadRecord("bad_task", f"no task label ({missing}set task or task_map)")
        if not isinstance(label, str) or not label:
            raise BadRecord("bad_task", f"task label {label!r:.200} is not a non-empty string")
        return label

    def _image(self, path: str) -> tuple[bytes, str]:
        root = Path(self.images) if self.images is not None else Path(self.src).parent
        full = Path(path) if os.path.isabs(path) else root / path
        try:
            data = full.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise BadRecord("missing_image", str(full)) from exc
        except OSError as exc:
            raise BadRecord("bad_image", f"{full}: {exc}") from exc
        return checked_image(data, str(full))

    def record(self, index: int) -> Record:
        entry = self._source()[index]
        if entry.error is not None:
            raise BadRecord("bad_json", entry.error)
        raw = entry.value
        if not isinstance(raw, dict):
            raise BadRecord("bad_record", f"{entry.where}: a record must be a JSON object, got {type(raw).__name__}")
        record_id = self._id(entry)
        try:
            messages, paths = self.convert(raw)
        except (
            KeyError,
            TypeError,
            AttributeError,
        ) as exc:  # a shape no explicit check foresaw: one bad record, not a failed build
            raise BadRecord("bad_record", f"unexpected structure ({type(exc).__name__}: {exc})") from exc
        _check_chat(messages, len(paths), self.assistant_required)
        task = self._task(raw, record_id)
        images = [self._image(path) for path in paths]
        return Record(key=f"{index:09d}", task=task, messages=messages, images=images, id=record_id)
