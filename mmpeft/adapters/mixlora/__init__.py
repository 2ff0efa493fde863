"""MixLoRA, the conditional mixture of LoRA (Shen et al., ACL 2024, arXiv 2402.15896).

Each instance builds its own rank-r update from pools of rank-1 factors: an instance
router picks r A-factors, a second router conditioned on those picks r B-factors, and
``delta_W = sum_k b_k a_k^T`` over the chosen pairs.
"""

from mmpeft.adapters.mixlora.config import MixLoRAConfig
from mmpeft.adapters.mixlora.layer import MixLoRA

__all__ = ["MixLoRA", "MixLoRAConfig"]
