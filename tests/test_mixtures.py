"""The mixture adapters' math: equivalences with LoRA, loop references, routing losses, generation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from mmpeft.adapters import AdapterGroup, inject_adapters
from mmpeft.adapters.asymlora import AsymLoRA, AsymLoRAConfig
from mmpeft.adapters.lora import LoRA, LoRAConfig
from mmpeft.adapters.mixlora import MixLoRA, MixLoRAConfig
from mmpeft.adapters.moelora import MoELoRA, MoELoRAConfig
from mmpeft.adapters.routing import (
    GateMeans,
    Router,
    RouterRecord,
    RoutingContext,
    RoutingLosses,
    RoutingStats,
    bind_routers,
    block_gate,
    load_balance_loss,
    localized_balance_loss,
    mutual_information_loss,
    pooled_load_balance_loss,
    routing_losses,
    selection_weights,
    task_groups,
    top_k_gate,
    z_loss,
)
from mmpeft.models.backbone import Backbone, language_model, load_backbone

D_IN, D_OUT, R = 12, 10, 4


def lora_twin(a: torch.Tensor, b: torch.Tensor, alpha: float = 8.0) -> LoRA:
    lora = LoRA(D_IN, D_OUT, LoRAConfig(r=a.shape[0], alpha=alpha, dropout=0.0))
    with torch.no_grad():
        lora.A.copy_(a)
        lora.B.copy_(b)
    return lora


def assert_is_lora(adapter, x: torch.Tensor) -> None:
    """With its ``B`` randomised, ``adapter`` gives the outputs and the A, B and input gradients of a LoRA
    with its A and B."""
    torch.nn.init.normal_(adapter.B)
    lora = lora_twin(adapter.A.detach(), adapter.B.detach())
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = adapter(x1), lora(x2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for ours, theirs in ((x1, x2), (adapter.A, lora.A), (adapter.B, lora.B)):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "adapter",
    [
        lambda: AsymLoRA(D_IN, D_OUT, AsymLoRAConfig(r=R, alpha=8, dropout=0.0, heads=1)),
        lambda: AsymLoRA(D_IN, D_OUT, AsymLoRAConfig(r=R, alpha=8, dropout=0.0, heads=1, routing="instance")),
        lambda: MoELoRA(D_IN, D_OUT, MoELoRAConfig(r=R, alpha=8, dropout=0.0, experts=1)),
    ],
    ids=["asymlora-one-head", "asymlora-one-head-per-instance", "moelora-one-expert"],
)
def test_a_mixture_of_one_is_lora(adapter):
    torch.manual_seed(0)
    assert_is_lora(adapter(), torch.randn(2, 5, D_IN))


def test_mixlora_with_the_whole_pool_chosen_and_routers_fixed_is_lora_of_rank_r():
    torch.manual_seed(0)
    adapter = MixLoRA(D_IN, D_OUT, MixLoRAConfig(r=R, alpha=8, dropout=0.0, factors=R))
    batch = 3
    identity = torch.arange(R).expand(batch, R)
    ones = torch.ones(batch, R)
    adapter.route = lambda x: (identity, ones, identity, ones)  # fixed routers: factor k pairs with factor k
    assert_is_lora(adapter, torch.randn(batch, 5, D_IN))  # B A = sum_k b_k a_k^T


def test_asymlora_and_moelora_equal_their_per_expert_loops():
    torch.manual_seed(0)
    x = torch.randn(2, 5, D_IN)
    asym = AsymLoRA(D_IN, D_OUT, AsymLoRAConfig(r=R, alpha=8, dropout=0.0, heads=3, top_k=2))
    torch.nn.init.normal_(asym.B)
    gate, _ = top_k_gate(torch.softmax(x @ asym.router.weight.T, -1), 2)  # (2, 5, 3)
    loop = sum(gate[..., i : i + 1] * (x @ asym.A.T @ asym.head(i).T) for i in range(3)) * asym.scaling
    torch.testing.assert_close(asym(x), loop, rtol=1e-5, atol=1e-6)

    moe = MoELoRA(D_IN, D_OUT, MoELoRAConfig(r=2, alpha=8, dropout=0.0, experts=4))
    torch.nn.init.normal_(moe.B)
    gate = torch.softmax(x @ moe.router.weight.T, -1)  # (2, 5, 4)
    loop = (
        sum(gate[..., e : e + 1] * (x @ moe.A[2 * e : 2 * e + 2].T @ moe.B[:, 2 * e : 2 * e + 2].T) for e in range(4))
        * moe.scaling
    )
    torch.testing.assert_close(moe(x), loop, rtol=1e-5, atol=1e-6)
    assert math.isclose(moe.scaling, 4.0)


PAPER = {"weighting": "straight_through", "pairing": "score"}
"""MixLoRA's released forward (chosen factors unweighted, paired in score order), with gradients to the routers."""


