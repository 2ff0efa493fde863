"""Vanilla LoRA (Hu et al., 2021): ``delta(x) = (alpha / r) * B A dropout(x)``."""

from mmpeft.adapters.lora.config import LoRAConfig
from mmpeft.adapters.lora.layer import LoRA

__all__ = ["LoRA", "LoRAConfig"]
