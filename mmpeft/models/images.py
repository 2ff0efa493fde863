"""Image tokens per image, and one image-resolution knob, from each family's own processor settings.

Two questions a memory plan asks of a checkpoint's processor:

- :func:`image_tokens`: how many image tokens the language model sees for one image of ``height x width``
  pixels. They are the positions the vision features fill: the ids equal to the model config's
  ``image_token_id`` (``image_token_index``) in the processor's ``input_ids``. The text tokens a family writes
  around them (Qwen's ``<|vision_start|>``, Idefics3's row and column tags, Gemma 3's ``<start_of_image>``,
  Pixtral's ``[IMG_BREAK]``/``[IMG_END]``, InternVL's ``<img>``) are not counted. Mllama is the exception: its
  text holds one ``<|image|>`` per image and the language model reads the image through cross-attention, so
  its count is the vision tokens of the tiles the image fills (tiles x (patches per tile + 1 class token)).
- :func:`processor_kwargs_for_resolution`: the ``from_pretrained`` arguments that make the processor read images
  at ``data.image_resolution`` pixels, in the family's own keys (``max_pixels``, ``size``, ``max_patches``).

The counts come from transformers' own rule for each processor (``_get_num_multimodal_tokens``, the method vLLM
uses to size its caches, which computes from the processor's settings through the image processor's resize and
tiling rules) rather than from formulas copied here that could drift; Mllama, which has no such method, is counted
with its image processor's own canvas rule (``get_optimal_tiled_canvas``). ``tests/test_images.py`` checks every
family's count against the real processor run on a real image.
"""

from __future__ import annotations

from typing import Any

from mmpeft.compat import image_token_count
from mmpeft.errors import ConfigError

__all__ = [
    "FIXED_SIZE",
    "image_tokens",
    "processor_kwargs_for_resolution",
    "resolution_kwargs",
]

KNOB = "data.image_resolution"

# Families whose processor has no setting that lowers the image tokens without breaking the model: the knob is
# refused there (a ConfigError naming the family and this reason) rather than silently doing nothing.
FIXED_SIZE = {
    "LlavaProcessor": "LLaVA resizes every image to the vision tower's fixed input size (crop_size), whose position "
    "embeddings fix it; an image always gives image_seq_length tokens",
    "Gemma3Processor": "Gemma 3 resizes every image to the vision tower's fixed input size (SigLIP, size) and pools "
    "it to mm_tokens_per_image tokens",
    "PaliGemmaProcessor": "PaliGemma resizes every image to the vision tower's fixed input size (size) and gives "
    "image_seq_length tokens; a lower resolution is another checkpoint (224, 448, 896)",
    "MllamaProcessor": "Mllama's tiles have the vision tower's fixed input size, and its aspect-ratio ids are "
    "indexed by the model's max_num_tiles, so neither the tile size nor max_image_tiles can change",
    "LlavaNextProcessor": "LLaVA-NeXT's anyres grid (image_grid_pinpoints) is read by the processor and by the "
    "model, which unpads the features by its own config's grid: a grid changed in the processor only mismatches "
    "the model",
    "LlavaOnevisionProcessor": "LLaVA-OneVision's anyres grid (image_grid_pinpoints) is read by the processor and "
    "by the model, which unpads the features by its own config's grid: a grid changed in the processor only "
    "mismatches the model",
}
_QWEN = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Qwen3VLProcessor")
_SPLITTING = ("Idefics3Processor", "SmolVLMProcessor")


def image_tokens(processor: Any, height: int, width: int, config: Any = None) -> int:
    """The image tokens the language model sees for one ``height x width`` image (see the module docstring).

    The count is for a sample with one image: LLaVA-OneVision gives each image fewer tokens when a sample has
    several.

    Args:
        processor: A loaded processor (``load_processor``), with the settings it will encode with.
        height: Image height in pixels.
        width: Image width in pixels.
        config: The model config; needed for Mllama only (its vision tower's ``image_size`` and ``patch_size``
            give the tokens per tile).
    """
    if height < 1 or width < 1:
        raise ValueError(f"an image has at least one pixel per side, got {height}x{width}")
    if type(processor).__name__ == "MllamaProcessor":
        return _mllama_tokens(processor, height, width, config)
    count = image_token_count(processor, height, width)
    if count is None:
        raise ConfigError(f"{type(processor).__name__}: mmpeft cannot count its image tokens (no transformers rule)")
    return count