def test_mixlora_equals_its_per_instance_dense_update_and_routes_on_the_prompt():
    """The reference materialises ``delta_W`` per instance; ours gathers factors. Routing ignores answer tokens."""
    torch.manual_seed(0)
    adapter = MixLoRA(D_IN, D_OUT, MixLoRAConfig(r=R, alpha=8, dropout=0.0, factors=10, pairing="score"))
    torch.nn.init.normal_(adapter.B)
    torch.nn.init.normal_(adapter.condition)
    x = torch.randn(3, 6, D_IN)
    prompt = torch.ones(3, 6, dtype=torch.bool)
    prompt[:, 4:] = False  # the last two tokens are the answer
    context = RoutingContext()
    for router in (adapter.router_a, adapter.router_b):
        router.bind(context, "layer")
    with context.step(torch.ones(3, 6), prompt):
        out = adapter(x)
        index_a, weight_a, index_b, weight_b = adapter.route(x)
    for i in range(3):
        delta_w = sum(
            weight_b[i, k] * weight_a[i, k] * torch.outer(adapter.B[:, index_b[i, k]], adapter.A[index_a[i, k]])
            for k in range(R)
        )
        torch.testing.assert_close(out[i], x[i] @ delta_w.T * adapter.scaling, rtol=1e-5, atol=1e-6)
    # The reference B scores: instance softmax plus the summed softmaxes of the chosen A-factors' projections.
    h = x[:, :4].mean(1)  # (3, d_in): pooled over the prompt only
    scores_b = torch.softmax(h @ adapter.router_b.weight.T, -1) + torch.softmax(
        adapter.A[index_a] @ adapter.condition.T, -1
    ).sum(1)
    assert torch.equal(index_b, scores_b.topk(R, -1).indices)
    assert torch.equal(index_a, (h @ adapter.router_a.weight.T).topk(R, -1).indices)
    # Changing the answer tokens changes nothing about the routing.
    x2 = x.clone()
    x2[:, 4:] += 5
    with context.step(torch.ones(3, 6), prompt):
        assert torch.equal(adapter.route(x2)[0], index_a)
    assert len(context.records) == 2 and context.records[0].probs.shape == (3, 1, 10)


def test_mixlora_straight_through_keeps_the_paper_forward_and_trains_the_routers():
    torch.manual_seed(0)
    adapter = MixLoRA(D_IN, D_OUT, MixLoRAConfig(r=R, alpha=8, dropout=0.0, factors=10, **PAPER))
    torch.nn.init.normal_(adapter.B)
    x = torch.randn(2, 5, D_IN)
    index_a, weight_a, index_b, weight_b = adapter.route(x)
    assert torch.equal(weight_a, torch.ones_like(weight_a)) and torch.equal(weight_b, torch.ones_like(weight_b))
    adapter(x).pow(2).sum().backward()
    for param in (adapter.router_a.weight, adapter.router_b.weight, adapter.condition):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_mixlora_stays_finite_when_its_routers_saturate():
    # Saturated routers give chosen factors a probability of exactly 0 in float32, where
    # score / stop_grad(score) was 0 / 0: NaN outputs, and training diverged (the conflict suite saw it).
    torch.manual_seed(0)
    adapter = MixLoRA(D_IN, D_OUT, MixLoRAConfig(r=R, alpha=8, dropout=0.0, factors=10, **PAPER))
    torch.nn.init.normal_(adapter.B)
    with torch.no_grad():
        for router in (adapter.router_a, adapter.router_b):
            router.weight.normal_(std=1000.0)
    x = torch.randn(2, 5, D_IN)
    probs = torch.softmax(adapter.router_a.logits(adapter.router_a.context.pool(x)), dim=-1)  # (2, 10)
    assert (probs.topk(R, dim=-1).values == 0).any()  # the regime that produced NaN
    _, weight_a, _, weight_b = adapter.route(x)
    assert torch.equal(weight_a, torch.ones_like(weight_a)) and torch.equal(weight_b, torch.ones_like(weight_b))
    out = adapter(x)
    assert torch.isfinite(out).all()
    out.pow(2).sum().backward()
    for param in (adapter.A, adapter.B, adapter.router_a.weight, adapter.router_b.weight, adapter.condition):
        assert param.grad is not None and torch.isfinite(param.grad).all()


# -- MixLoRA routes through the shared router: the same numbers as before, and what it logs is what ran --

# Fingerprints of MixLoRA's forward and gradients, taken from the code before its routing moved into
# mmpeft.adapters.routing (commit f508c2c): each tensor's sum against a fixed random probe, and the
# chosen factors of the three samples. The refactor reproduced every tensor bit for bit.
MIXLORA_BEFORE = {
    ("straight_through", 1.0): (
        {
            "out": 110.1140078772297,
            "x.grad": -55.78985331363692,
            "A.grad": 340.17131835599685,
            "B.grad": -401.71200080502456,
            "condition.grad": 44.241479374801955,
            "router_a.weight.grad": 141.52669837108044,
            "router_b.weight.grad": -11.176797278119722,
        },
        [[4, 8, 5, 2], [0, 1, 5, 9], [8, 5, 4, 9]],
        [[6, 9, 8, 1], [1, 5, 6, 4], [9, 6, 1, 8]],
    ),
    # Saturated routers (weights x 1000): the regime of the NaN regression above.
    ("straight_through", 1000.0): (
        {
            "out": 136.34321177731334,
            "x.grad": 811480.2709443924,
            "A.grad": -78.07588975582979,
            "B.grad": -402.13796598674566,
            "condition.grad": 65.26047998924257,
            "router_a.weight.grad": 1442.145160070593,
            "router_b.weight.grad": 0.0,
        },
        [[4, 8, 5, 2], [0, 1, 5, 9], [8, 5, 4, 9]],
        [[6, 9, 8, 1], [1, 5, 6, 4], [9, 1, 8, 6]],
    ),
    ("score", 1.0): (
        {
            "out": 331.2631503013364,
            "x.grad": 383.3578469282357,
            "A.grad": 830.0340927881638,
            "B.grad": -597.5075237497167,
            "condition.grad": -304.73764449294225,
            "router_a.weight.grad": 334.43463861359817,
            "router_b.weight.grad": -8.427896373266307,
        },
        [[4, 8, 5, 2], [0, 1, 5, 9], [8, 5, 4, 9]],
        [[6, 9, 8, 1], [1, 5, 6, 4], [9, 6, 1, 8]],
    ),
    ("score", 1000.0): (
        {
            "out": 844.1425428408738,
            "x.grad": 67.75229778420967,
            "A.grad": 1498.2642025798323,
            "B.grad": -431.5429735954312,
            "condition.grad": -335.43632342615433,
            "router_a.weight.grad": 0.0,
            "router_b.weight.grad": 0.0,
        },
        [[4, 8, 5, 2], [0, 1, 5, 9], [8, 5, 4, 9]],
        [[6, 9, 8, 1], [1, 5, 6, 4], [9, 1, 8, 6]],
    ),
}


