"""One table of checks every adapter passes, on the 4-bit tiny models of both families.

A new adapter joins by adding a row to ``CASES``. The DoRA and MASA plugins (plugins/mmpeft-dora,
plugins/mmpeft-masa) have rows too: each is registered from its source folder for this module, as a
third party's installed plugin would be. The adapter contract itself
(mmpeft.adapters.base.check_adapter_class) is checked on every row and on plugins that break it.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch
from conftest import fake_distribution
from test_backbone import _batch
from test_dora_plugin import forget_dora, register_dora
from test_masa_plugin import forget_masa, register_masa

from mmpeft import registry
from mmpeft.adapters import (
    AdaptedLinear,
    AdapterGroup,
    adapter_state_dict,
    describe_adapters,
    inject_adapters,
    load_adapter,
)
from mmpeft.adapters.base import Ability, abilities_of, check_adapter_class
from mmpeft.adapters.quant import BaseLayerView
from mmpeft.adapters.routing import Router, RoutingContext, RoutingLosses, routing_losses, weighted_sum
from mmpeft.cli import main
from mmpeft.errors import ConfigError
from mmpeft.models.backbone import Backbone, language_model, load_backbone
from mmpeft.objective import lm_loss, routed

CASES = {
    "lora": ("lora", {"r": 4, "dropout": 0.0}),
    "asymlora": ("asymlora", {"r": 4, "heads": 3, "dropout": 0.0}),
    "asymlora-inst-top2": ("asymlora", {"r": 4, "heads": 3, "routing": "instance", "top_k": 2, "dropout": 0.0}),
    # One router per block (attention, MLP), with a bias, as the reference code routes: every check below holds too.
    "asymlora-block": ("asymlora", {"r": 4, "heads": 3, "router": "block", "router_bias": True, "dropout": 0.0}),
    "moelora": ("moelora", {"r": 2, "experts": 4, "dropout": 0.0}),
    "moelora-top2": ("moelora", {"r": 2, "experts": 4, "top_k": 2, "dropout": 0.0}),
    "mixlora": ("mixlora", {"r": 4, "factors": 8, "dropout": 0.0}),
    "mixlora-paper": (
        "mixlora",
        {"r": 4, "factors": 8, "weighting": "straight_through", "pairing": "score", "dropout": 0.0},
    ),
    "dora": ("dora", {"r": 4, "dropout": 0.0}),  # the third-party plugin, from plugins/mmpeft-dora
    # Several A_i, one shared B (plugins/mmpeft-masa), per token and per instance with top-2.
    "masa": ("masa", {"r": 4, "heads": 3, "dropout": 0.0}),
    "masa-inst-top2": ("masa", {"r": 4, "heads": 3, "routing": "instance", "top_k": 2, "dropout": 0.0}),
}
ROUTED = {"asymlora", "moelora", "mixlora", "masa"}
MIXTURES = [case for case, (name, _) in CASES.items() if name in ROUTED]
CPU = torch.device("cpu")
ABILITIES = {
    "lora": {Ability.AS_LORA, Ability.DELTA_WEIGHT},
    "asymlora": {Ability.AS_LORA, Ability.BLOCK_ROUTER},
    "moelora": {Ability.AS_LORA},
    "mixlora": {Ability.UNMERGEABLE},
    "dora": {Ability.READS_BASE_WEIGHT, Ability.AS_DORA},
    "masa": {Ability.AS_LORA},
}
"""What each adapter declares; merge, export and injection act on exactly these."""


@pytest.fixture(scope="module", autouse=True)
def dora_plugin(tmp_path_factory):
    """The DoRA plugin from its source folder, registered as ``dora`` for this module (as an installed plugin)."""
    with pytest.MonkeyPatch.context() as patch:
        register_dora(tmp_path_factory.mktemp("dora-dist"), patch)
        yield
    forget_dora()


@pytest.fixture(scope="module", autouse=True)
def masa_plugin(tmp_path_factory):
    """The MASA plugin from its source folder, registered as ``masa`` for this module (as an installed plugin)."""
    with pytest.MonkeyPatch.context() as patch:
        register_masa(tmp_path_factory.mktemp("masa-dist"), patch)
        yield
    forget_masa()


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
    with routed(context, batch):
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


# -- the contract --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ABILITIES))
def test_every_adapter_meets_the_contract_and_declares_its_abilities(name):
    cls = load_adapter(name)  # loading from the entry point runs the checker
    check_adapter_class(cls, name)
    assert abilities_of(cls) == ABILITIES[name]
    row = next(r for r in describe_adapters() if r.name == name)
    assert row.error is None


@pytest.mark.parametrize("case", ["lora", "asymlora", "moelora", "mixlora", "dora", "masa"])
def test_the_shared_lora_init_draws_what_each_adapter_always_drew(case):
    """``lora_parts`` replaced five copies of the init: the same seed still gives the same ``A``, ``B``,
    dropout and scaling.

    The reference is the recipe each adapter wrote out before (``A = empty(rows, d_in)``, kaiming-uniform
    with ``a = sqrt(5)`` as the first draw, ``B = zeros(d_out, columns)``), with each adapter's stacking.
    """
    name, values = CASES[case]
    cls = load_adapter(name)
    config = registry.build_config(cls.config_class, {**values, "alpha": 6.0, "dropout": 0.1}, case)
    r = config.r
    rows, columns = {
        "lora": (r, r),
        "asymlora": (r, 3 * r),  # heads side by side in B
        "moelora": (4 * r, 4 * r),  # experts stacked in A, side by side in B
        "mixlora": (8, 8),  # pools of 8 factors
        "dora": (r, r),
        "masa": (3 * r, r),  # heads stacked in A, one shared B
    }[case]
    for seed in (0, 7):
        torch.manual_seed(seed)
        adapter = cls(24, 20, config)
        after = torch.rand(4)  # where the RNG stream stands once the adapter is built
        torch.manual_seed(seed)
        a = torch.empty(rows, 24)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        assert torch.equal(adapter.A, a) and torch.equal(adapter.B, torch.zeros(20, columns))
        assert list(adapter.state_dict())[:2] == ["A", "B"]  # registered in the same order: same checkpoint layout
        assert isinstance(adapter.dropout, torch.nn.Dropout) and adapter.dropout.p == 0.1
        assert adapter.scaling == 6.0 / r
        if name in ("lora", "dora"):  # nothing else draws: the stream continues exactly after A's draw
            assert torch.equal(after, torch.rand(4))
    quiet = cls(24, 20, registry.build_config(cls.config_class, {**values, "dropout": 0.0}, case))
    assert isinstance(quiet.dropout, torch.nn.Identity)
    if name == "dora":  # DoRA's magnitude starts at ||W||_row to the bit, as it always did
        base = torch.nn.Linear(24, 20)
        quiet.attach_base(BaseLayerView(base))
        assert torch.equal(quiet.m, torch.linalg.vector_norm(base.weight.detach(), dim=1))


BAD_PLUGINS = """
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Config:
    r: int = 2


