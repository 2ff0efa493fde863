"""LLaVA-Instruct JSON (``llava_instruct_150k.json``, ``llava_v1_5_mix665k.json``) as WebDataset shards.

Source records (a JSON list, or JSONL)::

    {"id": "000000033471",
     "image": "coco/train2017/000000033471.jpg",          (or a list of paths; absent: text only)
     "conversations": [
       {"from": "human", "value": "<image>\\nWhat are the colors of the bus in the image?"},
       {"from": "gpt", "value": "The bus in the image is white and red."},
       ...]}

- ``human`` / ``gpt`` / ``system`` turns become ``user`` / ``assistant`` / ``system``; any other
  ``from`` is a bad record (``bad_record``), and so is a record with no ``gpt`` turn
  (``no_assistant_turn``).
- Each ``<image>`` in a turn becomes an image part at its place (the newline next to it is
  dropped); the k-th ``<image>`` is the k-th path of ``image``. A record whose text has no
  ``<image>`` gets its images at the start of the first human turn (LLaVA's convention).
  Otherwise the numbers must agree (``image_count_mismatch``); ``<image>`` in a ``gpt`` turn
  is a bad record.
- Task label (see ``SourceRecipe``): ``task``, else ``task_map``, else the record's ``task``
  field, else the stem of ``src`` (``llava_instruct_150k``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from mmpeft.data.build import BadRecord
from mmpeft.data.records import Message, SourceRecipe, image_paths, images_first, message, text_parts

__all__ = ["LlavaRecipe"]

ROLE_OF = {"human": "user", "gpt": "assistant", "system": "system"}


@dataclass(kw_only=True)
class LlavaRecipe(SourceRecipe):
    """LLaVA-Instruct records (``id``, ``image``, ``conversations``) as task-labelled shards."""

    name: ClassVar[str] = "llava"

    task_field: str | None = "task"
    """The record field holding the raw task label (LLaVA files have none: the stem of ``src`` is used)."""

    def convert(self, raw: dict[str, Any]) -> tuple[list[Message], list[str]]:
        turns = raw.get("conversations")
        if not isinstance(turns, list):
            raise BadRecord("bad_record", "'conversations' missing or not a list")
        messages = []
        for k, turn in enumerate(turns):
            source = turn.get("from") if isinstance(turn, dict) else None
            if source not in ROLE_OF:
                raise BadRecord(
                    "bad_record", f"conversations[{k}]: 'from' is {source!r:.80}, expected human, gpt or system"
                )
            if not isinstance(turn.get("value"), str):
                raise BadRecord("bad_record", f"conversations[{k}]: 'value' missing or not a string")
            messages.append(message(ROLE_OF[source], text_parts(turn["value"])))
        paths = image_paths(raw.get("image"), "image")
        images_first(messages, len(paths))
        return messages, paths
