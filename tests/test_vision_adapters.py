"""Adapters beyond the language model (issue 17): groups with ``part: vision`` or ``part: projector``.

Which layers they take (targets relative to the part, ``layers``, conv layers refused), their own
learning rate and weight decay in the optimizer, routing losses kept apart from the language
model's, saving and loading, and one table row per family: LoRA on the vision tower's last block
and the projector lands, trains and gives a finite loss.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from test_families import TASKS, image_chats, sample

from data_recipes.synthetic import SyntheticRecipe
from mmpeft.adapters import AdaptedLinear, AdapterGroup, inject_adapters
from mmpeft.adapters.inject import TowerContext, tower_contexts, tower_routing_losses
from mmpeft.adapters.routing import RoutingContext, RoutingLosses, routing_losses
from mmpeft.data.datamodule import ShardDataModule
from mmpeft.data.encode import ChatEncoder
from mmpeft.errors import ConfigError
from mmpeft.models.backbone import Backbone, inject_model_adapters, language_model, load_backbone, load_processor
from mmpeft.models.tiny import FAMILIES
from mmpeft.module import MMPeftModule, Optim
from mmpeft.objective import lm_losses, routed
from mmpeft.saving import CONFIG_NAME, AdapterSpec, apply_adapter, base_summary, save_adapter, trainable_tensors

CPU = torch.device("cpu")
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def batch_of(base: str, family: str = "llava") -> dict:
    """The family's image chats (one and two images) encoded and collated as training does."""
    encoder = ChatEncoder(load_processor(base), TASKS, max_length=4096)
    chats = image_chats(family)
    return encoder.collate([encoder.encode(sample(*chat)) for chat in chats])


def model_of(base: str, quantization: str = "none", **kwargs) -> torch.nn.Module:
    return load_backbone(Backbone(base, quantization=quantization, gradient_checkpointing=False, **kwargs), CPU)


# -- which layers ---------------------------------------------------------------------------------


def test_targets_are_relative_to_their_part_and_layers_picks_the_last_blocks(tiny_model_dirs):
    model = model_of(tiny_model_dirs["llava"], "nf4")
    groups = [
        AdapterGroup("lora", ["attention"], LORA),
        AdapterGroup("lora", ["all-linear"], LORA, part="vision", layers=[-1]),
        AdapterGroup("lora", ["all-linear"], LORA, part="projector"),
    ]
    wrapped = inject_model_adapters(model, groups, RoutingContext())
    vision = sorted(k for k in wrapped if k.startswith("model.vision_tower."))
    assert vision == [
        f"model.vision_tower.encoder.layers.0.{name}"
        for name in (
            "mlp.fc1",
            "mlp.fc2",
            "self_attn.k_proj",
            "self_attn.out_proj",
            "self_attn.q_proj",
            "self_attn.v_proj",
        )
    ]  # LLaVA reads the penultimate block's features (vision_feature_layer=-2): [-1] is block 0 of the tiny CLIP's 2
    assert sorted(k for k in wrapped if "projector" in k) == [
        "model.multi_modal_projector.linear_1",
        "model.multi_modal_projector.linear_2",
    ]
    assert len(wrapped) == 8 + 2 * 4  # and the language model's 2 x 4 attention projections
    # A glob over the path relative to the vision tower says the same as layers: [-1].
    again = inject_model_adapters(
        model_of(tiny_model_dirs["llava"]),
        [AdapterGroup("lora", ["encoder.layers.0.*"], LORA, part="vision")],
        RoutingContext(),
    )
    assert sorted(again) == vision
    # The last block runs but never reaches the loss: an adapter there would never train, so none goes there.
    with pytest.raises(ConfigError) as error:
        inject_model_adapters(
            model_of(tiny_model_dirs["llava"]), [AdapterGroup("lora", ["encoder.layers.1.*"], LORA, part="vision")]
        )
    assert (
        "matches no linear layer of the vision tower (model.vision_tower) (LlavaForConditionalGeneration reads its "
        "image features from block 0 of encoder.layers, vision_feature_layer=-2: the 1 block(s) after it never reach "
        "the loss and take no adapter"
    ) in str(error.value)
    # Where the model reads the last block (LLaVA-OneVision: vision_feature_layer=-1), [-1] is the last block.
    onevision = inject_model_adapters(
        model_of(tiny_model_dirs["llava_onevision"]), [AdapterGroup("lora", ["fc1"], LORA, part="vision", layers=[-1])]
    )
    assert list(onevision) == ["model.vision_tower.encoder.layers.1.mlp.fc1"]
    # The 4-bit base stays 4-bit under the adapter (mmpeft/adapters/quant.py is the seam).
    assert type(wrapped[vision[0]].base).__name__ == "Linear4bit"


