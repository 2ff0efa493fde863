"""Adapters: the contract, injection by name, and the built-in adapter plugins.

Each built-in adapter lives in its own folder (``mmpeft/adapters/<name>/``) and is
registered through the ``mmpeft.adapters`` entry point like any third-party plugin.
"""

from mmpeft.adapters.base import AdaptedLinear, AdapterPlugin
from mmpeft.adapters.inject import AdapterGroup, adapter_state_dict, inject_adapters, linear_layer_names

__all__ = [
    "AdaptedLinear",
    "AdapterGroup",
    "AdapterPlugin",
    "adapter_state_dict",
    "inject_adapters",
    "linear_layer_names",
]
