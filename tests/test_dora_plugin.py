"""The DoRA plugin in plugins/mmpeft-dora: PEFT parity, 4-bit bases, and a real install/uninstall.

In-process tests import the plugin from its source folder and register it with a
dist-info folder on ``sys.path`` (what an installed distribution looks like to
``importlib.metadata``); the slow test pip-installs the distribution for real into a
temporary target and drives ``python -m mmpeft`` in subprocesses.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import yaml
from conftest import forget_package, register_plugin
from peft import LoraConfig, get_peft_model
from test_backbone import _batch
from test_cli import demo_config, mmpeft

from mmpeft.adapters import AdaptedLinear, AdapterGroup, adapter_state_dict, inject_adapters
from mmpeft.adapters.quant import BaseLayerView
from mmpeft.models.backbone import Backbone, language_model, load_backbone
from mmpeft.objective import lm_loss

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "mmpeft-dora"
TARGETS = ["q_proj", "v_proj", "down_proj"]


def register_dora(site: Path, patch: pytest.MonkeyPatch) -> None:
    """The plugin's source on ``sys.path``, registered as ``dora`` by a dist-info folder in ``site`` (as an install)."""
    register_plugin(PLUGIN, site, patch)


def forget_dora() -> None:
    """Drop the plugin's modules, so that another test imports it afresh."""
    forget_package("mmpeft_dora")


@pytest.fixture
def dora(tmp_path, monkeypatch):
    """The plugin registered for this test (:func:`register_dora`); yields its module."""
    register_dora(tmp_path, monkeypatch)
    import mmpeft_dora

    yield mmpeft_dora
    forget_dora()


def copy_into_ours(pairs, generator: torch.Generator) -> None:
    """Randomise PEFT's B and magnitude, then give our adapters the same A, B and m."""
    with torch.no_grad():
        for ours, theirs in pairs:
            theirs.lora_B["default"].weight.copy_(
                torch.randn(theirs.lora_B["default"].weight.shape, generator=generator) * 0.1
            )
            magnitude = theirs.lora_magnitude_vector["default"].weight
            magnitude.mul_(1 + 0.1 * torch.randn(magnitude.shape, generator=generator))
            ours.A.copy_(theirs.lora_A["default"].weight)
            ours.B.copy_(theirs.lora_B["default"].weight)
            ours.m.copy_(magnitude)


def assert_same_grads(pairs) -> None:
    for ours, theirs in pairs:
        for mine, peft_param in (
            (ours.A, theirs.lora_A["default"].weight),
            (ours.B, theirs.lora_B["default"].weight),
            (ours.m, theirs.lora_magnitude_vector["default"].weight),
        ):
            assert mine.grad is not None and mine.grad.abs().sum() > 0
            torch.testing.assert_close(mine.grad, peft_param.grad, rtol=1e-5, atol=1e-7)


class OneLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def test_config_is_validated_and_forward_needs_the_base(dora):
    with pytest.raises(ValueError, match="r must be >= 1"):
        dora.DoRAConfig(r=0)
    with pytest.raises(ValueError, match="dropout"):
        dora.DoRAConfig(dropout=1.0)
    adapter = dora.DoRA(12, 6, dora.DoRAConfig(r=4))
    with pytest.raises(RuntimeError, match="attach_base"):
        adapter(torch.randn(2, 12), torch.randn(2, 6))
    with pytest.raises(ValueError, match="12 -> 6"):
        adapter.attach_base(BaseLayerView(torch.nn.Linear(6, 12)))


