"""The 4-bit backbone of both tiny families: what is quantized, what is frozen, what trains."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from PIL import Image

from mmpeft.adapters import AdaptedLinear, AdapterGroup, inject_adapters
from mmpeft.data.encode import ChatEncoder
from mmpeft.errors import ConfigError
from mmpeft.models.backbone import (
    PROJECTOR_PATHS,
    VISION_PATHS,
    Backbone,
    get_path,
    language_model,
    load_backbone,
    load_processor,
)
from mmpeft.objective import lm_loss

FAMILIES = ["llava", "qwen2_vl"]
CPU = torch.device("cpu")


def _batch(model_dir: str) -> dict:
    """Two encoded chats (one multi-turn) with real images, collated."""
    processor = load_processor(model_dir)
    encoder = ChatEncoder(processor, ["color", "shape"], max_length=256)
    user = lambda text: {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}  # noqa: E731
    answer = lambda text: {"role": "assistant", "content": [{"type": "text", "text": text}]}  # noqa: E731
    from mmpeft.data.sample import Sample

    red = Image.new("RGB", (40, 32), (200, 20, 20))
    items = [
        encoder.encode(Sample("a", "color", [user("What color is it?"), answer("red")], [red])),
        encoder.encode(
            Sample(
                "b",
                "shape",
                [user("What shape?"), answer("a square"), {"role": "user", "content": "Sure?"}, answer("yes")],
                [red],
            )
        ),
    ]
    return encoder.collate(items)


@pytest.mark.parametrize("family", FAMILIES)
def test_language_model_linears_are_nf4_and_frozen_and_only_adapters_train(tiny_model_dirs, family):
    model = load_backbone(Backbone(pretrained=tiny_model_dirs[family]), CPU)
    lm = language_model(model)
    linears = [m for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert {m.weight.quant_type for m in linears} == {"nf4"}
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)  # QLoRA keeps the head unquantized
    assert not any(p.requires_grad for p in model.parameters())

    wrapped = inject_adapters(lm, [AdapterGroup("lora", ["all-linear"], {"r": 4})])
    assert len(wrapped) == 7 * 2  # q, k, v, o, gate, up, down in each of 2 layers
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in name for name in trainable)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    # Never the vision tower, the projector or the LM head.
    _, vision = get_path(model, VISION_PATHS, "vision tower")
    _, projector = get_path(model, PROJECTOR_PATHS, "projector")
    for tower in (vision, projector, model.lm_head):
        assert not any(isinstance(m, AdaptedLinear) for m in tower.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_init_lora_leaves_4bit_logits_unchanged_and_training_moves_only_adapters(tiny_model_dirs, family):
    model = load_backbone(Backbone(pretrained=tiny_model_dirs[family]), CPU)
    batch = _batch(tiny_model_dirs[family])
    model.eval()
    with torch.no_grad():
        before = model(**batch["inputs"], use_cache=False).logits
    inject_adapters(language_model(model), [AdapterGroup()])
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    with torch.no_grad():
        after = model(**batch["inputs"], use_cache=False).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)

    # One optimizer step through gradient checkpointing: every adapter gets a gradient, the base is untouched.
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    loss = lm_loss(model, batch["inputs"], batch["labels"])
    loss.backward()
    lora_a = [p for name, p in model.named_parameters() if name.endswith("adapter.A")]
    lora_b = [p for name, p in model.named_parameters() if name.endswith("adapter.B")]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    assert all(p.grad is not None for p in lora_a)
    optimizer.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p.detach(), frozen[name]), name
    with torch.no_grad():
        moved = model.eval()(**batch["inputs"], use_cache=False).logits
    assert not torch.allclose(moved, before)


def test_quantization_choices_and_projector_training(tiny_model_dirs):
    path = tiny_model_dirs["llava"]
    fp4 = language_model(load_backbone(Backbone(pretrained=path, quantization="fp4"), CPU))
    assert {m.weight.quant_type for m in fp4.modules() if isinstance(m, bnb.nn.Linear4bit)} == {"fp4"}
    plain = load_backbone(Backbone(pretrained=path, quantization="none", train_projector=True), CPU)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
    _, projector = get_path(plain, PROJECTOR_PATHS, "projector")
    trainable = {name for name, p in plain.named_parameters() if p.requires_grad}
    assert trainable == {f"model.multi_modal_projector.{n}" for n, _ in projector.named_parameters()}
    # A trained projector is kept out of quantization.
    nf4 = load_backbone(Backbone(pretrained=path, train_projector=True), CPU)
    _, projector = get_path(nf4, PROJECTOR_PATHS, "projector")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in projector.modules())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in projector.parameters())


def test_norms_are_fp32_and_checkpointing_is_non_reentrant(tiny_model_dirs):
    model = load_backbone(Backbone(pretrained=tiny_model_dirs["qwen2_vl"], compute_dtype="bfloat16"), CPU)
    norms = [m for m in model.modules() if "norm" in type(m).__name__.lower()]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert model.is_activation_checkpointing
    funcs = {m._gradient_checkpointing_func for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")}
    assert funcs and all(f.keywords.get("use_reentrant") is False for f in funcs)


def test_missing_model_path_is_named(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match="model.backbone.pretrained.*no-such-model"):
        load_backbone(Backbone(pretrained=missing), CPU)
    with pytest.raises(ConfigError, match="data.processor.*no-such-model"):
        load_processor(missing)


def test_eval_forward_without_grad_keeps_the_4bit_weights_readable(tiny_model_dirs):
    # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights in place in eval/no-grad
    # forwards (and fails on narrow layers); load_backbone must keep the standard layout.
    from mmpeft.adapters.quant import dequantized_weight

    model = load_backbone(Backbone(pretrained=tiny_model_dirs["llava"]), CPU).eval()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    before = [dequantized_weight(m) for m in layers]
    with torch.no_grad():
        logits = model(
            **_batch(tiny_model_dirs["llava"])["inputs"]
        ).logits  # the vision tower's layers are narrower than a block
    assert torch.isfinite(logits).all()
    after = [dequantized_weight(m) for m in layers]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_a_checkpoint_that_is_not_image_text_is_refused_naming_its_type(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "llama")
    with pytest.raises(
        ConfigError,
        match=r"model.backbone.pretrained: model type 'llama' is not an image-text model .* docs/families.md",
    ):
        load_backbone(Backbone(str(tmp_path / "llama")), torch.device("cpu"))


def test_an_unknown_tiny_family_names_the_key_and_the_families():
    with pytest.raises(
        ConfigError, match=r"model.backbone.build_tiny: unknown family 'llava2'; one of llava, qwen2_vl, .*gemma3"
    ):
        Backbone("/tmp/nowhere", build_tiny="llava2").check_exists()
