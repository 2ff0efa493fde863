"""LoRA math, injection by name, and parity with PEFT's LoRA on the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from mmpeft.adapters import AdaptedLinear, AdapterGroup, adapter_state_dict, inject_adapters
from mmpeft.adapters.lora import LoRA, LoRAConfig
from mmpeft.errors import ConfigError


def test_zero_init_b_leaves_output_unchanged_and_delta_weight_matches_forward():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 6)
    layer = AdaptedLinear(base, LoRA(12, 6, LoRAConfig(r=4, alpha=8, dropout=0.0)), "lora")
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    torch.nn.init.normal_(layer.adapter.B)
    expected = base(x) + x @ layer.adapter.delta_weight().T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer.adapter.delta_weight().shape == (6, 12)


def test_targets_aliases_and_globs(tiny_llama):
    wrapped = inject_adapters(
        tiny_llama.model, [AdapterGroup("lora", ["attention"]), AdapterGroup("lora", ["layers.1.mlp.*"])]
    )
    assert sorted(wrapped) == sorted(
        [f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        + [f"layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    )
    assert isinstance(tiny_llama.model.layers[0].self_attn.q_proj, AdaptedLinear)
    assert not isinstance(tiny_llama.model.layers[0].mlp.up_proj, AdaptedLinear)
    # r * (d_in + d_out) per layer, nothing else.
    state = adapter_state_dict(tiny_llama.model)
    assert set(state) == {f"{name}.adapter.{t}" for name in wrapped for t in ("A", "B")}


def test_pattern_matching_nothing_lists_existing_layers(tiny_llama):
    with pytest.raises(ConfigError, match=r"target 'qkv_proj' matches no linear layer.*layers\.\*\.self_attn\.q_proj"):
        inject_adapters(tiny_llama.model, [AdapterGroup("lora", ["qkv_proj"])])


def test_a_layer_claimed_by_two_groups_is_an_error(tiny_llama):
    with pytest.raises(
        ConfigError, match=r"'layers.0.self_attn.q_proj' is targeted by adapters\[0\] and adapters\[1\]"
    ):
        inject_adapters(tiny_llama.model, [AdapterGroup("lora", ["attention"]), AdapterGroup("lora", ["q_proj"])])


def test_parity_with_peft_lora(tiny_llama):
    """Same A and B in both: logits and gradients of our LoRA match PEFT's."""
    ours = copy.deepcopy(tiny_llama)
    peft_model = get_peft_model(
        tiny_llama, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    wrapped = inject_adapters(
        ours.model, [AdapterGroup("lora", ["q_proj", "v_proj", "down_proj"], {"r": 4, "alpha": 8, "dropout": 0.0})]
    )
    torch.manual_seed(1)
    for name, layer in wrapped.items():
        peft_layer = peft_model.base_model.model.model.get_submodule(name)
        torch.nn.init.normal_(peft_layer.lora_B["default"].weight)
        layer.adapter.A.data.copy_(peft_layer.lora_A["default"].weight)
        layer.adapter.B.data.copy_(peft_layer.lora_B["default"].weight)
    ids = torch.randint(0, 128, (2, 9))
    ours_logits = ours(ids).logits
    peft_logits = peft_model(ids).logits
    torch.testing.assert_close(ours_logits, peft_logits, rtol=1e-5, atol=1e-5)
    ours_logits.square().mean().backward()
    peft_logits.square().mean().backward()
    name = "layers.1.mlp.down_proj"
    torch.testing.assert_close(
        wrapped[name].adapter.A.grad,
        peft_model.base_model.model.model.get_submodule(name).lora_A["default"].weight.grad,
        rtol=1e-4,
        atol=1e-6,
    )