def delta(adapter: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The adapter's update for the layer input ``x``."""
    return adapter(x)


def spy_on_route(adapter: MixLoRA) -> list:
    """Keeps what every call of ``adapter.route`` returned (the forward's own routing: indices and weights)."""
    seen, route = [], adapter.route
    adapter.route = lambda x: seen.append(route(x)) or seen[-1]
    return seen


@pytest.mark.parametrize(("weighting", "router_scale"), list(MIXLORA_BEFORE))
def test_mixlora_forward_and_gradients_are_those_from_before_the_shared_router(weighting, router_scale):
    config = MixLoRAConfig(r=R, alpha=8, dropout=0.0, factors=10, weighting=weighting, pairing="score")
    adapter = MixLoRA(D_IN, D_OUT, config)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():  # every parameter set here, whatever the constructor's initialisation draws
        for name, param in sorted(adapter.named_parameters()):
            scale = router_scale if name.startswith("router") else 1.0
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    generator = torch.Generator().manual_seed(99)
    x = torch.randn(3, 6, D_IN, generator=generator).requires_grad_()
    out_weights = torch.randn(3, 6, D_OUT, generator=generator)
    prompt = torch.ones(3, 6, dtype=torch.bool)
    prompt[:, 4:] = False
    prompt[2, 3:] = False
    real = torch.ones(3, 6, dtype=torch.bool)
    real[2, 5:] = False
    context = RoutingContext()
    bind_routers(adapter, context, "layer")
    seen = spy_on_route(adapter)
    with context.step(real, prompt):
        out = delta(adapter, x)
    (out * out_weights).sum().backward()
    tensors = {"out": out.detach(), "x.grad": x.grad, **{f"{n}.grad": p.grad for n, p in adapter.named_parameters()}}
    probe = torch.Generator().manual_seed(7)
    sums = {
        key: float((value.double() * torch.randn(value.shape, generator=probe, dtype=torch.float64)).sum())
        for key, value in tensors.items()
    }
    expected, index_a, index_b = MIXLORA_BEFORE[weighting, router_scale]
    assert sums == pytest.approx(expected, rel=1e-5)
    assert seen[0][0].tolist() == index_a and seen[0][2].tolist() == index_b


def conditioned_mixlora(weighting: str = "straight_through", **config) -> tuple[MixLoRA, torch.Tensor]:
    """A MixLoRA (6 factors, r=2) and an input on which ``p_B``'s own top-2 is factors {0, 1} while the
    B scores with the conditional term, ``p_B + sum_k softmax(C a_k)``, choose {4, 5}."""
    adapter = MixLoRA(4, 3, MixLoRAConfig(r=2, alpha=4, dropout=0.0, factors=6, weighting=weighting, **config))
    torch.nn.init.normal_(adapter.B)
    preference = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0])  # (E,): logits for the input direction e_0
    with torch.no_grad():
        for router in (adapter.router_a, adapter.router_b):
            router.weight.zero_()
            router.weight[:, 0] = preference  # p_A and p_B: top-2 is {0, 1}
        adapter.A.zero_()
        adapter.A[:, 1] = 1.0  # every A-factor is e_1 ...
        adapter.condition.zero_()
        adapter.condition[4:, 1] = 5.0  # ... and C sends each chosen one to factors 4 and 5 (softmax ~0.49 each)
    x = torch.zeros(2, 3, 4)
    x[..., 0] = 1.0  # (batch, seq, d_in): every token is e_0
    x[1, :, 0] = 0.5  # the second sample routes the same way, less sharply
    return adapter, x


