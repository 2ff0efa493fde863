"""The speed levers (model.speed) change neither the loss nor the gradients beyond floating-point noise."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from test_backbone import _batch

from mmpeft.adapters import AdaptedLinear, AdapterGroup, inject_adapters
from mmpeft.adapters.routing import RoutingContext
from mmpeft.errors import ConfigError
from mmpeft.models.backbone import VISION_PATHS, Backbone, get_path, language_model, load_backbone
from mmpeft.module import MMPeftModule
from mmpeft.objective import ChunkedLinearCrossEntropy, lm_losses, output_head, routed
from mmpeft.speed import Speed, apply_to_adapters

CPU = torch.device("cpu")
# Every lever off: the step as PEFT's path takes it (whole logits, out-of-place add, input grads, every layer
# recomputed).
OFF = Speed(loss_chunk=0, inplace_add=False, input_grads=True, checkpoint_every=1)
LEVERS = {
    "loss_chunk": {"loss_chunk": 3},  # several chunks even for the tiny batch's few answer tokens
    "inplace_add": {"inplace_add": True},
    "input_grads": {"input_grads": False},
    "checkpoint_every": {"checkpoint_every": 2},
}


def step(
    model_dir: str, quantization: str, speed: Speed, adapter: str
) -> tuple[float, torch.Tensor, dict[str, torch.Tensor]]:
    """Loss, per-sample losses and every adapter gradient of one training step, from the same initial adapter
    weights."""
    model = load_backbone(Backbone(pretrained=model_dir, quantization=quantization), CPU, speed)
    context = RoutingContext()
    torch.manual_seed(0)
    inject_adapters(language_model(model), [AdapterGroup(adapter, ["all-linear"], {"r": 4, "dropout": 0.0})], context)
    assert apply_to_adapters(model, speed) == 14  # 7 linear layers in each of 2 decoder layers
    generator = torch.Generator().manual_seed(1)
    for layer in model.modules():
        if isinstance(layer, AdaptedLinear):
            for name, p in layer.adapter.named_parameters():
                if name.startswith("B"):  # zero at init: give A a gradient too
                    p.data.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    model.train()
    batch = _batch(model_dir)
    with routed(context, batch):
        loss, per_sample = lm_losses(model, batch["inputs"], batch["labels"], speed.loss_chunk)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.item(), per_sample, grads


@pytest.mark.parametrize(
    "family,quantization,adapter",
    [
        ("llava", "nf4", "lora"),
        ("llava", "none", "asymlora"),
        ("llava", "int8", "lora"),
        ("qwen2_vl", "nf4", "moelora"),
        ("qwen2_vl", "fp4", "mixlora"),
    ],
)
def test_each_lever_and_all_together_keep_loss_and_gradients(tiny_model_dirs, family, quantization, adapter):
    path = tiny_model_dirs[family]
    loss0, samples0, grads0 = step(path, quantization, OFF, adapter)
    cases = {name: dataclasses.replace(OFF, **change) for name, change in LEVERS.items()}
    cases["all"] = dataclasses.replace(OFF, **{k: v for change in LEVERS.values() for k, v in change.items()})
    for name, speed in cases.items():
        loss, samples, grads = step(path, quantization, speed, adapter)
        assert loss == pytest.approx(loss0, rel=1e-5), name
        torch.testing.assert_close(samples, samples0, rtol=1e-5, atol=1e-6, msg=name)
        assert grads.keys() == grads0.keys()
        for key in grads0:
            # Summation order differs (chunks): an element near zero may differ by float32 noise of the tensor's scale.
            scale = grads0[key].abs().max().item()
            torch.testing.assert_close(
                grads[key],
                grads0[key],
                rtol=1e-4,
                atol=max(1e-7, 1e-6 * scale),
                msg=lambda m, name=name, key=key: f"{name}: {key}: {m}",
            )


def test_chunked_cross_entropy_matches_whole_logits_in_value_and_gradient():
    torch.manual_seed(0)
    n, h, vocab = 11, 8, 37
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(vocab, h, dtype=torch.float64), torch.randn(vocab, dtype=torch.float64)
    targets = torch.randint(vocab, (n,))
    upstream = torch.rand(n, dtype=torch.float64)  # any weighting of the per-position losses (a mean, a masked sum)
    whole = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="none")
    (expected,) = torch.autograd.grad((whole * upstream).sum(), hidden)
    for chunk in (1, 4, n, 100):
        losses = ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk)
        assert losses.shape == (n,) and losses.dtype == torch.float32
        torch.testing.assert_close(losses, whole.float(), rtol=1e-6, atol=1e-6)
        (got,) = torch.autograd.grad((losses * upstream.float()).sum(), hidden)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_chunked_loss_falls_back_to_whole_logits_for_a_head_it_cannot_compute(tiny_model_dirs):
    model = load_backbone(Backbone(pretrained=tiny_model_dirs["llava"]), CPU)
    assert output_head(model) is model.lm_head
    model.lm_head.weight.requires_grad_(True)  # a trained head needs its own gradient: not chunked
    assert output_head(model) is None
    batch = _batch(tiny_model_dirs["llava"])
    chunked, _ = lm_losses(model.eval(), batch["inputs"], batch["labels"], chunk=2)
    whole, _ = lm_losses(model, batch["inputs"], batch["labels"], chunk=0)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)


def test_gradients_and_recomputation_stay_out_of_the_frozen_vision_tower(tiny_model_dirs):
    from transformers.modeling_layers import GradientCheckpointingLayer

    path = tiny_model_dirs["llava"]
    seen = {}
    for name, speed in (("ours", Speed()), ("peft", OFF), ("every2", Speed(checkpoint_every=2))):
        model = load_backbone(Backbone(pretrained=path), CPU, speed)
        vision = get_path(model, VISION_PATHS, "vision tower")[1]
        lm = language_model(model)

        def flags(tower):
            return [m.gradient_checkpointing for m in tower.modules() if isinstance(m, GradientCheckpointingLayer)]

        seen[name] = (flags(vision), flags(lm))
        out = {}
        vision.register_forward_hook(
            lambda module, args, output, out=out: out.update(grad=output[0].requires_grad)
        )  # returns None: output kept
        inject_adapters(lm, [AdapterGroup("lora", ["all-linear"], {"r": 2})])
        model.train()
        batch = _batch(path)
        lm_losses(model, batch["inputs"], batch["labels"], speed.loss_chunk)[0].backward()
        assert out["grad"] is speed.input_grads, name  # with it off, backward never enters the vision tower
    assert seen["ours"][1] == [True, True] and seen["every2"][1] == [True, False]
    assert seen["ours"][0] and not any(seen["ours"][0]) and not any(seen["every2"][0])  # vision layers never recomputed


def test_bad_speed_settings_name_their_key(tiny_model_dirs):
    backbone = Backbone(pretrained=tiny_model_dirs["llava"])
    with pytest.raises(ConfigError, match="model.speed.loss_chunk"):
        MMPeftModule(backbone, speed=Speed(loss_chunk=-1))
    with pytest.raises(ConfigError, match="model.speed.checkpoint_every"):
        MMPeftModule(backbone, speed=Speed(checkpoint_every=0))


def test_the_in_place_add_is_taken_wherever_autograd_allows_it(tiny_model_dirs):
    """4-bit Qwen2-VL: bitsandbytes returns a view from its autograd Function for the biased q/k/v projections,
    which autograd will not let change in place once gradients flow; every other layer adds in place."""
    model = load_backbone(Backbone(pretrained=tiny_model_dirs["qwen2_vl"]), CPU, Speed()).train()
    wrapped = inject_adapters(language_model(model), [AdapterGroup("lora", ["all-linear"], {"r": 4})])
    batch = _batch(tiny_model_dirs["qwen2_vl"])
    lm_losses(model, batch["inputs"], batch["labels"])[0].backward()
    refused = sorted(name for name, layer in wrapped.items() if layer._refused)
    # The first layer's inputs need no gradient (frozen embeddings), so its views may change in place.
    assert refused == [f"layers.1.self_attn.{p}_proj" for p in "kqv"], refused
    assert all(wrapped[name].base.bias is not None for name in refused)
