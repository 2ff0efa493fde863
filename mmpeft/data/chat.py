"""The chat record format: transformers' messages plus image paths (JSONL or a JSON list).

The ``chat`` recipe (``data_recipes/chat.py``) turns such records into WebDataset shards, and
``data.predict`` reads a JSONL file of them as prompts (:class:`ChatPrompts`).

Source records::

    {"id": "r1", "task": "vqa",                                        (both optional)
     "images": ["img/cat.jpg", "img/dog.png"],                         (optional)
     "messages": [
       {"role": "system", "content": "You are a helpful assistant."},
       {"role": "user", "content": [{"type": "image"}, {"type": "image", "image": "img/extra.jpg"},
                                    {"type": "text", "text": "Which animals are these?"}]},
       {"role": "assistant", "content": "A cat, a dog and a bird."}]}

- ``role`` is ``system``, ``user`` or ``assistant``, and there must be an assistant turn.
- ``content`` is a string or a list of parts: ``{"type": "text", "text": ...}`` or
  ``{"type": "image"}``. An image part takes its path from its own ``image`` or ``path`` key,
  else from the record's ``images`` list, in order; that list must have exactly one path per
  such part (``image_count_mismatch``). An ``<image>`` in a text counts as an image part
  without a path (the ShareGPT convention). The shard holds plain ``{"type": "image"}`` parts
  and string contents become one text part.
- Task label (see ``SourceRecipe``): ``task``, else ``task_map``, else the record's ``task``
  field, else the stem of ``src``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from mmpeft.data.build import BadRecord
from mmpeft.data.records import (
    Message,
    Part,
    SourceRecipe,
    count_images,
    image_part,
    image_paths,
    message,
    text_parts,
)

__all__ = ["ChatPrompts", "ChatRecipe"]


def _parts(content: Any, where: str) -> tuple[list[Part], list[str | None]]:
    """A message's content as parts, and for each image part its own path or ``None`` (from ``images``)."""
    if isinstance(content, str):
        parts = text_parts(content)
        return parts, [None] * count_images(parts)
    if not isinstance(content, list):
        raise BadRecord("bad_record", f"{where}: 'content' must be a string or a list of parts")
    parts, own = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            new = text_parts(part["text"])
            parts += new
            own += [None] * count_images(new)
        elif kind == "image":
            path = part.get("image") if part.get("image") is not None else part.get("path")
            if path is not None and (not isinstance(path, str) or not path.strip()):
                raise BadRecord(
                    "bad_record",
                    f"{where}.content[{j}]: an image part's path must be a non-empty string, got {path!r:.120}",
                )
            parts.append(image_part())
            own.append(path)
        else:
            raise BadRecord(
                "bad_record",
                f"{where}.content[{j}]: expected a text part with a string 'text' or an image part, got {part!r:.120}",
            )
    return parts, own


@dataclass(kw_only=True)
class ChatRecipe(SourceRecipe):
    """Chat records (``messages``, ``images``) as task-labelled shards."""

    name: ClassVar[str] = "chat"

    task_field: str | None = "task"
    """The record field holding the raw task label; a record without it gets the stem of ``src``."""

    def convert(self, raw: dict[str, Any]) -> tuple[list[Message], list[str]]:
        turns = raw.get("messages")
        if not isinstance(turns, list):
            raise BadRecord("bad_record", "'messages' missing or not a list")
        messages, own = [], []
        for k, turn in enumerate(turns):
            if not isinstance(turn, dict) or "role" not in turn:
                raise BadRecord("bad_record", f"messages[{k}]: expected an object with 'role' and 'content'")
            parts, paths = _parts(turn.get("content"), f"messages[{k}]")
            messages.append(message(turn["role"], parts))
            own += paths
        listed = image_paths(raw.get("images"), "images")
        if own.count(None) != len(listed):
            raise BadRecord(
                "image_count_mismatch",
                f"{own.count(None)} image part(s) without a path of their own, {len(listed)} path(s) in 'images'",
            )
        rest = iter(listed)
        return messages, [path if path is not None else next(rest) for path in own]


@dataclass(kw_only=True)
class ChatPrompts(ChatRecipe):
    """Chat records as prompts to generate from (``data.predict`` as a JSONL file): an assistant turn is optional.

    Not a registered recipe: the data module reads such a file record by record to predict.
    """

    assistant_required: ClassVar[bool] = False