@pytest.mark.parametrize("weighting", ["straight_through", "score"])
def test_mixlora_logs_the_factors_its_forward_used(weighting):
    """Records, routing statistics and merge's gate means count the B-factors that ran (its conditional term
    included), not the top-r of the B router's own probabilities."""
    adapter, x = conditioned_mixlora(weighting)
    context = RoutingContext()
    bind_routers(adapter, context, "layer", group="mixlora")
    stats, means = RoutingStats(num_tasks=2), GateMeans()
    context.observers += [stats.add, means.add]
    seen = spy_on_route(adapter)
    with context.step(torch.ones(2, 3), task_ids=torch.tensor([0, 1])):
        delta(adapter, x)
    index_a, weight_a, index_b, weight_b = seen[0]  # (batch, r) each, as the forward used them
    record_a, record_b = context.records
    assert record_b.probs[:, 0].topk(2, dim=-1).indices.sort().values.tolist() == [[0, 1], [0, 1]]
    assert index_b.sort().values.tolist() == [[4, 5], [4, 5]]  # the case where they differ

    for record, index, weight in ((record_a, index_a, weight_a), (record_b, index_b, weight_b)):
        used = torch.zeros(2, 6, dtype=torch.bool).scatter_(-1, index, True)  # (batch, E)
        assert torch.equal(record.selected[:, 0], used)
        applied = torch.zeros(2, 6).scatter_(-1, index, weight.detach() / weight.detach().sum(-1, keepdim=True))
        torch.testing.assert_close(record.gate[:, 0], applied)
        assert torch.allclose(record.gate.sum(-1), torch.ones(2, 1))
    if weighting == "straight_through":  # the forward uses the chosen factors unweighted
        assert record_b.gate[:, 0].tolist() == [[0, 0, 0, 0, 0.5, 0.5]] * 2

    load_b = torch.zeros(6).index_add_(0, index_b.flatten(), weight_b.detach().flatten() / weight_b.detach().sum())
    results = stats.results()
    torch.testing.assert_close(results["mixlora/router_b"].load, load_b)
    assert results["mixlora/router_b"].load[:4].tolist() == [0.0] * 4
    # Task x expert: each task is one sample here, so its row is that sample's applied gate.
    torch.testing.assert_close(results["mixlora/router_b"].task_expert, record_b.gate[:, 0])
    torch.testing.assert_close(means.means()["layer.router_b"], load_b)
    torch.testing.assert_close(means.means()["layer.router_a"], results["mixlora/router_a"].load)