def test_parity_with_peft_dora_on_a_linear_layer(dora):
    torch.manual_seed(0)
    peft_model = get_peft_model(
        OneLinear(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True, target_modules=["proj"])
    )
    theirs = peft_model.base_model.model.proj
    base = copy.deepcopy(theirs.base_layer)
    adapter = dora.DoRA(12, 6, dora.DoRAConfig(r=4, alpha=8, dropout=0.0))
    adapter.attach_base(BaseLayerView(base))
    ours = AdaptedLinear(base, adapter, "dora")

    # Fresh: m is ||W|| per output row (PEFT's initial magnitude), and the layer is the base layer.
    torch.testing.assert_close(adapter.m, theirs.lora_magnitude_vector["default"].weight, rtol=1e-6, atol=0)
    assert adapter.m.shape == (6,) and adapter.m.dtype == torch.float32
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(ours(x), base(x), rtol=0, atol=0)

    copy_into_ours([(adapter, theirs)], torch.Generator().manual_seed(1))
    ours_out, peft_out = ours(x), peft_model(x)
    assert not torch.allclose(ours_out, base(x), atol=1e-3)
    torch.testing.assert_close(ours_out, peft_out, rtol=1e-5, atol=1e-6)
    # The rescaled weight with the bias outside it: W' = m * V / ||V||, V = W + s B A.
    v = base.weight + adapter.scaling * adapter.B @ adapter.A
    expected = x @ (adapter.m[:, None] * v / v.norm(dim=1, keepdim=True)).T + base.bias
    torch.testing.assert_close(ours_out, expected, rtol=1e-5, atol=1e-6)

    ours_out.square().mean().backward()
    peft_out.square().mean().backward()
    assert_same_grads([(adapter, theirs)])
    assert base.weight.grad is None and base.bias.grad is None


def test_parity_with_peft_dora_on_a_llama(dora, tiny_llama):
    ours = copy.deepcopy(tiny_llama)
    peft_model = get_peft_model(
        tiny_llama, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True, target_modules=TARGETS)
    )
    ours.requires_grad_(False)
    wrapped = inject_adapters(ours.model, [AdapterGroup("dora", TARGETS, {"r": 4, "alpha": 8, "dropout": 0.0})])
    assert len(wrapped) == 6 and all(isinstance(layer.adapter, dora.DoRA) for layer in wrapped.values())
    pairs = [(layer.adapter, peft_model.base_model.model.model.get_submodule(name)) for name, layer in wrapped.items()]
    for adapter, theirs in pairs:
        torch.testing.assert_close(adapter.m, theirs.lora_magnitude_vector["default"].weight, rtol=1e-6, atol=0)
    copy_into_ours(pairs, torch.Generator().manual_seed(1))

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    ours_logits = ours(ids).logits
    peft_logits = peft_model(ids).logits
    torch.testing.assert_close(ours_logits, peft_logits, rtol=1e-5, atol=1e-5)
    ours_logits.square().mean().backward()
    peft_logits.square().mean().backward()
    assert_same_grads(pairs)
    state = adapter_state_dict(ours.model)
    assert set(state) == {f"{name}.adapter.{t}" for name in wrapped for t in ("A", "B", "m")}


