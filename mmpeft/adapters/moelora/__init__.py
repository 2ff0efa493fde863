"""LoRA-MoE: N full LoRA experts ``B_e A_e`` behind a token router.

Dense softmax gating is LoRAMoE (Dou et al. 2024); top-k with renormalisation is MoLA /
Mixtral-style MoE-LoRA.
"""

from mmpeft.adapters.moelora.config import MoELoRAConfig
from mmpeft.adapters.moelora.layer import MoELoRA

__all__ = ["MoELoRA", "MoELoRAConfig"]