@pytest.mark.parametrize("weighting", ["straight_through", "score"])
def test_mixlora_index_pairing_multiplies_the_same_chosen_factors_in_factor_order(weighting):
    """``pairing: index`` chooses the same A- and B-factors as the paper's score order, and pairs them in factor-index
    order: the update is ``s sum_k w_k (x . a_{i_k}) b_{j_k}`` with ``i`` and ``j`` each sorted, by hand."""
    torch.manual_seed(3)
    x = torch.randn(3, 5, D_IN)  # (batch, seq, d_in)
    scored = MixLoRA(
        D_IN, D_OUT, MixLoRAConfig(r=3, alpha=6, dropout=0.0, factors=7, weighting=weighting, pairing="score")
    )
    indexed = MixLoRA(
        D_IN, D_OUT, MixLoRAConfig(r=3, alpha=6, dropout=0.0, factors=7, weighting=weighting, pairing="index")
    )
    with torch.no_grad():
        for param in scored.parameters():
            param.normal_()
    indexed.load_state_dict(scored.state_dict())
    for adapter in (scored, indexed):
        bind_routers(adapter, RoutingContext(), "layer")
    seen_scored, seen_indexed = spy_on_route(scored), spy_on_route(indexed)
    out = delta(indexed, x)  # (batch, seq, d_out)
    delta(scored, x)
    (ia, wa, ib, wb), (sa, _, sb, _) = seen_indexed[0], seen_scored[0]
    assert torch.equal(ia, sa.sort(dim=1).values) and torch.equal(ib, sb.sort(dim=1).values)
    assert not torch.equal(sa, ia) or not torch.equal(sb, ib)  # the two orders differ somewhere here
    expected = torch.zeros(3, 5, D_OUT)
    for n in range(3):
        for k in range(3):
            a, b = indexed.A[ia[n, k]] * wa[n, k], indexed.B[:, ib[n, k]] * wb[n, k]
            expected[n] += (x[n] @ a)[:, None] * b[None, :]
    torch.testing.assert_close(out, expected * indexed.scaling, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("condition_in_losses", [False, True])
def test_mixlora_condition_reaches_the_routing_losses_only_when_asked(condition_in_losses):
    """With ``condition_in_losses`` the B router's record is its whole score over ``1 + r`` (a distribution), so the
    load balance has a gradient on ``C``; without, the record is ``softmax(R_B h)`` and ``C`` gets none from it."""
    adapter, x = conditioned_mixlora("score", condition_in_losses=condition_in_losses)
    context = RoutingContext()
    bind_routers(adapter, context, "layer", group="mixlora")
    with context.step(torch.ones(2, 3), task_ids=torch.tensor([0, 1])):
        delta(adapter, x)
        loss = routing_losses(context, RoutingLosses(z_loss=0))["load_balance"]
    record_b = context.records[1]
    torch.testing.assert_close(record_b.probs.sum(-1), torch.ones(2, 1))
    (grad,) = torch.autograd.grad(loss, adapter.condition, allow_unused=True)
    if condition_in_losses:
        assert record_b.probs[0, 0, 4] > 0.2  # the conditional term's mass on factors 4 and 5 is in the record
        assert grad is not None and grad.abs().sum() > 0
    else:
        assert record_b.probs[0, 0, 4] < 0.05
        assert grad is None or grad.abs().sum() == 0


def test_selecting_router_weights_and_records():
    """Router.select by hand: scores, top-k, the two weightings and the recorded gate."""
    torch.manual_seed(0)
    router = Router(5, 6, level="instance", top_k=3, temperature=2.0, weighting="score")
    context = RoutingContext()
    router.bind(context, "r")
    h = torch.randn(2, 1, 5)  # (batch, 1, d_in): pooled
    conditional = torch.randn(2, 1, 3, 6)  # (batch, 1, n, E)
    with context.step(None):
        chosen = router.select(h, conditional_logits=conditional)
    scores = torch.softmax(router.logits(h) / 2.0, -1) + torch.softmax(conditional / 2.0, -1).sum(-2)  # (2, 1, 6)
    top = scores.topk(3, dim=-1)
    assert torch.equal(chosen.index, top.indices)
    torch.testing.assert_close(chosen.weight, 3 * top.values / top.values.sum(-1, keepdim=True))
    (record,) = context.records
    assert record.level == "instance" and record.top_k == 3 and record.probs.shape == (2, 1, 6)
    torch.testing.assert_close(record.probs, torch.softmax(router.logits(h) / 2.0, -1))
    torch.testing.assert_close(record.gate.gather(-1, top.indices), top.values / top.values.sum(-1, keepdim=True))
    # Straight-through: 1 forward, the score's gradient backward.
    log_score = torch.tensor([[-0.5, -1.0]], requires_grad=True)
    weight = selection_weights(log_score, "straight_through")
    assert weight.tolist() == [[1.0, 1.0]]
    weight.sum().backward()
    assert log_score.grad.tolist() == [[1.0, 1.0]]  # d exp(s - stop(s)) / ds = 1
    with pytest.raises(ValueError, match="weighting must be"):
        Router(5, 6, weighting="hard")


# -- AsymLoRA's routing names the router's level ------------------------------------------------


def test_a_block_router_gates_the_whole_mlp_from_its_input(tiny_model_dirs):
    """router: block (the reference code's routing): one router per MLP, with its bias, reading the block's input;
    gate_proj, up_proj and down_proj all apply its gate, and only it is recorded and saved."""
    import torch.nn.functional as F
    from test_backbone import _batch

    from mmpeft.adapters import adapter_state_dict
    from mmpeft.objective import routed

    path = tiny_model_dirs["llava"]
    model = load_backbone(Backbone(pretrained=path), torch.device("cpu"))
    context = RoutingContext()
    config = {"r": 4, "heads": 3, "router": "block", "router_bias": True, "dropout": 0.0}
    wrapped = inject_adapters(language_model(model), [AdapterGroup("asymlora", ["mlp"], config)], context)
    layers = len(language_model(model).layers)
    routers = {n: m for n, m in model.named_modules() if isinstance(m, Router)}
    assert len(routers) == layers and all(n.endswith("mlp.gate_proj.adapter.router") for n in routers)
    assert all(r.bias is not None for r in routers.values())
    saved = [k for k in adapter_state_dict(model) if ".router." in k]
    assert len(saved) == 2 * layers  # weight and bias, once per block
    torch.manual_seed(0)
    for layer in wrapped.values():
        torch.nn.init.normal_(layer.adapter.B, std=0.1)
    seen = {}
    mlp = language_model(model).layers[0].mlp

    def block_input(module, args):
        seen.setdefault("x", args[0].detach())

    def down_output(module, args, out):
        seen.setdefault("down", (args[0].detach(), out.detach()))

    mlp.register_forward_pre_hook(block_input)
    down = wrapped["layers.0.mlp.down_proj"]
    down.register_forward_hook(down_output)
    batch = _batch(path)
    with routed(context, batch):
        model(**batch["inputs"])
    assert [r.name for r in context.records] == [f"layers.{i}.mlp" for i in range(layers)]
    router = down.adapter.shared_router
    expected = torch.softmax(F.linear(seen["x"].float(), router.weight, router.bias), -1)  # (batch, seq, 3)
    assert torch.allclose(context.records[0].gate, expected, atol=1e-6)
    # down_proj reads the intermediate activations but applies the block's gate.
    x_down, out = seen["down"]
    adapter = down.adapter
    z = F.linear(x_down.float(), adapter.A)  # (batch, seq, r)
    delta = F.linear((expected.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2), adapter.B) * adapter.scaling
    assert torch.allclose(out.float(), down.base(x_down).float() + delta, atol=1e-4)


def test_a_block_router_refuses_a_projection_that_reads_another_sequence():
    router = Router(8, 3)
    router.shared_gate = torch.softmax(torch.randn(2, 5, 3), -1)
    with pytest.raises(RuntimeError, match="gates \\(2, 5\\) tokens but a projection of the block reads \\(2, 7\\)"):
        block_gate(router, torch.randn(2, 7, 8))
    assert block_gate(router, torch.randn(2, 5, 16)) is router.shared_gate


def test_asymlora_reads_the_old_routing_name_sequence_as_instance():
    old = AsymLoRAConfig(r=R, heads=3, routing="sequence")
    assert old.routing == "instance" and old == AsymLoRAConfig(r=R, heads=3, routing="instance")
    assert AsymLoRA(D_IN, D_OUT, old).router.level == "instance"
    assert AsymLoRA(D_IN, D_OUT, AsymLoRAConfig(r=R)).router.level == "token"
    with pytest.raises(ValueError, match="routing must be 'token' or 'instance', got 'sample'"):
        AsymLoRAConfig(routing="sample")


def test_an_adapter_directory_saved_with_routing_sequence_still_loads(tiny_model_dirs, tmp_path):
    from test_backbone import _batch
    from test_lifecycle import adapted, logits, spec_of

    from mmpeft.saving import CONFIG_NAME, apply_adapter, save_adapter, trainable_tensors

    model_dir = tiny_model_dirs["llava"]
    groups = [AdapterGroup("asymlora", ["mlp"], {"r": 4, "heads": 3, "routing": "instance"})]
    model = adapted(model_dir, groups)
    out = save_adapter(tmp_path / "a", spec_of(model, model_dir, groups), trainable_tensors(model))
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["adapters"][0]["config"]["routing"] == "instance"
    config["adapters"][0]["config"]["routing"] = "sequence"  # as adapters saved before the rename hold it
    (out / CONFIG_NAME).write_text(json.dumps(config))

    fresh = load_backbone(Backbone(pretrained=model_dir), torch.device("cpu")).eval()
    apply_adapter(fresh, out)
    routers = [m.router for m in fresh.modules() if isinstance(m, AsymLoRA)]
    assert routers and all(router.level == "instance" for router in routers)
    batch = _batch(model_dir)
    assert torch.equal(logits(fresh, batch), logits(model, batch))


# -- routing losses against direct computations on hand-made tensors -------------------------

LOGITS = torch.tensor(
    [[[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]], [[0.0, 0.0, 3.0], [1.0, -2.0, 0.5]]]
)  # (2 samples, 2 tokens, 3 experts)
MASK = torch.tensor([[True, True], [True, False]])  # sample 1's second token is padding
TASKS = torch.tensor([0, 1])


def record(top_k=None) -> RouterRecord:
    probs = torch.softmax(LOGITS, -1)
    gate, selected = top_k_gate(probs, top_k)
    return RouterRecord("layer", LOGITS, probs, selected, top_k or 3, "token", gate)


def test_load_balance_and_z_loss_by_hand():
    probs = torch.softmax(LOGITS, -1)
    real = [probs[0, 0], probs[0, 1], probs[1, 0]]
    mean_p = sum(real) / 3
    # Dense router: f counts each token's top-1 expert: experts 0, 1, 2 once each.
    assert torch.isclose(load_balance_loss(record(), MASK), 3 * (mean_p / 3).sum())
    # Top-2: token 0 -> {0, 1}, token 1 -> {1, 0}, token 2 -> {2, 0 or 1 (tie at 0.0)}.
    rec = record(top_k=2)
    f = rec.selected[MASK].float().mean(0)
    assert f.sum() == 2 and f[0] >= 2 / 3 and f[1] >= 2 / 3
    assert torch.isclose(load_balance_loss(rec, MASK), 3 * (f * mean_p).sum())
    lse = [torch.logsumexp(LOGITS[0, 0], 0), torch.logsumexp(LOGITS[0, 1], 0), torch.logsumexp(LOGITS[1, 0], 0)]
    assert torch.isclose(z_loss(record(), MASK), sum(v**2 for v in lse) / 3)


def test_the_reference_codes_pooled_load_balance_by_hand():
    """AsymLoRA/HydraLoRA's form: per sample over every layer's real tokens, no factor E, mean over samples."""
    probs = torch.softmax(LOGITS, -1)
    second = LOGITS.flip(-1)  # a second layer that routes otherwise
    probs2 = torch.softmax(second, -1)
    layers = [
        record(),
        RouterRecord("layer2", second, probs2, torch.ones_like(probs2, dtype=torch.bool), 3, "token", probs2),
    ]
    # Sample 0: tokens 0, 1 of both layers; sample 1: token 0 of both layers (its token 1 is padding).
    by_sample = []
    for b, tokens in ((0, [0, 1]), (1, [0])):
        p = torch.stack([q[b, t] for q in (probs, probs2) for t in tokens])  # (layers x tokens, E)
        top1 = torch.nn.functional.one_hot(p.argmax(-1), 3).float()
        by_sample.append((p.mean(0) * top1.mean(0)).sum())
    expected = sum(by_sample) / 2
    assert torch.isclose(pooled_load_balance_loss(layers, [MASK, MASK]), expected)
    # Through routing_losses, selected by load_balance_pooling; the layer form sums E * sum f P over the layers.
    context = RoutingContext()
    context.records = layers
    context.attention_mask = MASK
    pooled = routing_losses(context, RoutingLosses(load_balance_pooling="sample", z_loss=0))["load_balance"]
    summed = routing_losses(context, RoutingLosses(z_loss=0))["load_balance"]
    assert torch.isclose(pooled, expected)
    assert torch.isclose(summed, load_balance_loss(layers[0], MASK) + load_balance_loss(layers[1], MASK))
    # At uniform routing the two forms are 1/E and L (= 2 layers): the E x L factor the coefficient must absorb.
    flat = torch.zeros(2, 2, 3)
    uniform = RouterRecord(
        "u",
        flat,
        torch.softmax(flat, -1),
        torch.ones(2, 2, 3, dtype=torch.bool),
        3,
        "token",
        torch.full((2, 2, 3), 1 / 3),
    )
    context.records = [uniform, uniform]
    pooled = routing_losses(context, RoutingLosses(load_balance_pooling="sample", z_loss=0))["load_balance"]
    summed = routing_losses(context, RoutingLosses(z_loss=0))["load_balance"]
    assert torch.isclose(pooled, torch.tensor(1 / 3)) and torch.isclose(summed, torch.tensor(2.0))


def test_localized_balance_by_hand():
    probs = torch.softmax(LOGITS, -1)
    q = torch.stack([probs[0, 0] + probs[0, 1], probs[1, 0]], dim=1)  # (3 experts, 2 samples)
    # 3 experts, 2 tasks: groups {0, 1} -> task 0 and {2} -> task 1.
    assert task_groups(3, 2).tolist() == [[True, True, False], [False, False, True]]
    delta = 0.1
    weights = torch.tensor([[1.1, 0.9], [1.1, 0.9], [0.9, 1.1]])
    z = weights * q
    expected = z.var(unbiased=True) / (z.mean() ** 2 + 1e-10)  # LoRAMoE's cv_squared: the unbiased variance
    assert torch.isclose(localized_balance_loss(record(), MASK, TASKS, 2, delta), expected)


def test_mutual_information_by_hand():
    probs = torch.softmax(LOGITS, -1)
    p_e_given_0 = (probs[0, 0] + probs[0, 1]) / 2
    p_e_given_1 = probs[1, 0]
    p_t = torch.tensor([2 / 3, 1 / 3])  # task 0 has two real tokens, task 1 one
    p_e = p_t[0] * p_e_given_0 + p_t[1] * p_e_given_1
    entropy = lambda p: -(p * p.log()).sum()  # noqa: E731
    expected = p_t[0] * entropy(p_e_given_0) + p_t[1] * entropy(p_e_given_1) - entropy(p_e)
    assert torch.isclose(mutual_information_loss(record(), MASK, TASKS, 2), expected, atol=1e-6)
    # Perfectly specialised routing reaches -log(2), the most information two tasks can carry.
    hard = RouterRecord(
        "l",
        torch.zeros(2, 1, 2),
        torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]),
        torch.ones(2, 1, 2, dtype=torch.bool),
        2,
        "token",
        torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]),
    )
    assert torch.isclose(
        mutual_information_loss(hard, torch.ones(2, 1, dtype=torch.bool), TASKS, 2),
        torch.tensor(-math.log(2)),
        atol=1e-5,
    )


