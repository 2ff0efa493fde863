"""DoRA (Liu et al. 2024, arXiv:2402.09353) as an mmpeft adapter plugin.

``W' = m * (W + s B A) / ||W + s B A||_row``: LoRA changes the direction of each output
row of the frozen weight, a trained vector ``m`` its magnitude. Registered under the
entry-point group ``mmpeft.adapters`` as ``dora`` by this distribution's ``pyproject.toml``.
"""

from mmpeft_dora.config import DoRAConfig
from mmpeft_dora.layer import DoRA

__all__ = ["DoRA", "DoRAConfig"]
