"""MASA, "multi-A, shared B" (Dong et al. 2025, arXiv:2510.06005), as an mmpeft adapter plugin.

``delta(x) = s * B sum_i g_i(x) A_i dropout(x)``: ``N`` routed down-projections ``A_i`` feed one shared
up-projection ``B``, the mirror of AsymLoRA (one shared ``A``, ``N`` routed ``B_i``). Registered under the
entry-point group ``mmpeft.adapters`` as ``masa`` by this distribution's ``pyproject.toml``.
"""

from mmpeft_masa.config import MASAConfig
from mmpeft_masa.layer import MASA

__all__ = ["MASA", "MASAConfig"]