# -- generation -----------------------------------------------------------------------------


class RoutingSnapshots(StoppingCriteria):
    """Records the routing context's instance-routing cache at every generation step (stops nothing)."""

    def __init__(self, context: RoutingContext) -> None:
        self.context, self.steps = context, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.steps.append(dict(self.context._instance_cache))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def reused(self) -> bool:
        """Whether every step used the very routing of the first (computed once, on the prompt)."""
        first = self.steps[0]
        return all(step.keys() == first.keys() and all(step[k] is first[k] for k in step) for step in self.steps)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_mixlora_generates_the_same_tokens_with_and_without_the_kv_cache(tiny_model_dirs, family):
    from test_adapters_common import randomise_b
    from test_backbone import _batch

    model = load_backbone(Backbone(pretrained=tiny_model_dirs[family]), torch.device("cpu")).eval()
    context = RoutingContext()
    torch.manual_seed(0)
    inject_adapters(
        language_model(model),
        [AdapterGroup("mixlora", ["all-linear"], {"r": 2, "factors": 6, "dropout": 0.0})],
        context,
    )
    randomise_b(model, seed=3)
    inputs = _batch(tiny_model_dirs[family])["inputs"]
    # Generate from the first sample's full chat (it is not padded).
    n = int(inputs["attention_mask"][0].sum())
    prompt = {
        k: (v[:1, :n] if v.dim() == 2 and v.shape[1] == inputs["input_ids"].shape[1] else v) for k, v in inputs.items()
    }
    if "image_grid_thw" in prompt:
        first = int(prompt["image_grid_thw"][0].prod())
        prompt["image_grid_thw"], prompt["pixel_values"] = prompt["image_grid_thw"][:1], prompt["pixel_values"][:first]
    else:
        prompt["pixel_values"] = prompt["pixel_values"][:1]
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    snapshots = [RoutingSnapshots(context), RoutingSnapshots(context)]
    with_cache = context.generate(
        model, **prompt, use_cache=True, stopping_criteria=StoppingCriteriaList([snapshots[0]]), **kwargs
    )
    without_cache = context.generate(
        model, **prompt, use_cache=False, stopping_criteria=StoppingCriteriaList([snapshots[1]]), **kwargs
    )
    assert with_cache.shape == (1, n + 8)
    assert torch.equal(with_cache, without_cache)
    # Each MixLoRA layer routes once, on the prompt, and every new token reuses that routing.
    layers = sum(isinstance(m, MixLoRA) for m in model.modules())
    assert all(len(s.steps) == 8 and len(s.steps[0]) == layers > 0 and s.reused() for s in snapshots)
    assert context._instance_cache is None  # routing is cached only for the duration of one generation


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_multi_turn_chat_routes_in_generation_as_it_trained(tiny_model_dirs, family):
    """Instance routing pools the tokens before the first answer: in training (objective.routing_masks) and when
    generating the next turn of the same chat (encode_prompt's routing_mask), with or without the KV cache."""
    from PIL import Image

    from mmpeft.data.encode import ChatEncoder
    from mmpeft.data.sample import Sample
    from mmpeft.models.backbone import load_processor
    from mmpeft.objective import IGNORE_INDEX, routed, routing_masks

    path = tiny_model_dirs[family]
    encoder = ChatEncoder(load_processor(path), ["chat"], max_length=512)

    def turn(role: str, text: str, images: int = 0) -> dict:
        return {"role": role, "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}

    messages = [turn("user", "What colour is it?", 1), turn("assistant", "green"), turn("user", "And the shape?")]
    messages += [turn("assistant", "a square")]
    sample = Sample("k", "chat", messages, [Image.new("RGB", (40, 36), (10, 200, 30))])
    batch = encoder.collate([encoder.encode(sample)])
    prompt_item = encoder.encode_prompt(sample)  # the chat up to its last answer: user, answer, user
    prompts = encoder.collate_prompts([prompt_item])
    _, trained_mask = routing_masks(batch["inputs"], batch["labels"])
    first = int((batch["labels"][0] != IGNORE_INDEX).nonzero()[0])
    assert trained_mask[0].tolist() == [True] * first + [False] * (batch["labels"].shape[1] - first)
    routing = prompts["routing_mask"][0]
    assert routing.sum() == first < prompts["inputs"]["input_ids"].shape[1]  # the earlier answer is not pooled
    assert torch.equal(prompts["inputs"]["input_ids"][0, :first], batch["inputs"]["input_ids"][0, :first])

    model = load_backbone(Backbone(pretrained=path), torch.device("cpu")).eval()
    context = RoutingContext()
    torch.manual_seed(0)
    config = {"r": 4, "heads": 3, "routing": "instance", "dropout": 0.0}
    inject_adapters(language_model(model), [AdapterGroup("asymlora", ["all-linear"], config)], context)
    with torch.no_grad(), routed(context, batch):
        model(**batch["inputs"])
    trained = {record.name: record.gate for record in context.records}  # (1, 1, heads) each
    outputs = []
    for cache in (True, False):
        snapshots = RoutingSnapshots(context)
        outputs.append(
            context.generate(
                model,
                **prompts["inputs"],
                routing_mask=prompts["routing_mask"],
                max_new_tokens=4,
                do_sample=False,
                use_cache=cache,
                stopping_criteria=StoppingCriteriaList([snapshots]),
            )
        )
        assert snapshots.reused()
        generated = {router.name: gate for router, gate in snapshots.steps[0].items()}
        assert generated.keys() == trained.keys()
        for name, gate in generated.items():
            assert torch.allclose(gate, trained[name], atol=1e-6), name
    assert torch.equal(outputs[0], outputs[1])


def test_a_block_router_keeps_checkpointing_s_memory_saving():
    """router: block under non-reentrant checkpointing peaks as router: projection does (issue 17).

    The block's gate is computed in a pre-hook and left on the router; during backward the recomputed gate, kept
    there, held the recomputed graph of everything before the MLP (checkpointing's recomputation saves for real)
    until the next forward, so every layer's recomputation stayed alive to the end of backward. Counted for real,
    every storage the step creates (the planner's :class:`~mmpeft.activations.StepMemory`, no fake tensor)."""
    from conftest import tiny_llama_config
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import LlamaForCausalLM

    from mmpeft.activations import StepMemory

    config = tiny_llama_config(layers=8, positions=128)
    ids = torch.randint(0, 128, (2, 96))  # (batch, seq)
    peaks, gates = {}, {}
    for router in ("projection", "block"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).train()
        model.requires_grad_(False)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        adapter = {"r": 4, "heads": 3, "router": router, "router_bias": router == "block", "dropout": 0.0}
        inject_adapters(model.model, [AdapterGroup("asymlora", ["mlp"], adapter)], RoutingContext())
        counter = StepMemory(FakeTensorMode(), [*model.parameters(), *model.buffers(), ids])
        with counter:
            model(input_ids=ids, labels=ids).loss.backward()
        peaks[router] = counter.peak
        gates[router] = [m.shared_gate for m in model.modules() if isinstance(m, Router)]
    assert all(gate is None for gate in gates["block"])  # no gate (nor graph) outlives its block's forward
    # One router per MLP instead of three: the block router may save a little less, never more.
    assert peaks["block"] <= 1.02 * peaks["projection"], peaks


def test_mixlora_pool_defaults_to_the_rank_so_every_instance_weights_every_factor():
    """``factors`` unset: a pool of ``r`` (the setting that trained best at equal parameters on the conflict suite);
    every instance then uses all of them, each with its own score-derived weight."""
    config = MixLoRAConfig(r=6)
    assert config.factors == 6 and config.weighting == "score" and config.pairing == "index"
    assert MixLoRAConfig(r=4, factors=16).factors == 16
    with pytest.raises(ValueError, match="factors"):
        MixLoRAConfig(r=8, factors=4)
    adapter = MixLoRA(D_IN, D_OUT, MixLoRAConfig(r=5, dropout=0.0))
    bind_routers(adapter, RoutingContext(), "layer")
    index_a, weight_a, index_b, weight_b = adapter.route(torch.randn(3, 4, D_IN))
    assert index_a.tolist() == [list(range(5))] * 3 and index_b.tolist() == [list(range(5))] * 3
    assert not torch.allclose(weight_a, torch.ones_like(weight_a))  # weighted per instance, not uniform
    torch.testing.assert_close(weight_a.sum(-1), torch.full((3,), 5.0))
