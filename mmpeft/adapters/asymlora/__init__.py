"""AsymLoRA (Wei et al. 2025; HydraLoRA, Tian et al. 2024): one shared A, N routed B heads.

``delta(x) = s * sum_i g_i(x) B_i (A dropout(x))``: the shared ``A`` holds what all tasks have
in common, the heads ``B_i`` what conflicts between them, mixed by a router.
"""

from mmpeft.adapters.asymlora.config import AsymLoRAConfig
from mmpeft.adapters.asymlora.layer import AsymLoRA

__all__ = ["AsymLoRA", "AsymLoRAConfig"]
