"""Adapters: the contract, injection by name, and the built-in adapter plugins.

Each built-in adapter lives in its own folder (``mmpeft/adapters/<name>/``) and is
registered through the ``mmpeft.adapters`` entry point like any third-party plugin.
"""

from mmpeft.adapters.base import (
    Ability,
    AdaptedLinear,
    AdapterPlugin,
    abilities_of,
    check_adapter_class,
    lora_parts,
)
from mmpeft.adapters.inject import (
    AdapterGroup,
    adapter_state_dict,
    describe_adapters,
    inject_adapters,
    linear_layer_names,
    load_adapter,
)

__all__ = [
    "Ability",
    "AdaptedLinear",
    "AdapterGroup",
    "AdapterPlugin",
    "abilities_of",
    "adapter_state_dict",
    "check_adapter_class",
    "describe_adapters",
    "inject_adapters",
    "linear_layer_names",
    "load_adapter",
    "lora_parts",
]
