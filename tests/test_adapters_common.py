"""One table of checks every adapter passes, on the 4-bit tiny models of both families.

A new adapter joins by adding a row to ``CASES``.
"""

from __future__ import annotations

import pytest
import torch
from test_backbone import _batch

from mmpeft.adapters import AdaptedLinear, AdapterGroup, adapter_state_dict, inject_adapters
from mmpeft.adapters.routing import Router, RoutingContext, RoutingLosses, routing_losses, weighted_sum
from mmpeft.models.backbone import Backbone, language_model, load_backbone
from mmpeft.objective import IGNORE_INDEX, lm_loss

CASES = {
    "lora": ("lora", {"r": 4, "dropout": 0.0}),
    "asymlora": ("asymlora", {"r": 4, "heads": 3, "dropout": 0.0}),
    "asymlora-seq-top2": ("asymlora", {"r": 4, "heads": 3, "routing": "sequence", "top_k": 2, "dropout": 0.0}),
    "moelora": ("moelora", {"r": 2, "experts": 4, "dropout": 0.0}),
    "moelora-top2": ("moelora", {"r": 2, "experts": 4, "top_k": 2, "dropout": 0.0}),
    "mixlora": ("mixlora", {"r": 4, "factors": 8, "dropout": 0.0}),
    "mixlora-score": ("mixlora", {"r": 4, "factors": 8, "weighting": "score", "dropout": 0.0}),
}
MIXTURES = [case for case, (name, _) in CASES.items() if name != "lora"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batches(tiny_model_dirs):
    return {family: _batch(tiny_model_dirs[family]) for family in ("llava", "qwen2_vl")}


def adapted(tiny_model_dirs, family: str, case: str, *, checkpointing: bool = True, seed: int = 0):
    """The NF4 tiny model with the case's adapter on every linear layer of its language model, and its context."""
    name, config = CASES[case]
    model = load_backbone(Backbone(pretrained=tiny_model_dirs[family], gradient_checkpointing=checkpointing), CPU)
    context = RoutingContext()
    torch.manual_seed(seed)
    inject_adapters(language_model(model), [AdapterGroup(name, ["all-linear"], config)], context)
    return model, context


def randomise_b(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every zero-initialised up-projection a value, so the update (and router gradients) are non-zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, AdaptedLinear):
                layer.adapter.B.copy_(torch.randn(layer.adapter.B.shape, generator=generator) * 0.1)


def step_loss(model, context, batch, coefficients: RoutingLosses | None = None) -> torch.Tensor:
    """What the LightningModule's training step computes: LM loss plus weighted routing losses."""
    inputs, labels = batch["inputs"], batch["labels"]
    prompt = (labels == IGNORE_INDEX) & inputs["attention_mask"].bool()
    with context.step(inputs["attention_mask"], prompt, batch["task_ids"]):
        loss = lm_loss(model, inputs, labels)
        if coefficients is not None:
            extra = weighted_sum(routing_losses(context, coefficients), coefficients)
            loss = loss + (extra if extra is not None else 0)
    return loss


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("case", CASES)
def test_zero_init_is_the_base_model_and_only_adapters_train(tiny_model_dirs, batches, family, case):
    base = load_backbone(Backbone(pretrained=tiny_model_dirs[family]), CPU).eval()
    batch = batches[family]
    with torch.no_grad():
        expected = base(**batch["inputs"], use_cache=False).logits
    model, context = adapted(tiny_model_dirs, family, case)
    with torch.no_grad(), context.step(batch["inputs"]["attention_mask"], None, batch["task_ids"]):
        logits = model.eval()(**batch["inputs"], use_cache=False).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    params = trainable(model)
    assert params and all(".adapter." in name and p.dtype == torch.float32 for name, p in params.items())
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert bool(routers) == (case in MIXTURES)
    assert all(r.context is context and r.name.startswith("layers.") for r in routers)


@pytest.mark.parametrize("case", CASES)
def test_every_trainable_tensor_gets_a_gradient_and_checkpointing_changes_nothing(tiny_model_dirs, batches, case):
    grads = []
    for checkpointing in (True, False):
        model, context = adapted(tiny_model_dirs, "qwen2_vl", case, checkpointing=checkpointing)
        randomise_b(model)
        model.train()
        step_loss(model, context, batches["qwen2_vl"], RoutingLosses()).backward()
        grads.append({name: p.grad for name, p in trainable(model).items()})
    with_checkpointing, without = grads
    missing = [name for name, g in with_checkpointing.items() if g is None or not g.abs().sum() > 0]
    assert not missing, f"no gradient for {missing[:5]}"
    assert with_checkpointing.keys() == without.keys()
    for name in with_checkpointing:
        torch.testing.assert_close(with_checkpointing[name], without[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", MIXTURES)
def test_the_auxiliary_loss_reaches_the_routers_under_checkpointing(tiny_model_dirs, batches, case):
    router_grads = []
    for coefficients in (
        RoutingLosses(load_balance=0.0, z_loss=0.0),
        RoutingLosses(load_balance=1.0, z_loss=0.1, mutual_information=1.0, localized_balance=1.0),
    ):
        model, context = adapted(tiny_model_dirs, "llava", case, checkpointing=True)
        randomise_b(model)
        model.train()
        step_loss(model, context, batches["llava"], coefficients).backward()
        assert context.records and not context.recording  # recorded in the forward, not in the recomputation
        router_grads.append(torch.cat([m.weight.grad.flatten() for m in model.modules() if isinstance(m, Router)]))
    assert router_grads[0].abs().sum() > 0
    assert not torch.allclose(router_grads[0], router_grads[1])


@pytest.mark.parametrize("case", CASES)
def test_adapter_state_round_trips(tiny_model_dirs, batches, case):
    model, context = adapted(tiny_model_dirs, "llava", case, seed=0)
    randomise_b(model)
    state = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    other, other_context = adapted(tiny_model_dirs, "llava", case, seed=123)
    missing, unexpected = other.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if ".adapter." in k]
    batch = batches["llava"]
    outputs = []
    for m, c in ((model, context), (other, other_context)):
        with torch.no_grad(), c.step(batch["inputs"]["attention_mask"], None, batch["task_ids"]):
            outputs.append(m.eval()(**batch["inputs"], use_cache=False).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
