"""The MASA plugin in plugins/mmpeft-masa: its formula by hand, its router, 4-bit bases, training, merge, install.

In-process tests import the plugin from its source folder and register it with a dist-info folder on
``sys.path`` (what an installed distribution looks like to ``importlib.metadata``), as
tests/test_dora_plugin.py does for DoRA; the slow test pip-installs the distribution for real.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
from conftest import forget_package, register_plugin
from test_backbone import _batch
from test_cli import mmpeft
from test_merge_export import TASKS, adapted_logits, first_batch, plain_logits, write_adapter
from transformers import AutoModelForImageTextToText

from data_recipes.synthetic import SyntheticRecipe
from mmpeft.adapters import AdaptedLinear, AdapterGroup, describe_adapters, inject_adapters, load_adapter
from mmpeft.adapters.base import Ability, abilities_of
from mmpeft.adapters.routing import RoutingContext, RoutingLosses, routing_losses
from mmpeft.data.datamodule import ShardDataModule
from mmpeft.errors import MergeError
from mmpeft.merge import REPORT_NAME, merge
from mmpeft.models.backbone import Backbone, language_model, load_backbone
from mmpeft.module import MMPeftModule, Optim
from mmpeft.objective import lm_loss, routed

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "mmpeft-masa"
CPU = torch.device("cpu")


def register_masa(site: Path, patch: pytest.MonkeyPatch) -> None:
    """The plugin's source on ``sys.path``, registered as ``masa`` by a dist-info folder in ``site`` (as an install)."""
    register_plugin(PLUGIN, site, patch)


def forget_masa() -> None:
    """Drop the plugin's modules, so that another test imports it afresh."""
    forget_package("mmpeft_masa")


@pytest.fixture
def masa(tmp_path, monkeypatch):
    """The plugin registered for this test (:func:`register_masa`); yields its module."""
    register_masa(tmp_path, monkeypatch)
    import mmpeft_masa

    yield mmpeft_masa
    forget_masa()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("masa-shards")
    SyntheticRecipe(samples=12, samples_per_shard=6, tasks=tuple(TASKS), seed=0).build(out, progress=False)
    return str(out)


def randomise(adapter: torch.nn.Module, generator: torch.Generator) -> None:
    """A trained-looking adapter: nonzero ``B`` and a router far from uniform."""
    with torch.no_grad():
        adapter.B.copy_(torch.randn(adapter.B.shape, generator=generator) * 0.1)
        adapter.router.weight.copy_(torch.randn(adapter.router.weight.shape, generator=generator))


def by_hand(adapter, x: torch.Tensor) -> torch.Tensor:
    """MASA's update written out: the router's softmax and top-k from its weight, then a Python loop over heads."""
    c = adapter.config
    h = x.mean(dim=1, keepdim=True) if c.routing == "instance" else x  # (batch, 1 | seq, d_in): no mask set
    probs = torch.softmax(h @ adapter.router.weight.T / c.temperature, dim=-1)  # (batch, T, N)
    if c.top_k is not None:
        kept = torch.zeros_like(probs).scatter(-1, probs.topk(c.top_k, dim=-1).indices, 1.0)
        probs = probs * kept / (probs * kept).sum(-1, keepdim=True)
    mixed = 0
    for i in range(c.heads):
        a_i = adapter.A[i * c.r : (i + 1) * c.r]  # (r, d_in)
        mixed = mixed + probs[..., i : i + 1] * (x @ a_i.T)  # (batch, seq, r)
    return adapter.scaling * mixed @ adapter.B.T  # (batch, seq, d_out)


# -- the plugin and its formula --------------------------------------------------------------------


def test_it_is_registered_through_its_distributions_entry_point(masa):
    cls = load_adapter("masa")  # from the entry point, through the contract checker
    assert cls is masa.MASA and abilities_of(cls) == {Ability.AS_LORA}
    row = next(r for r in describe_adapters() if r.name == "masa")
    assert row.error is None and (row.distribution, row.target) == ("mmpeft-masa 0.1.0", "mmpeft_masa:MASA")