class Base(nn.Module):
    config_class = Config

    def __init__(self, in_features, out_features, config):
        super().__init__()

    def forward(self, x, base_out):
        return torch.zeros_like(base_out)


class MissingMethod(Base):
    abilities = frozenset({"as_lora", "reads_base_weight"})

    def as_lora(self, gate=None):
        raise NotImplementedError


class OldForward(Base):
    def forward(self, x):
        return x


class UnknownAbility(Base):
    abilities = frozenset({"mergeable"})


class PlainConfig(Base):
    config_class = dict
"""


@pytest.fixture
def bad_plugins(tmp_path, monkeypatch):
    """Four adapter plugins of one installed distribution, each breaking the contract in one way."""
    entry_points = "".join(
        f"{name} = badplug_mod:{cls}\n"
        for name, cls in [
            ("missing", "MissingMethod"),
            ("oldforward", "OldForward"),
            ("unknown", "UnknownAbility"),
            ("plainconfig", "PlainConfig"),
        ]
    )
    fake_distribution(tmp_path, "badplug", "0.2", "[mmpeft.adapters]\n" + entry_points)
    (tmp_path / "badplug_mod.py").write_text(BAD_PLUGINS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("badplug_mod", None)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("missing", "declares 'reads_base_weight' but defines no attach_base()"),
        ("oldforward", "forward(self, x) does not take (x, base_out): adapters are called as adapter(x, base_out)"),
        ("unknown", "unknown ability 'mergeable' (known: reads_base_weight, reads_base_output, as_lora, as_dora, "),
        ("plainconfig", "config_class <class 'dict'> is not a dataclass"),
    ],
)
def test_a_plugin_that_breaks_the_contract_is_refused_naming_what_is_missing(
    bad_plugins, tiny_llama, capsys, name, problem
):
    cls_name = {
        "missing": "MissingMethod",
        "oldforward": "OldForward",
        "unknown": "UnknownAbility",
        "plainconfig": "PlainConfig",
    }[name]
    who = f"adapter plugin '{name}' (badplug_mod.{cls_name}, from badplug 0.2) does not meet the adapter contract"
    with pytest.raises(ConfigError) as refused:
        load_adapter(name)
    assert str(refused.value).startswith(who) and problem in str(refused.value)
    # Through a config's adapter group, the same error before any layer is touched.
    with pytest.raises(ConfigError, match="does not meet the adapter contract"):
        inject_adapters(tiny_llama.model, [AdapterGroup(name, ["q_proj"])])
    assert not any(isinstance(m, AdaptedLinear) for m in tiny_llama.modules())
    # `python -m mmpeft adapters` lists it with the error in its row; the others load.
    rows = {r.name: r for r in describe_adapters()}
    assert problem in rows[name].error and rows["lora"].error is None
    assert main(["adapters"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(f"{name} "))
    assert "BROKEN: " + who in line and problem in line


@dataclasses.dataclass
class GainConfig:
    """No hyperparameters."""


class Gain(torch.nn.Module):
    """An update autograd cannot add in place: ``g * base_out`` keeps ``base_out`` for ``g``'s gradient."""

    config_class = GainConfig
    abilities = frozenset({Ability.READS_BASE_OUTPUT})

    def __init__(self, in_features: int, out_features: int, config: object) -> None:
        super().__init__()
        self.g = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return self.g * base_out


@pytest.mark.parametrize("declared", [True, False])
def test_an_adapter_declaring_reads_base_output_is_added_out_of_place(declared):
    cls = Gain if declared else type("Undeclared", (Gain,), {"abilities": frozenset()})
    check_adapter_class(cls)
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 6)
    layer = AdaptedLinear(base, cls(12, 6, None), "gain")
    assert layer.inplace_add and layer.reads_base_output == declared  # the lever is on; the declaration decides
    x = torch.randn(3, 12, requires_grad=True)
    y = layer(x)
    if not declared:  # added in place into the tensor g's gradient needs: autograd refuses at backward
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
        return
    y.sum().backward()  # a real backward through the out-of-place add
    plain = base(x.detach())
    torch.testing.assert_close(y, 1.5 * plain)
    torch.testing.assert_close(layer.adapter.g.grad, plain.sum())
    torch.testing.assert_close(x.grad, 1.5 * base.weight.sum(0).expand(3, 12))
