"""The private APIs of the libraries mmpeft stands on that no public one replaces, each in one named function.

Everything else in mmpeft uses public API only. Each use here says why no public API does it;
docs/private-apis.md lists them, with the private APIs that stay elsewhere (overrides of a
library's method, which cannot move here), and tests/test_compat.py fails, naming the library's
version and the missing attribute, when an installed library no longer has one of them
(:data:`PRIVATE_APIS`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint


class PrivateAPI(NamedTuple):
    """One private attribute mmpeft uses: where it lives and where mmpeft uses it."""

    distribution: str
    """The installed distribution that has it (its version is named when it is missing)."""
    owner: str
    """The importable class that has it, ``module:Class``."""
    attribute: str
    """The private attribute."""
    used_in: str
    """mmpeft's function or class that uses it."""


PRIVATE_APIS: tuple[PrivateAPI, ...] = (
    PrivateAPI(
        "lightning",
        "lightning.pytorch.callbacks:ModelCheckpoint",
        "_find_last_checkpoints",
        "mmpeft.compat.last_checkpoints",
    ),
    *(
        PrivateAPI(
            "transformers", f"transformers:{name}", "_get_num_multimodal_tokens", "mmpeft.compat.image_token_count"
        )
        for name in (
            "LlavaProcessor",
            "LlavaNextProcessor",
            "LlavaOnevisionProcessor",
            "Qwen2VLProcessor",
            "Qwen2_5_VLProcessor",
            "Qwen3VLProcessor",
            "Idefics3Processor",
            "SmolVLMProcessor",
            "Gemma3Processor",
            "PaliGemmaProcessor",
            "InternVLProcessor",
        )
    ),
    PrivateAPI(
        "torchmetrics",
        "torchmetrics.wrappers:ClasswiseWrapper",
        "_convert_output",
        "mmpeft.metrics.PerTask (an override)",
    ),
)
"""Every private attribute of another library that mmpeft uses (docs/private-apis.md gives the reasons)."""


def last_checkpoints(callback: ModelCheckpoint, trainer: L.Trainer) -> set[str]:
    """The ``last*.ckpt`` files in the folder ``callback`` saves to: those ``--ckpt_path last`` chooses among.

    Lightning's own rule (``ModelCheckpoint._find_last_checkpoints``), which ``Trainer.fit(ckpt_path="last")``
    applies itself: ``last.ckpt`` and ``last-v1.ckpt``... in ``callback.dirpath``, or where the callback
    will save when that is unset (the first logger's folder). No public method gives them, and a copy
    of the rule could drift from the one Lightning resumes with; ``python -m mmpeft`` asks it first to
    name the checkpoint it resumes from, or to refuse ``last`` when there is none (Lightning would
    silently start from scratch).
    """
    return set(callback._find_last_checkpoints(trainer))


def image_token_count(processor: Any, height: int, width: int) -> int | None:
    """The image tokens the processor puts in a prompt for one ``height x width`` image; ``None`` when it has no rule.

    transformers' per-processor rule (``ProcessorMixin`` subclasses' ``_get_num_multimodal_tokens``, which vLLM
    uses to size its caches): it applies the image processor's own resize and tiling to the processor's own
    settings. No public method gives the count without encoding an image, and formulas copied per family could
    drift from the processors' (``tests/test_images.py`` checks the count against the real processor for every
    family; Pixtral's processor, loaded through its PIL twin here, has it too).
    """
    counter = getattr(processor, "_get_num_multimodal_tokens", None)
    if counter is None:
        return None
    return int(counter(image_sizes=[(height, width)]).num_image_tokens[0])