def test_a_projector_inside_the_vision_tower_is_the_projectors_and_a_conv_layer_is_refused(tiny_model_dirs):
    base = tiny_model_dirs["qwen2_vl"]
    wrapped = inject_model_adapters(
        model_of(base),
        [
            AdapterGroup("lora", ["all-linear"], LORA, part="vision"),
            AdapterGroup("lora", ["all-linear"], LORA, part="projector"),
        ],
    )
    vision = [k for k in wrapped if wrapped[k].group == 0]
    assert vision and all(k.startswith("model.visual.blocks.") for k in vision)  # not the merger
    assert sorted(k for k in wrapped if wrapped[k].group == 1) == [
        "model.visual.merger.mlp.0",
        "model.visual.merger.mlp.2",
    ]

    # LLaMA-Factory #5324 crashes on LoRA over Qwen2-VL's Conv3d patch embedding; here it is a clear error.
    for target in ("patch_embed.proj", "proj", "patch_embed.*"):
        model = model_of(base)
        with pytest.raises(ConfigError) as error:
            inject_model_adapters(model, [AdapterGroup("lora", [target], LORA, part="vision")])
        assert "model.visual.patch_embed.proj (Conv3d)" in str(error.value)
        assert "conv layers are not adaptable" in str(error.value)
        assert not any(isinstance(m, AdaptedLinear) for m in model.modules())  # nothing half done


def test_a_target_matching_nothing_names_the_part_and_the_group(tiny_model_dirs):
    model = model_of(tiny_model_dirs["llava"])
    with pytest.raises(
        ConfigError,
        match=r"adapters\[1\] \(lora, part vision\): target 'gate_proj' matches no "
        r"linear layer of the vision tower \(model.vision_tower\); its linear layers are: "
        r"encoder.layers.\*.mlp.fc1",
    ):
        inject_model_adapters(
            model, [AdapterGroup("lora", ["mlp"], LORA), AdapterGroup("lora", ["gate_proj"], LORA, part="vision")]
        )
    with pytest.raises(
        ConfigError,
        match=r"target 'all-linear' matches no linear layer of the vision tower "
        r"\(model.vision_tower\) in blocks \[5\]",
    ):
        inject_model_adapters(model, [AdapterGroup("lora", ["all-linear"], LORA, part="vision", layers=[5])])
    with pytest.raises(
        ConfigError,
        match=r"adapters\[0\] \(lora\) goes into the vision tower: inject it with "
        r"mmpeft.models.backbone.inject_model_adapters\(model, groups\)",
    ):
        inject_adapters(language_model(model), [AdapterGroup("lora", part="vision")])
    with pytest.raises(ConfigError, match=r"adapters\[0\] \(lora\).part: 'audio' is not one of"):
        AdapterGroup("lora", part="audio").resolve(0)
    with pytest.raises(ConfigError, match=r"adapters\[2\] \(lora\).lr must be > 0, got 0"):
        AdapterGroup("lora", lr=0.0).resolve(2)