def test_dora_on_a_4bit_model_starts_at_the_base_and_trains_m_a_b(dora, tiny_model_dirs):
    path = tiny_model_dirs["llava"]
    batch = _batch(path)
    model = load_backbone(Backbone(pretrained=path), torch.device("cpu")).eval()
    with torch.no_grad():
        expected = model(**batch["inputs"], use_cache=False).logits
    torch.manual_seed(0)
    wrapped = inject_adapters(language_model(model), [AdapterGroup("dora", ["attention"], {"r": 4})])
    assert len(wrapped) == 8
    for layer in wrapped.values():
        assert isinstance(layer.base, bnb.nn.Linear4bit) and layer.base.weight.quant_type == "nf4"
        weight = BaseLayerView(layer.base).weight()
        torch.testing.assert_close(layer.adapter.m, weight.norm(dim=1), rtol=1e-6, atol=0)
    with torch.no_grad():
        logits = model(**batch["inputs"], use_cache=False).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)  # B = 0 and m = ||W||: the identity

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in wrapped.values():
            layer.adapter.B.copy_(torch.randn(layer.adapter.B.shape, generator=generator) * 0.1)
    model.train()
    lm_loss(model, batch["inputs"], batch["labels"]).backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert sorted({name.rsplit(".", 1)[-1] for name in trainable}) == ["A", "B", "m"]
    assert len(trainable) == 3 * len(wrapped)
    missing = [name for name, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def saved_for_backward(run) -> list[torch.Tensor]:
    """The tensors autograd saves for backward while ``run()`` builds the graph."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return saved


@pytest.mark.parametrize("bias", [True, False])
def test_the_base_output_is_rescaled_and_the_update_added_into_it_in_place(dora, bias):
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 6, bias=bias)
    adapter = dora.DoRA(12, 6, dora.DoRAConfig(r=4, alpha=8, dropout=0.0))
    adapter.attach_base(BaseLayerView(base))
    with torch.no_grad():
        adapter.B.normal_(0, 0.1)
        adapter.m.mul_(1 + 0.1 * torch.randn(6))
    layer = AdaptedLinear(base, adapter, "dora")
    assert layer.inplace_add and not layer.reads_base_output  # an unquantized base: the add is in place
    x = torch.randn(3, 5, 12, requires_grad=True)
    out = [layer(x)]
    # A real backward through the in-place add: it would fail if autograd had kept base_out for m's gradient.
    out[0].square().sum().backward()

    v = (base.weight + adapter.scaling * adapter.B @ adapter.A).detach()
    n = v.norm(dim=1)  # a constant for backward (sec. 4.3)
    m = adapter.m.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    expected = x2 @ (m / n)[:, None].mul(v).T + (base.bias if bias else 0)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)
    expected.square().sum().backward()
    torch.testing.assert_close(adapter.m.grad, m.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_on_a_4bit_base_the_frozen_matmul_runs_once_and_no_dequantized_weight_is_kept(dora):
    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 32)
    base = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
    base.load_state_dict(plain.state_dict())
    base = base.to("cpu").requires_grad_(False)  # quantizes
    adapter = dora.DoRA(64, 32, dora.DoRAConfig(r=4, dropout=0.0))
    adapter.attach_base(BaseLayerView(base))
    layer = AdaptedLinear(base, adapter, "dora")
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = []
    saved = saved_for_backward(lambda: y.append(layer(x)))
    # The plugin used to run W x a second time from the dequantized weight, which autograd then kept (64 x 32 float).
    assert not [tuple(t.shape) for t in saved if t.numel() == 64 * 32], [tuple(t.shape) for t in saved]
    y[0].square().sum().backward()
    assert adapter.m.grad is not None and adapter.A.grad is not None and x.grad is not None


def shrink(config: Path) -> None:
    """The demo run made cheap: smaller batches and datasets, no loader workers, one validation batch, no
    recomputation."""
    values = yaml.safe_load(config.read_text())
    values["trainer"]["limit_val_batches"] = 1
    values["model"]["backbone"]["gradient_checkpointing"] = False
    values["data"].update(batch_size=2, num_workers=0)
    for run, samples in zip(values["data"]["prepare"], (40, 8)):
        run["args"].update(samples=samples, samples_per_shard=samples // 2)
    config.write_text(yaml.safe_dump(values))


@pytest.mark.slow
def test_pip_install_lists_and_trains_dora_and_removing_it_unregisters(tmp_path, tiny_model_dirs, monkeypatch):
    # Build from a copy so the build leaves nothing (build/, *.egg-info) in the source tree.
    source = tmp_path / "src"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    # `mmpeft()` builds its environment from os.environ; PYTHONPATH only affects the subprocesses.
    monkeypatch.setenv("PYTHONPATH", str(target))

    listed = mmpeft("adapters")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert ["dora", "mmpeft-dora", "0.1.0", "mmpeft_dora:DoRA"] in rows

    run = tmp_path / "run"
    run.mkdir()
    config = demo_config(run, tiny_model_dirs["llava"], "llava", steps=10)
    shrink(config)
    args = [
        "fit",
        "--config",
        str(config),
        "--model.adapters",
        '[{"name": "dora", "targets": ["attention"], "config": {"r": 4}}]',
    ]
    trained = mmpeft(*args)
    assert trained.returncode == 0, trained.stderr[-3000:]
    (run_dir,) = (run / "runs" / "demo").iterdir()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 10
    state = ckpt["state_dict"]
    # m, A and B of q, k, v and o in each of the 2 decoder layers, and nothing of the frozen base.
    assert sorted({key.rsplit(".", 1)[-1] for key in state}) == ["A", "B", "m"]
    assert len(state) == 3 * 4 * 2 and all(".self_attn." in key and ".adapter." in key for key in state)

    shutil.rmtree(target)  # what `pip uninstall` does to a --target install
    removed = mmpeft(*args)
    assert removed.returncode == 2, removed.stderr[-3000:]
    assert "unknown adapter 'dora'" in removed.stderr
    assert "lora" in removed.stderr.split("unknown adapter 'dora'", 1)[1]
