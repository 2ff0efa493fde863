"""Worst-case batches for the memory plan: every sample as long as ``data.max_length`` allows, with its images.

A plan (:mod:`mmpeft.planner`) runs one training step of such a batch on the meta device. The batch
is made the way training makes its batches: a chat sample (the user's turn: the images and a short
question; the assistant's: filler text longer than ``max_length``) goes through the data's own
:class:`mmpeft.data.encode.ChatEncoder`, with the checkpoint's processor, its chat template and
``data.processor_kwargs`` / ``data.image_resolution``, then is truncated to ``max_length`` and
collated. So the image tokens, pixel layout (tiles, grids, aspect-ratio ids) and labels are the
family's own.

Images are squares of ``image_side`` pixels: ``data.image_resolution`` when set, else
:data:`DEFAULT_SIDE`. Families that resize every image to one input size (LLaVA, Gemma 3, ...) give
the same tokens at any side; Qwen-VL, Idefics3, SmolVLM, Pixtral and InternVL read larger images with
more tokens, up to their processor's limit.
"""

from __future__ import annotations

from typing import Any

from PIL import Image
from transformers import AutoConfig

from mmpeft.data.encode import ChatEncoder
from mmpeft.data.sample import Sample, SampleError
from mmpeft.errors import ConfigError, ImagesDoNotFit
from mmpeft.models.backbone import load_processor
from mmpeft.models.images import FIXED_SIZE, resolution_kwargs

DEFAULT_SIDE = 1024
"""Image side (pixels) of the planned batch when ``data.image_resolution`` is not set: a photo as cameras and
datasets commonly give it after downscaling."""
TASK = "estimate"


class FilledBatches:
    """Makes the worst-case batch of a setting (implements :class:`mmpeft.planner.Batches`)."""

    def __init__(
        self,
        processor: str,
        *,
        batch_size: int,
        max_length: int,
        images: int = 1,
        image_side: int | None = None,
        image_resolution: int | None = None,
        processor_kwargs: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        if images < 0:
            raise ConfigError(f"images per sample must be >= 0, got {images}")
        self.processor_path = processor
        self.batch_size = batch_size
        self.max_length = max_length
        self.images = images
        self.processor_kwargs = dict(processor_kwargs or {})
        self.trust_remote_code = trust_remote_code
        self.image_resolution = image_resolution
        self._encoders: dict[int | None, ChatEncoder] = {}
        self._image_id: int | None = None
        base = self._encoder(image_resolution)
        self.fixed_size = type(base.processor).__name__ in FIXED_SIZE
        """The family resizes every image to one size: the image side changes nothing (no side to search)."""
        side = image_side or image_resolution
        self.image_side: int | None = None if self.fixed_size or images == 0 else side or DEFAULT_SIDE
        """The side of the images; ``None`` where it changes nothing."""

    def _encoder(self, resolution: int | None) -> ChatEncoder:
        """The encoder whose processor reads images at ``resolution`` (``data.image_resolution``)."""
        if resolution not in self._encoders:
            processor = load_processor(self.processor_path, self.trust_remote_code, **self.processor_kwargs)
            if resolution is not None:
                kwargs = resolution_kwargs(processor, resolution, self.processor_kwargs)
                processor = load_processor(self.processor_path, self.trust_remote_code, **kwargs)
            self._encoders[resolution] = ChatEncoder(processor, [TASK], self.max_length)
        return self._encoders[resolution]

    def __call__(self, batch_size: int, max_length: int, image_side: int | None) -> dict[str, Any]:
        """``batch_size`` samples of ``max_length`` tokens, each with ``images`` square images of ``image_side``
        pixels (read at that resolution where the family has the knob and ``data.image_resolution`` is set, or the
        side differs from the configured one)."""
        side = image_side or self.image_side or DEFAULT_SIDE
        resolution = self.image_resolution
        if image_side is not None and image_side != self.image_side and not self.fixed_size:
            resolution = image_side
        encoder = self._encoder(resolution)
        encoder.max_length = max_length
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(self.images)]
        content.append({"type": "text", "text": "Describe the picture in detail."})
        words = " ".join(["word"] * max_length)  # a token or more each: the answer runs past max_length
        pictures = [Image.new("RGB", (side, side), (128, 128, 128)) for _ in range(self.images)]
        sample = Sample(
            "estimate",
            TASK,
            [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": words}]}],
            pictures,
        )
        try:
            item = encoder.encode(sample)
        except SampleError as exc:
            raise ImagesDoNotFit(
                f"a sample with {self.images} image(s) of {side}x{side} px does not fit data.max_length={max_length} "
                f"({exc}); raise data.max_length"
                + ("" if self.fixed_size else " or lower data.image_resolution (or --image-size)")
            ) from None
        return encoder.collate([item] * batch_size)

    def image_tokens_in(self, batch: dict[str, Any]) -> int:
        """The image tokens in the first sample of ``batch``: the positions the vision features fill, the ids equal to
        the model config's ``image_token_id`` (as :func:`mmpeft.models.images.image_tokens` counts them; Gemma 3's
        processor names its ``<start_of_image>``, the config its soft tokens). Mllama, which reads images by
        cross-attention, has one per image."""
        if self._image_id is None:
            encoder = next(iter(self._encoders.values()))
            self._image_id = encoder.image_token_id
            try:
                config = AutoConfig.from_pretrained(self.processor_path, trust_remote_code=self.trust_remote_code)
            except (OSError, ValueError):  # a processor-only folder: the processor's own image token
                config = None
            for key in ("image_token_id", "image_token_index"):
                if isinstance(getattr(config, key, None), int):
                    self._image_id = getattr(config, key)
                    break
        return int((batch["inputs"]["input_ids"][0] == self._image_id).sum())