def test_instance_routing_outside_the_language_model_is_refused(tiny_model_dirs):
    model = model_of(tiny_model_dirs["llava"])
    for name, config in (("asymlora", {**LORA, "routing": "instance"}), ("mixlora", {"r": 2, "factors": 4})):
        with pytest.raises(
            ConfigError,
            match=rf"adapters\[0\] \({name}, part vision\) routes per instance, which "
            "the vision tower cannot",
        ):
            inject_model_adapters(model, [AdapterGroup(name, ["fc1"], config, part="vision")], RoutingContext())
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())


def test_a_projector_trained_in_full_takes_no_projector_adapter(tiny_model_dirs):
    with pytest.raises(
        ConfigError,
        match="train_projector trains the projector in full and model.adapters has a group with part: projector",
    ):
        MMPeftModule(Backbone(tiny_model_dirs["llava"], train_projector=True), [AdapterGroup("lora", part="projector")])


# -- routing losses -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])  # (images, patches, d) and packed (patches, d) towers
def test_vision_routers_join_the_routing_losses_only_when_their_group_asks(tiny_model_dirs, family):
    base = tiny_model_dirs[family]
    batch = batch_of(base, family)
    coefficients = RoutingLosses(load_balance=0.01, z_loss=0.001, mutual_information=0.1)
    found = {}
    for asks in (False, True):
        torch.manual_seed(0)
        model = model_of(base)
        context = RoutingContext()
        context.num_tasks = len(TASKS)
        asym = {**LORA, "heads": 3}
        inject_model_adapters(
            model,
            [
                AdapterGroup("lora", ["attention"], LORA),
                AdapterGroup("asymlora", ["fc1", "fc2"], asym, part="vision", routing_losses=asks),
            ],
            context,
        )
        towers = tower_contexts(model)
        assert len(towers) == 1 and towers[0].losses is asks and towers[0].part == "vision"
        for _ in range(2):  # a second pass starts the records anew
            with routed(context, batch):
                model(**batch["inputs"], use_cache=False)
                aux = tower_routing_losses(towers, coefficients, routing_losses(context, coefficients))
        records = towers[0].records
        blocks = 1 if family == "llava" else 2  # LLaVA's last block never reaches the loss: no adapter there
        assert context.records == [] and len(records) == blocks * 2  # (fc1, fc2) per block; none in the LM's
        assert all(r.probs.dim() == 3 and r.probs.shape[-1] == 3 for r in records)
        if family == "qwen2_vl":  # every image's patches packed in one sequence: one row
            assert records[0].probs.shape[0] == 1
        else:  # one row per image, every patch (and CLIP's class token) a position
            vision = model.config.vision_config
            assert records[0].probs.shape[:2] == (3, (vision.image_size // vision.patch_size) ** 2 + 1)
        found[asks] = aux
    assert found[False] == {}  # the language group is LoRA: no router; the vision routers stay out
    # Asked: load balance and z-loss over every patch; the task-aware loss needs one row per sample, so none.
    assert set(found[True]) == {"load_balance", "z_loss"}
    assert found[True]["load_balance"] > 0 and found[True]["z_loss"] > 0 and found[True]["z_loss"].requires_grad
    assert isinstance(towers[0], TowerContext)


# -- the optimizer --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("vision-shards")
    SyntheticRecipe(samples=8, samples_per_shard=8, seed=3).build(out, progress=False)
    return str(out)


def test_each_group_trains_with_its_own_learning_rate_and_weight_decay(tmp_path, tiny_model_dirs, shards):
    path = tiny_model_dirs["llava"]
    module = MMPeftModule(
        Backbone(pretrained=path, train_projector=True),
        [
            AdapterGroup("lora", ["attention"], LORA),  # optim.lr
            AdapterGroup("lora", ["all-linear"], LORA, part="vision", layers=[-1], lr=5e-5, weight_decay=0.1),
            AdapterGroup("lora", ["mlp"], LORA, weight_decay=0.2),
        ],
        Optim(lr=2e-4, warmup=0, projector_lr=1e-4),
    )
    data = ShardDataModule(train=shards, processor=path, batch_size=2, max_length=256)
    seen: dict[str, object] = {}

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            groups = trainer.optimizers[0].param_groups
            seen.setdefault("lrs", []).append([g["lr"] for g in groups])
            if batch_idx == 0:
                seen["before"] = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                seen["after"] = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Watch()],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    groups = trainer.optimizers[0].param_groups
    names = {id(p): n for n, p in module.named_parameters()}
    held = {g["name"]: (g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in groups}
    assert [g["name"] for g in groups] == ["adapters[0]", "adapters[1]", "adapters[2]", "projector"]
    assert [(g["initial_lr"], g["weight_decay"]) for g in groups] == [
        (2e-4, 0.0),
        (5e-5, 0.1),
        (2e-4, 0.2),
        (1e-4, 0.0),
    ]
    # Exactly the expected tensors in each: every trainable one once, by where it lives.
    assert sum(len(names) for *_, names in held.values()) == len(
        {n for n, p in module.named_parameters() if p.requires_grad}
    )
    assert all(".language_model." in n and "self_attn" in n for n in held["adapters[0]"][2])
    assert all(n.startswith("model.model.vision_tower.encoder.layers.0.") for n in held["adapters[1]"][2])
    assert len(held["adapters[1]"][2]) == 6 * 2  # 6 projections x (A, B)
    assert all(".language_model." in n and ".mlp." in n for n in held["adapters[2]"][2])
    assert held["projector"][2] == sorted(
        n for n, _ in module.named_parameters() if n.startswith("model.model.multi_modal_projector.")
    )
    # The schedule scales every group alike (LambdaLR keeps each group's base lr).
    for lrs in seen["lrs"]:
        ratios = [lr / g["initial_lr"] for lr, g in zip(lrs, groups)]
        assert max(ratios) - min(ratios) < 1e-12
    assert seen["lrs"][0] == [2e-4, 5e-5, 2e-4, 1e-4]

    # The first AdamW step moves a tensor with a gradient by lr per element (m / sqrt(v) = sign(g)), after decaying
    # it by lr * weight_decay: B (zero at the start) by its group's lr; A, whose gradient is 0 while B is, only decays.
    before, after = seen["before"], seen["after"]
    first = {
        "adapters[0]": (2e-4, 0.0, "model.model.language_model.layers.0.self_attn.q_proj.adapter"),
        "adapters[1]": (5e-5, 0.1, "model.model.vision_tower.encoder.layers.0.mlp.fc1.adapter"),
        "adapters[2]": (2e-4, 0.2, "model.model.language_model.layers.1.mlp.up_proj.adapter"),
    }
    for name, (lr, decay, layer) in first.items():
        step = (after[f"{layer}.B"] - before[f"{layer}.B"]).abs()
        assert step.max().item() == pytest.approx(lr, rel=1e-3), name
        torch.testing.assert_close(after[f"{layer}.A"], before[f"{layer}.A"] * (1 - lr * decay), rtol=0, atol=1e-9)
    projector = "model.model.multi_modal_projector.linear_1.weight"
    assert (after[projector] - before[projector]).abs().max().item() == pytest.approx(1e-4, rel=1e-3)


def test_router_lr_puts_a_groups_router_tensors_in_an_adamw_group_of_their_own(tiny_model_dirs):
    path = tiny_model_dirs["llava"]
    module = MMPeftModule(
        Backbone(pretrained=path),
        [
            AdapterGroup("mixlora", ["attention"], {"r": 2, "factors": 4}, router_lr=3e-3),
            AdapterGroup(
                "asymlora", ["mlp"], {**LORA, "heads": 2, "router": "block"}, weight_decay=0.1, router_lr=1e-2
            ),
            AdapterGroup("lora", ["all-linear"], LORA, part="vision", layers=[-1], router_lr=5.0),  # no router
        ],
        Optim(lr=2e-4),
    )
    module.model = model_of(path)  # as configure_model loads and injects it
    inject_model_adapters(module.model, module.adapter_groups, module.routing_context)
    groups = module.param_groups()
    names = {id(p): n for n, p in module.named_parameters()}
    held = {g["name"]: (g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in groups}
    assert list(held) == ["adapters[0], adapters[2]", "adapters[1]", "adapters[0] routers", "adapters[1] routers"]
    assert [(lr, decay) for lr, decay, _ in held.values()] == [(2e-4, 0.0), (2e-4, 0.1), (3e-3, 0.0), (1e-2, 0.1)]
    trainable = sorted(n for n, p in module.named_parameters() if p.requires_grad)
    assert sorted(n for *_, group in held.values() for n in group) == trainable  # every tensor once
    # MixLoRA: both routers of every attention projection; its condition projection, A and B stay in adapters[0].
    text_layers = module.model.config.text_config.num_hidden_layers
    mixlora = held["adapters[0] routers"][2]
    assert len(mixlora) == text_layers * 4 * 2
    assert all(n.endswith((".adapter.router_a.weight", ".adapter.router_b.weight")) for n in mixlora)
    assert {n.rsplit(".", 1)[-1] for n in held["adapters[0], adapters[2]"][2] if "self_attn" in n} == {
        "A",
        "B",
        "condition",
    }
    # AsymLoRA routed per block: one router per MLP block, kept by its first projection, in the routers' group.
    asym = held["adapters[1] routers"][2]
    assert asym == [
        f"model.model.language_model.layers.{i}.mlp.gate_proj.adapter.router.weight" for i in range(text_layers)
    ]
    assert not any("router" in n for n in held["adapters[1]"][2])
    assert len(held["adapters[1]"][2]) == text_layers * 3 * 2  # gate, up, down: A and B
    # The LoRA group has no router: its router_lr changes nothing.
    vision = [n for n in held["adapters[0], adapters[2]"][2] if n.startswith("model.model.vision_tower.")]
    assert len(vision) == 6 * 2  # its 6 projections' A and B, at the defaults' lr
    assert not any(lr == 5.0 for lr, *_ in held.values())
    with pytest.raises(ConfigError, match=r"adapters\[1\] \(mixlora\).router_lr must be > 0, got -0.1"):
        AdapterGroup("mixlora", router_lr=-0.1).resolve(1)


# -- saving and loading ---------------------------------------------------------------------------


def test_an_adapter_in_the_vision_tower_and_projector_saves_and_loads_with_its_parts(tmp_path, tiny_model_dirs):
    base = tiny_model_dirs["qwen2_vl"]
    groups = [
        AdapterGroup("lora", ["attention"], LORA),
        AdapterGroup("moelora", ["fc2"], {**LORA, "experts": 2}, part="vision", layers=[-1], lr=5e-5, router_lr=1e-3),
        AdapterGroup("lora", ["all-linear"], LORA, part="projector", weight_decay=0.01),
    ]
    model = model_of(base, "nf4").eval()
    context = RoutingContext()
    inject_model_adapters(model, groups, context)
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AdaptedLinear):
                for param in module.adapter.parameters():
                    param.normal_(0, 0.1)
    batch = batch_of(base, "qwen2_vl")
    with torch.no_grad(), routed(context, batch):
        expected = model(**batch["inputs"], use_cache=False).logits
    spec = AdapterSpec(groups, base, base_summary(model.config), TASKS).resolved()
    out = save_adapter(tmp_path / "adapter", spec, trainable_tensors(model))

    saved = json.loads((out / CONFIG_NAME).read_text())["adapters"]
    assert [(g["part"], g["layers"], g["lr"], g["weight_decay"]) for g in saved] == [
        ("language", None, None, None),
        ("vision", [-1], 5e-5, None),
        ("projector", None, None, 0.01),
    ]
    fresh = model_of(base, "nf4").eval()
    fresh_context = RoutingContext()
    loaded = apply_adapter(fresh, out, fresh_context)
    assert loaded.groups == spec.groups
    assert sum(isinstance(m, AdaptedLinear) for m in fresh.model.visual.modules()) == 1 + 2
    with torch.no_grad(), routed(fresh_context, batch):
        torch.testing.assert_close(fresh(**batch["inputs"], use_cache=False).logits, expected, rtol=0, atol=1e-5)

    # A directory written before groups had a part holds language-model groups.
    config = json.loads((out / CONFIG_NAME).read_text())
    for group in config["adapters"]:
        for key in ("part", "layers", "lr", "weight_decay", "routing_losses"):
            del group[key]
    config["adapters"] = config["adapters"][:1]
    assert AdapterSpec.from_json(config, "old").groups[0] == AdapterGroup("lora", ["attention"], spec.groups[0].config)


# -- every family ---------------------------------------------------------------------------------

NF4 = {"llava", "qwen2_vl"}
"""The rows run on the NF4 base (the vision tower is 4-bit there too); the others in float32."""
NOT_LINEAR = {
    # Gemma 3's projector is a pooling, a norm and a weight matrix used with matmul: no linear layer.
    "gemma3": r"adapters\[2\] \(lora, part projector\): target 'all-linear' matches no linear layer of the "
    r"projector \(model.multi_modal_projector\); its linear layers are: none",
    # Its vision encoder sits inside the language model's embedding (model.embed_tokens_extend), where mmpeft
    # finds no vision tower (and its processor cannot load here: tests/test_families.py).
    "phi4_multimodal": r"adapters\[0\] \(lora, part vision\): Phi4MultimodalForCausalLM has no vision tower",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_lora_on_its_vision_towers_last_block_and_projector(family, tiny_model_dirs):
    base = tiny_model_dirs[family]
    quantization = "nf4" if family in NF4 else "none"
    if family == "phi4_multimodal":
        with pytest.raises(ConfigError, match="cannot find the language model of Phi4MultimodalForCausalLM"):
            load_backbone(Backbone(base, quantization=quantization), CPU)
    model = load_backbone(Backbone(base, quantization=quantization, gradient_checkpointing=family in NF4), CPU)
    vision = AdapterGroup("lora", ["all-linear"], LORA, part="vision", layers=[-1])
    projector = AdapterGroup("lora", ["all-linear"], LORA, part="projector")
    groups = [vision, AdapterGroup("lora", ["attention"], LORA), projector]
    if family in NOT_LINEAR:
        with pytest.raises(ConfigError, match=NOT_LINEAR[family]):
            inject_model_adapters(model, groups, RoutingContext())
        if family == "phi4_multimodal":
            return
        groups = groups[:2]  # Gemma 3's vision tower alone
        # The tiny model's projection weight is transformers' initial zeros, through which no gradient reaches the
        # vision tower; a trained checkpoint's is not zero.
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.1)
    context = RoutingContext()
    wrapped = inject_model_adapters(model, groups, context)
    outside = {n: layer for n, layer in wrapped.items() if layer.group != 1}
    assert sum(layer.group == 0 for layer in outside.values()) > 0
    assert len(groups) == 2 or sum(layer.group == 2 for layer in outside.values()) > 0
    if family in NF4:
        assert all(type(layer.base).__name__ == "Linear4bit" for layer in outside.values())

    model.train()
    batch = batch_of(base, family)
    before = {n: layer.adapter.B.detach().clone() for n, layer in outside.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    with routed(context, batch):
        loss, _ = lm_losses(model, batch["inputs"], batch["labels"])
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    unchanged = [n for n, layer in outside.items() if torch.equal(layer.adapter.B, before[n])]
    assert not unchanged, f"no step in {unchanged[:4]}"