def test_config_is_validated(masa):
    for values, message in [
        ({"r": 0}, "r must be >= 1"),
        ({"dropout": 1.0}, "dropout"),
        ({"heads": 0}, "heads must be >= 1"),
        ({"heads": 3, "top_k": 4}, r"top_k must be in \[1, heads=3\]"),
        ({"routing": "sequence"}, "routing must be 'token' or 'instance'"),
        ({"temperature": 0.0}, "temperature must be > 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            masa.MASAConfig(**values)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"top_k": 2, "temperature": 2.0},
        {"routing": "instance"},
        {"routing": "instance", "top_k": 1},
    ],
    ids=["token-dense", "token-top2-t2", "instance-dense", "instance-top1"],
)
def test_the_update_is_the_formula_computed_head_by_head(masa, settings):
    torch.manual_seed(0)
    adapter = masa.MASA(12, 10, masa.MASAConfig(r=3, alpha=6, dropout=0.0, heads=4, **settings))
    assert adapter.A.shape == (12, 12) and adapter.B.shape == (10, 3) and adapter.router.weight.shape == (4, 12)
    randomise(adapter, torch.Generator().manual_seed(1))
    x = torch.randn(2, 5, 12)  # (batch, seq, d_in)
    out = adapter(x, None)
    assert out.shape == (2, 5, 10) and out.abs().max() > 1e-2
    torch.testing.assert_close(out, by_hand(adapter, x), rtol=1e-6, atol=1e-7)
    # The same A_i are used by every head's slice: head(i) is the i-th block of rows.
    torch.testing.assert_close(adapter.head(2), adapter.A[6:9], rtol=0, atol=0)


def test_the_router_and_every_head_get_a_gradient(masa):
    torch.manual_seed(0)
    adapter = masa.MASA(12, 10, masa.MASAConfig(r=3, dropout=0.0, heads=4, top_k=2))
    randomise(adapter, torch.Generator().manual_seed(1))
    x = torch.randn(2, 7, 12)
    adapter(x, None).square().sum().backward()
    assert adapter.router.weight.grad is not None and adapter.router.weight.grad.abs().sum() > 0
    assert adapter.B.grad.abs().sum() > 0
    per_head = adapter.A.grad.unflatten(0, (4, 3)).abs().sum(dim=(1, 2))  # (N,): top-2 of 14 tokens reaches all
    assert (per_head > 0).all(), per_head


def test_it_starts_at_the_base_layer_with_distinct_heads(masa):
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 32)
    adapter = masa.MASA(64, 32, masa.MASAConfig(r=4, heads=3))
    layer = AdaptedLinear(base, adapter, "masa")
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0: exactly the base
    assert torch.equal(adapter.B, torch.zeros(32, 4))
    heads = [adapter.head(i) for i in range(3)]
    bound = 1 / math.sqrt(64)  # kaiming-uniform with a = sqrt(5): U(-1/sqrt(d_in), 1/sqrt(d_in)), per head
    assert all(h.abs().max() <= bound and h.abs().max() > 0.9 * bound for h in heads)
    assert not torch.allclose(heads[0], heads[1]) and not torch.allclose(heads[1], heads[2])  # independent draws


def test_as_lora_collapses_a_fixed_gate_exactly_and_refuses_no_gate(masa):
    torch.manual_seed(0)
    adapter = masa.MASA(12, 10, masa.MASAConfig(r=3, alpha=6, dropout=0.0, heads=4, routing="instance"))
    randomise(adapter, torch.Generator().manual_seed(1))
    x = torch.randn(1, 6, 12)  # one sample: one gate for all its tokens
    gate = torch.softmax(x.mean(1) @ adapter.router.weight.T, dim=-1).flatten()  # (N,)
    a, b, scaling = adapter.as_lora(gate)
    assert a.shape == (3, 12) and b.shape == (10, 3) and scaling == 2.0
    torch.testing.assert_close(scaling * x @ a.T @ b.T, adapter(x, None), rtol=1e-5, atol=1e-6)
    one_hot = adapter.as_lora(torch.tensor([0.0, 0.0, 1.0, 0.0]))[0]
    torch.testing.assert_close(one_hot, adapter.head(2), rtol=0, atol=0)
    with pytest.raises(MergeError, match="MASA mixes 4 experts"):
        adapter.as_lora(None)


# -- on a model ------------------------------------------------------------------------------------


