"""Vision-Flan style instruction records as WebDataset shards.

Source records (a JSON list, or JSONL)::

    {"task_name": "VQA-E+image_question_answer", "unique_id": "vqa-e_12",
     "image": "images/vqa-e_12.jpg",
     "instruction": "Answer the question about the image. What is the man holding?",
     "output": "A frisbee."}

- One exchange: a user turn with the image, then the instruction text, and an assistant turn
  with the output. ``<image>`` in the instruction places the image there instead; ``image``
  may also be a list of paths, or be absent (text only).
- ``instruction`` and ``output`` must be strings, and ``output`` not blank (``bad_record``).
- The record id is ``id``, else ``unique_id``.
- Task label (see ``SourceRecipe``): ``task``, else ``task_map``, else the record's
  ``task_name``. There is no fallback: a record without a label is a bad record
  (``bad_task``), since lumping Vision-Flan's tasks together would defeat task routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from mmpeft.data.build import BadRecord
from mmpeft.data.records import Message, SourceRecipe, image_paths, images_first, message, text_parts

__all__ = ["VisionFlanRecipe"]


@dataclass(kw_only=True)
class VisionFlanRecipe(SourceRecipe):
    """Vision-Flan records (``task_name``, ``image``, ``instruction``, ``output``) as task-labelled shards."""

    name: ClassVar[str] = "vision_flan"
    id_fields: ClassVar[tuple[str, ...]] = ("id", "unique_id")

    task_field: str | None = "task_name"
    """The record field holding the raw task label."""

    def default_task(self, raw: dict[str, Any]) -> str | None:
        return None

    def convert(self, raw: dict[str, Any]) -> tuple[list[Message], list[str]]:
        instruction, output = raw.get("instruction"), raw.get("output")
        if not isinstance(instruction, str):
            raise BadRecord("bad_record", "'instruction' missing or not a string")
        if not isinstance(output, str) or not output.strip():
            raise BadRecord("bad_record", "'output' missing, blank or not a string")
        messages = [message("user", text_parts(instruction)), message("assistant", text_parts(output))]
        paths = image_paths(raw.get("image"), "image")
        images_first(messages, len(paths))
        return messages, paths