def _mllama_tokens(processor: Any, height: int, width: int, config: Any) -> int:
    """Mllama: the vision tokens of the tiles an image fills, the tiles chosen by the image processor's own rule.

    The cross-attention layers read ``max_image_tiles`` tiles per image (the unused ones masked out), so the
    keys and values they hold are ``max_image_tiles x`` tokens per tile whatever the image's size; the image adds
    a single ``<|image|>`` to the text.
    """
    from transformers.models.mllama.image_processing_pil_mllama import get_optimal_tiled_canvas

    if config is None:
        raise ValueError("Mllama's image tokens need the model config (tokens per tile)")
    vision = config.vision_config
    tile = processor.image_processor.size["height"]
    canvas_height, canvas_width = get_optimal_tiled_canvas(
        height, width, processor.image_processor.max_image_tiles, tile
    )
    tiles = (canvas_height // tile) * (canvas_width // tile)
    return tiles * ((vision.image_size // vision.patch_size) ** 2 + 1)  # + 1: the class token of each tile


def processor_kwargs_for_resolution(processor: Any, resolution: int) -> dict[str, Any]:
    """The processor's ``from_pretrained`` arguments that read images at ``resolution`` (``data.image_resolution``).

    ``resolution`` is the side of a square pixel budget: an image is read at no more than ``resolution x
    resolution`` pixels' worth. Families that bound the longest side (Idefics3, SmolVLM, Pixtral) get it as their
    longest edge; those that bound the area (Qwen-VL's pixel budget, InternVL's tiles) get ``resolution**2``
    pixels, so a square image is read at the same size in every family and a long thin one keeps its detail
    in Qwen-VL.

    - Qwen2/2.5/3-VL: ``max_pixels = resolution**2``, and ``min_pixels`` lowered to it where it was higher
      (transformers 5 keeps them as ``size.longest_edge`` and ``size.shortest_edge``; the old names still load).
    - Idefics3, SmolVLM: ``size.longest_edge = resolution`` rounded down to a whole number of tiles
      (``max_image_size.longest_edge``), at least one tile.
    - Mistral 3 (Pixtral): ``size.longest_edge = resolution``.
    - InternVL: ``max_patches = (resolution // tile)**2`` tiles (at least 1), ``tile`` its ``size.height``.
    - LLaVA, LLaVA-NeXT, LLaVA-OneVision, Gemma 3, PaliGemma, Mllama: refused (:data:`FIXED_SIZE` says why).

    Raises:
        ConfigError: ``resolution`` is not a positive integer, or the family has no such setting.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ConfigError(f"{KNOB} must be a positive number of pixels, got {resolution!r}")
    name = type(processor).__name__
    image_processor = processor.image_processor
    if name in FIXED_SIZE:
        raise ConfigError(f"{KNOB} has no effect on {name}: {FIXED_SIZE[name]}; leave it unset")
    if name in _QWEN:  # size = {longest_edge: max_pixels, shortest_edge: min_pixels}, transformers 5's spelling
        budget = resolution * resolution
        return {"size": {"longest_edge": budget, "shortest_edge": min(image_processor.size["shortest_edge"], budget)}}
    if name in _SPLITTING:
        tile = image_processor.max_image_size["longest_edge"]
        return {"size": {"longest_edge": max(tile, resolution // tile * tile)}}
    if name == "PixtralProcessor":
        return {"size": {"longest_edge": resolution}}
    if name == "InternVLProcessor":
        tile = image_processor.size["height"]
        return {"max_patches": max(1, resolution // tile) ** 2}
    raise ConfigError(
        f"{KNOB}: mmpeft does not know which setting of {name} sets the image resolution; "
        "set it in data.processor_kwargs instead"
    )


def resolution_kwargs(processor: Any, resolution: int | None, explicit: dict[str, Any] | None) -> dict[str, Any]:
    """``data.processor_kwargs`` with the knob's settings added: an explicit key stays as it is, and one that
    differs from what the knob gives is a ConfigError naming both.

    Args:
        processor: The processor loaded with ``explicit`` (its settings decide the knob's, e.g. Qwen's
            ``min_pixels``).
        resolution: ``data.image_resolution``; ``None`` returns ``explicit`` unchanged.
        explicit: ``data.processor_kwargs``.
    """
    merged = dict(explicit or {})
    if resolution is None:
        return merged
    for key, value in processor_kwargs_for_resolution(processor, resolution).items():
        # A dict setting (size) is compared and merged key by key, so an explicit size's other keys stay.
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, wanted in items:
            where = key if sub is None else f"{key}.{sub}"
            # Qwen-VL's old names of size.longest_edge and size.shortest_edge are the same setting.
            spellings = [where] + [old for old, new in _OLD_NAMES.items() if new == where]
            for spelling in spellings:
                given = _lookup(merged, spelling)
                if given is not None and given != wanted:
                    raise ConfigError(
                        f"{KNOB}={resolution} sets {where}={wanted!r} for {type(processor).__name__}, but "
                        f"data.processor_kwargs.{spelling}={given!r}: set one of them"
                    )
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    return merged


_OLD_NAMES = {"max_pixels": "size.longest_edge", "min_pixels": "size.shortest_edge"}


def _lookup(kwargs: dict[str, Any], dotted: str) -> Any:
    """``kwargs["size"]["longest_edge"]`` for ``"size.longest_edge"``; ``None`` where it is not set."""
    value: Any = kwargs
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value
