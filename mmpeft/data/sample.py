"""Parse one raw WebDataset sample into a task label, a chat and its images.

Format (docs/data.md): ``<key>.json`` holds ``{"task": ..., "messages": [...]}``, optionally
``"references"`` (the answers evaluation accepts); the k-th ``{"type": "image"}`` part of the
conversation is ``<key>.img{k}.<ext>`` (a lone ``<key>.jpg``/``.png`` counts as ``img0``). Anything wrong with a sample
raises :class:`SampleError` with a short reason used as a skip-counter name.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` names the skip counter it goes to."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.length: int | None = None
        """The sample's length in tokens, when it is known (``cuts_image_tokens``, ``too_long``)."""


@dataclass
class Sample:
    key: str
    task: str
    messages: list[dict[str, Any]]
    images: list[Image.Image]
    references: list[str] | None = None
    """The JSON's optional ``references``: acceptable answers that evaluation scores the generated answer against."""


def _normalise_content(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(p, dict) and "type" in p for p in content):
        return content
    raise SampleError("bad_json", "message content must be a string or a list of typed parts")


def _image_bytes(raw: dict[str, Any], k: int) -> bytes | None:
    for ext in IMAGE_EXTENSIONS:
        value = raw.get(f"img{k}.{ext}")
        if value is None and k == 0:
            value = raw.get(ext)
        if value is not None:
            return value
    return None


def parse_sample(raw: dict[str, Any], assistant_required: bool = True) -> Sample:
    """Decode ``raw`` (webdataset's dict of key -> bytes) into a :class:`Sample`.

    A chat without an assistant turn is refused (``no_assistant_turn``) unless
    ``assistant_required`` is off, as for prompts to generate from.
    """
    key = raw.get("__key__", "?")
    if "json" not in raw:  # e.g. the last sample of a truncated shard, or files whose keys do not match
        files = sorted(k for k in raw if not k.startswith("__"))
        raise SampleError("missing_json", f"no .json file among the sample's files {files}")
    try:
        meta = json.loads(raw["json"])
        task = meta["task"]
        messages = [{"role": m["role"], "content": _normalise_content(m["content"])} for m in meta["messages"]]
        references = meta.get("references")
        if references is not None and not (
            isinstance(references, list) and references and all(isinstance(r, str) for r in references)
        ):
            raise SampleError("bad_json", f"'references' must be a non-empty list of strings, got {references!r:.120}")
    except SampleError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise SampleError("bad_json", f"{type(exc).__name__}: {exc}") from exc
    if assistant_required and not any(m["role"] == "assistant" for m in messages):
        raise SampleError("no_assistant_turn")
    n_images = sum(p["type"] == "image" for m in messages for p in m["content"])
    images = []
    for k in range(n_images):
        data = _image_bytes(raw, k)
        if data is None:
            raise SampleError("image_count_mismatch", f"the text has {n_images} image(s) but img{k} is missing")
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except Exception as exc:  # PIL raises many types for corrupt files
            raise SampleError("bad_image", f"img{k}: {exc}") from exc
        images.append(image.convert("RGB"))
    if _image_bytes(raw, n_images) is not None:
        raise SampleError("image_count_mismatch", f"more image files than the {n_images} image part(s) in the text")
    return Sample(key=key, task=task, messages=messages, images=images, references=references)