def test_on_an_nf4_model_it_starts_at_the_base_and_every_tensor_trains(masa, tiny_model_dirs):
    path = tiny_model_dirs["llava"]
    batch = _batch(path)
    model = load_backbone(Backbone(pretrained=path, quantization="nf4"), CPU).eval()
    with torch.no_grad():
        expected = model(**batch["inputs"], use_cache=False).logits
    context = RoutingContext()
    torch.manual_seed(0)
    config = {"r": 4, "heads": 3, "dropout": 0.0}
    wrapped = inject_adapters(language_model(model), [AdapterGroup("masa", ["all-linear"], config)], context)
    assert len(wrapped) == 14  # 7 projections x 2 decoder layers
    for layer in wrapped.values():
        assert isinstance(layer.base, bnb.nn.Linear4bit) and layer.base.weight.quant_type == "nf4"
        assert isinstance(layer.adapter, masa.MASA) and layer.adapter.router.context is context
    with torch.no_grad(), routed(context, batch):
        logits = model(**batch["inputs"], use_cache=False).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)  # B = 0: the base model to the bit

    generator = torch.Generator().manual_seed(1)
    for layer in wrapped.values():
        randomise(layer.adapter, generator)
    model.train()
    with routed(context, batch):
        loss = lm_loss(model, batch["inputs"], batch["labels"])
        aux = routing_losses(context, RoutingLosses())
    assert len(context.records) == 14 and set(aux) == {"load_balance", "z_loss"}
    (loss + aux["load_balance"] + aux["z_loss"]).backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert sorted({name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1] for name in trainable}) == [
        "adapter.A",
        "adapter.B",
        "router.weight",
    ]
    assert len(trainable) == 3 * 14
    missing = [name for name, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_training_steps_through_the_lightning_module_change_every_a_b_and_router(
    masa, tmp_path, tiny_model_dirs, shards
):
    path = tiny_model_dirs["llava"]
    module = MMPeftModule(
        Backbone(pretrained=path, gradient_checkpointing=False),
        [AdapterGroup("masa", ["mlp"], {"r": 4, "heads": 3, "dropout": 0.0})],
        Optim(lr=1e-3, warmup=0),
    )
    data = ShardDataModule(train=shards, processor=path, batch_size=4, max_length=256)
    before: dict[str, torch.Tensor] = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            before.update({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,  # B = 0 at the start: the first step moves B (and the routers, by their losses), the second A
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Snapshot()],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    after = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    assert after.keys() == before.keys() and len(after) == 3 * 3 * 2  # A, B, router of 3 MLP projections x 2 layers
    assert all(isinstance(m.adapter, masa.MASA) for m in module.modules() if isinstance(m, AdaptedLinear))
    unchanged = []
    for name, value in after.items():
        if name.endswith(".A"):  # every head A_i moved, not only the stack
            moved = (value - before[name]).unflatten(0, (3, 4)).abs().sum(dim=(1, 2))  # (N,)
            if not (moved > 0).all():
                unchanged.append(name)
        elif torch.equal(value, before[name]):
            unchanged.append(name)
    assert not unchanged, unchanged
    assert all(torch.isfinite(v).all() for v in after.values())


def test_merge_of_one_instance_routed_sample_reproduces_the_adapted_model(masa, tmp_path, tiny_model_dirs, shards):
    base = tiny_model_dirs["qwen2_vl"]
    config = {"r": 4, "alpha": 8, "dropout": 0.0, "heads": 3, "routing": "instance"}
    adapter = write_adapter(tmp_path / "adapter", base, [AdapterGroup("masa", ["all-linear"], config)])
    out = tmp_path / "merged"
    report = merge(
        adapter,
        out,
        dtype="fp32",
        quantization="none",
        task="shape",
        data=shards,
        samples=1,
        progress=lambda _: None,
    )
    assert json.loads((out / REPORT_NAME).read_text())["adapted_layers"] == report["adapted_layers"] == 14
    assert report["batch"]["samples"] == 1
    # One sample, instance routing: each layer's gate is that sample's gate, and the collapse is exact.
    assert report["collapse"]["exact"] and len(report["collapse"]["gates"]) == 14
    gates = torch.tensor(list(report["collapse"]["gates"].values()))  # (layers, N)
    torch.testing.assert_close(gates.sum(-1), torch.ones(14), rtol=0, atol=1e-5)
    assert (gates.max(-1).values < 0.999).all()  # a real mixture of the heads, not one head
    assert report["max_logit_diff"] < 1e-4
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert not any(".adapter." in k or "router" in k for k in merged.state_dict())
    batch = first_batch(base, shards, "shape", 1)
    ours = adapted_logits(adapter, base, batch)
    theirs = plain_logits(merged, batch)
    assert (ours - plain_logits(AutoModelForImageTextToText.from_pretrained(base).eval(), batch)).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


# -- a real install --------------------------------------------------------------------------------


@pytest.mark.slow
def test_pip_install_lists_masa_and_removing_it_unregisters(tmp_path, monkeypatch):
    source = tmp_path / "src"  # a copy, so the build leaves nothing (build/, *.egg-info) in the source tree
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
    install = subprocess.run(
        [*pip, "--disable-pip-version-check", "--target", str(target), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    monkeypatch.setenv("PYTHONPATH", str(target))  # for the subprocesses `mmpeft()` starts
    listed = mmpeft("adapters")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert ["masa", "mmpeft-masa", "0.1.0", "mmpeft_masa:MASA"] in rows
    shutil.rmtree(target)  # what `pip uninstall` does to a --target install
    listed = mmpeft("adapters")
    assert listed.returncode == 0 and not [row for row in listed.stdout.splitlines() if row.startswith("masa ")]
