"""mmpeft: mixture-of-LoRA instruction tuning for 4-bit multimodal LLMs.

Library pieces (adapters, routing, data, model loading) live in subpackages; the
LightningModule (:mod:`mmpeft.module`) and the CLI (:mod:`mmpeft.cli`) compose them.
"""

__version__ = "0.1.0"
