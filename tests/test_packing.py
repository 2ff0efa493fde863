"""Padding-free packed batches (``data.packing``, mmpeft/packing.py): exact for every family and every adapter.

The table: for each supported family (a row) and each built-in adapter (a column), the same samples
collated padded and packed give the same per-sample LM losses, the same routing losses and the same
gradient in every adapter tensor (relative 1e-4, float32 on the CPU). The samples are the family
table's chats (one image; two turns and two images of other sizes; text only), twice each under
other keys, packed into rows that hold several samples, so a wrong boundary, position or router
pooling shows. Refused families (Mllama, Gemma 3) are asserted refusals, and Gemma 3's reason is
measured. Also: the row plan, the layout, the negative control (without per-sample positions the
losses differ), generation inputs unchanged, NF4, and deterministic, exactly resumable packed
batches from shards.
"""

from __future__ import annotations

import copy

import pytest
import test_length_grouping
import torch
from test_families import SUPPORTED, TASKS, chats, sample
from test_length_grouping import datamodule

from mmpeft.adapters import AdapterGroup
from mmpeft.adapters.routing import RoutingContext, RoutingLosses, routing_losses, weighted_sum
from mmpeft.data.datamodule import ShardDataModule
from mmpeft.data.encode import ChatEncoder
from mmpeft.models.backbone import Backbone, inject_model_adapters, load_backbone, load_processor
from mmpeft.objective import IGNORE_INDEX, lm_losses, next_token_targets, routed, token_losses
from mmpeft.packing import Layout, layout, model_inputs, model_positions, pack_padded, packed_inputs, plan_rows

CPU = torch.device("cpu")
shards = test_length_grouping.shards  # the fixture: 72 synthetic samples, 31 to 57 tokens with the tiny LLaVA
ADAPTERS = {
    "lora": ("lora", {"r": 4, "alpha": 8, "dropout": 0.0}),
    "asymlora": ("asymlora", {"r": 4, "alpha": 8, "dropout": 0.0, "heads": 3}),
    "asym/instance": ("asymlora", {"r": 4, "alpha": 8, "dropout": 0.0, "heads": 3, "routing": "instance"}),
    "asym/block": ("asymlora", {"r": 4, "alpha": 8, "dropout": 0.0, "heads": 3, "router": "block"}),
    "mixlora": ("mixlora", {"r": 2, "alpha": 4, "dropout": 0.0}),
    "moelora": ("moelora", {"r": 2, "alpha": 4, "dropout": 0.0, "experts": 3, "top_k": 2}),
}
TARGETS = {"asym/block": ["mlp"]}
EVERY_LOSS = RoutingLosses(load_balance=0.01, z_loss=0.001, localized_balance=0.01, mutual_information=0.01)
TOLERANCE = 1e-4
CHECKS = tuple(ADAPTERS)
RESULTS: dict[str, dict[str, str]] = {}
"""family -> adapter -> "ok", "refused" or the failure, printed as a table by conftest's terminal summary."""


def encoder(base: str, packing: bool, pack_length: int | None = None) -> ChatEncoder:
    return ChatEncoder(load_processor(base), TASKS, max_length=4096, packing=packing, pack_length=pack_length)


def samples(family: str, copies: int = 1) -> list:
    """The family's chats (``copies`` times, under distinct keys)."""
    return [sample(f"{key}{copy}", *rest) for copy in range(copies) for key, *rest in chats(family)]


def collated(base: str, family: str, packing: bool, rows_of: int = 2, copies: int = 1) -> dict:
    """The family's samples collated padded, or packed into rows of at most ``rows_of`` times the longest sample."""
    enc = encoder(base, packing)
    items = [enc.encode(s) for s in samples(family, copies)]
    enc.pack_length = rows_of * max(item["tokens"]["input_ids"].shape[0] for item in items)
    return enc.collate(items)


def step(model, context, batch) -> tuple[dict[str, float], dict[str, float], dict[str, torch.Tensor]]:
    """Per-sample losses by key, routing losses, and every adapter gradient of loss + routing losses."""
    model.zero_grad()
    with routed(context, batch):
        loss, per_sample = lm_losses(model, batch["inputs"], batch["labels"], 0, Layout.of(batch))
        aux = routing_losses(context, EVERY_LOSS)
    extra = weighted_sum(aux, EVERY_LOSS)
    (loss if extra is None else loss + extra).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(batch["keys"], per_sample.tolist())), {k: float(v.detach()) for k, v in aux.items()}, grads


def differences(padded, packed) -> list[str]:
    """What differs between the padded and the packed step's results, beyond the tolerance."""
    (losses_a, aux_a, grads_a), (losses_b, aux_b, grads_b) = padded, packed
    out = []
    if losses_a.keys() != losses_b.keys():
        return [f"samples {sorted(losses_a)} vs {sorted(losses_b)}"]
    out += [
        f"loss[{k}] {losses_a[k]:.6f} vs {losses_b[k]:.6f}" for k in losses_a if not close(losses_a[k], losses_b[k])
    ]
    out += [f"{k} {aux_a[k]:.6f} vs {aux_b.get(k)}" for k in aux_a if not close(aux_a[k], aux_b.get(k, float("nan")))]
    for name, grad in grads_a.items():
        error = float((grad - grads_b[name]).norm() / grad.norm().clamp(min=1e-12))
        if error > TOLERANCE:
            out.append(f"grad {name} relative error {error:.1e}")
    return out


def close(a: float, b: float) -> bool:
    return abs(a - b) <= TOLERANCE * max(1.0, abs(a))


# -- the plan and the layout -------------------------------------------------------------------------


def test_plan_rows_keeps_samples_whole_within_capacity_and_balances_the_rows():
    lengths = [70, 10, 45, 30, 30, 64, 5, 20]
    rows = plan_rows(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(8))  # every sample once
    fills = [sum(lengths[i] for i in row) for row in rows]
    assert len(rows) == 3 == -(-sum(lengths) // 100)  # as few rows as the tokens need
    assert max(fills) <= 100 and max(fills) - min(fills) <= 30  # within capacity, balanced
    assert all(row == sorted(row) for row in rows) and [row[0] for row in rows] == sorted(row[0] for row in rows)
    assert plan_rows(lengths, 100) == rows  # deterministic
    assert plan_rows([150, 20, 30], 100) == [[0], [1, 2]]  # a sample over capacity gets a row of its own
    assert plan_rows([60, 60, 60], 100) == [[0], [1], [2]]  # no two fit: one per row, the padded batch
    with pytest.raises(ValueError, match="capacity"):
        plan_rows([1], 0)


def test_layout_unpacks_and_packs_back():
    lengths = [3, 5, 2, 4]
    packed = layout([[0, 2], [1], [3]], lengths)
    assert packed.shape == (3, 5)
    assert packed.sample.tolist() == [[0, 0, 0, 2, 2], [1, 1, 1, 1, 1], [3, 3, 3, 3, -1]]
    assert packed.position.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4], [0, 1, 2, 3, 0]]  # padding restarts too
    rows = torch.arange(15).reshape(3, 5, 1).float()  # (rows, length, 1)
    unpacked = packed.unpack(rows, fill=-1)  # (4, 5, 1)
    assert unpacked[..., 0].tolist() == [
        [0, 1, 2, -1, -1],
        [5, 6, 7, 8, 9],
        [3, 4, -1, -1, -1],
        [10, 11, 12, 13, -1],
    ]
    assert torch.equal(packed.pack(unpacked, fill=0)[..., 0], torch.where(packed.real(), rows[..., 0], 0))
    assert packed.spread(torch.tensor([10, 11, 12, 13])).tolist() == [
        [10, 10, 10, 12, 12],
        [11, 11, 11, 11, 11],
        [13, 13, 13, 13, 10],  # padding takes the first sample's
    ]


# -- exactness, a row per family ---------------------------------------------------------------------


@pytest.mark.parametrize("family", SUPPORTED)
def test_packed_batches_are_exact_for_every_adapter(family, tiny_model_dirs):
    base = tiny_model_dirs[family]
    padded = collated(base, family, packing=False)
    packed = collated(base, family, packing=True)
    rows, width = packed["labels"].shape
    assert rows < padded["labels"].shape[0] and "attention_mask" not in packed["inputs"]
    assert int((packed["packing"]["sample"] >= 0).sum()) == int(padded["inputs"]["attention_mask"].sum())
    torch.manual_seed(0)
    plain = load_backbone(Backbone(base, quantization="none", gradient_checkpointing=False), CPU)
    failures = {}
    for name, (kind, config) in ADAPTERS.items():
        model, context = copy.deepcopy(plain), RoutingContext()
        context.num_tasks = len(TASKS)
        torch.manual_seed(1)
        inject_model_adapters(model, [AdapterGroup(kind, TARGETS.get(name, ["all-linear"]), config)], context)
        with torch.no_grad():  # B off zero, so that every tensor, routers included, gets a gradient
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        found = differences(step(model, context, padded), step(model, context, packed))
        RESULTS.setdefault(family, {})[name] = "ok" if not found else f"{len(found)} differ"
        if found:
            failures[name] = found[:3]
    assert not failures, failures


def sample_losses(model, batch: dict, inputs: dict | None = None) -> dict[str, float]:
    """Each sample's mean next-token loss by key, from ``inputs`` as given (no positions added): per row for a padded
    batch, per sample through the layout for a packed one."""
    keep, targets = next_token_targets(batch["labels"])
    with torch.no_grad():
        losses = token_losses(model, batch["inputs"] if inputs is None else inputs, keep, targets)  # (n_kept,)
    per_position = losses.new_zeros(keep.shape).masked_scatter(keep, losses)  # (rows, length)
    packed = Layout.of(batch)
    if packed is not None:
        per_position, keep = packed.unpack(per_position), packed.unpack(keep, False)  # (n, longest)
    return dict(zip(batch["keys"], (per_position.sum(1) / keep.sum(1)).tolist()))


def largest_gap(a: dict[str, float], b: dict[str, float]) -> float:
    return max(abs(a[k] - b[k]) for k in a)


def test_without_per_sample_positions_the_packed_losses_differ(tiny_model_dirs):
    """The negative control: the same packed rows with positions counting along the row (no boundaries for
    transformers to find) let samples attend to each other, and their losses move."""
    base = tiny_model_dirs["llava"]
    model = load_backbone(Backbone(base, quantization="none", gradient_checkpointing=False), CPU).eval()
    padded, packed = collated(base, "llava", False), collated(base, "llava", True)
    rows, width = packed["labels"].shape
    assert rows < len(padded["keys"])
    want = sample_losses(model, padded)
    exact = sample_losses(model, packed, model_inputs(model, packed["inputs"], Layout.of(packed)))
    along = sample_losses(model, packed, {**packed["inputs"], "position_ids": torch.arange(width).expand(rows, -1)})
    assert largest_gap(want, exact) < TOLERANCE
    assert largest_gap(want, along) > 1e-2


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_gemma3_packs_with_its_own_masks_per_sample_because_transformers_masks_packed_rows_wrongly(
    attention, tiny_model_dirs
):
    """Gemma 3 (mmpeft.packing.OWN_MASKS), measured: with transformers' masks for the packed rows the per-sample
    losses differ with its sliding-window layers and agree when every layer is full attention (transformers remaps
    the image-block or-mask to positions within the sample); with each sample's own masks laid block-diagonally
    (sample_masks) they agree with the sliding layers too, under both mask kinds (bool for sdpa, additive for eager).
    When a transformers release fixes the remap, the first assertion fails: drop gemma3 from OWN_MASKS then."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    base = tiny_model_dirs["gemma3"]
    padded, packed = collated(base, "gemma3", False), collated(base, "gemma3", True)
    gaps = {}
    for variant in ("as built", "full attention only"):
        config = AutoConfig.from_pretrained(base)
        if variant != "as built":
            config.text_config.layer_types = ["full_attention"] * len(config.text_config.layer_types)
        assert ("sliding_attention" in config.text_config.layer_types) == (variant == "as built")
        assert int(padded["inputs"]["attention_mask"].sum(1).max()) > config.text_config.sliding_window  # it cuts
        model = AutoModelForImageTextToText.from_pretrained(base, config=config, attn_implementation=attention).eval()
        want = sample_losses(model, padded)
        inputs = {**packed["inputs"], "position_ids": model_positions(model, packed["inputs"], Layout.of(packed))}
        gaps[variant] = largest_gap(want, sample_losses(model, packed, inputs))
        gaps[f"{variant}, own masks"] = largest_gap(
            want, sample_losses(model, packed, model_inputs(model, packed["inputs"], Layout.of(packed)))
        )
    assert gaps["as built"] > 1e-2, gaps
    assert gaps["full attention only"] < TOLERANCE, gaps
    assert gaps["as built, own masks"] < TOLERANCE and gaps["full attention only, own masks"] < TOLERANCE, gaps
    masks = model_inputs(model, packed["inputs"], Layout.of(packed))["attention_mask"]
    rows, width = packed["labels"].shape
    assert {k: tuple(v.shape) for k, v in masks.items()} == dict.fromkeys(
        ["full_attention", "sliding_attention"], (rows, 1, width, width)
    )
    assert masks["full_attention"].dtype == (torch.bool if attention == "sdpa" else torch.float32)


def test_mllama_rows_carry_each_samples_image_slots_and_its_text_attends_only_its_own(tiny_model_dirs):
    """Mllama's cross-attention reads its row's images. Each sample brings the padded batch's image slots (its images,
    then the processor's padding images) into its row and its cross-attention mask moves to them; a row with fewer
    samples is filled with copies no token reads. The negative control: without packed_inputs' hook, text that
    attends to no image (a text-only sample after others in its row) attends to the row's every vision token, as
    Mllama lets fully masked rows do, and its loss moves."""
    base = tiny_model_dirs["mllama"]
    padded, packed = collated(base, "mllama", False), collated(base, "mllama", True, rows_of=3)
    tokens, slots = Layout.of(packed), Layout.of(packed).images
    n, per_sample = len(padded["keys"]), padded["inputs"]["pixel_values"].shape[1]
    assert packed["labels"].shape[0] == 1 and slots.shape == (1, n * per_sample)
    assert slots.sample.tolist() == [[i for i in range(n) for _ in range(per_sample)]]
    cross = tokens.unpack(packed["inputs"]["cross_attention_mask"])  # (n, longest, row slots, tiles)
    for i in range(n):
        mine = slice(i * per_sample, (i + 1) * per_sample)
        real = tokens.mask[i]
        assert torch.equal(cross[i][real][:, mine], padded["inputs"]["cross_attention_mask"][i][real])
        assert int(cross[i][real].sum()) == int(cross[i][real][:, mine].sum())  # nothing outside its own slots
        for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
            assert torch.equal(packed["inputs"][name][0, mine], padded["inputs"][name][i]), name
    model = load_backbone(Backbone(base, quantization="none", gradient_checkpointing=False), CPU).eval()
    want = sample_losses(model, padded)
    with packed_inputs(model, packed["inputs"], tokens) as inputs:
        exact = sample_losses(model, packed, inputs)
    unhooked = sample_losses(model, packed, model_inputs(model, packed["inputs"], tokens))
    assert largest_gap(want, exact) < TOLERANCE
    assert abs(want["text0"] - unhooked["text0"]) > 1e-2
    two = collated(base, "mllama", True)  # rows of 2x the longest: 2 rows, the second with one sample and filler
    assert two["inputs"]["pixel_values"].shape[:2] == (2, 2 * per_sample)
    assert Layout.of(two).images.sample[1].tolist() == [2] * per_sample + [-1] * per_sample


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_pack_padded_packs_a_padded_batch_as_the_encoder_collates_it(family, tiny_model_dirs):
    """mmpeft.packing.pack_padded (the benchmarks' packing of batches they pad themselves) gives the encoder's packed
    batch: the same rows, labels, layout and image inputs in the same order (LLaVA's images per image, Qwen2-VL's
    per patch with image_grid_thw), for samples of no, one and two images."""
    base = tiny_model_dirs[family]
    enc = encoder(base, False)
    items = [enc.encode(s) for s in samples(family, copies=2)]
    lengths = [item["tokens"]["input_ids"].shape[0] for item in items]
    counts = [len(item["pictures"]) for item in items]
    assert sorted(set(counts)) == [0, 1, 2]
    padded = enc.collate(items)
    enc.packing, enc.pack_length = True, 2 * max(lengths)
    want = enc.collate(items)
    got = pack_padded(padded, lengths, enc.pack_length, images=counts)
    assert got["inputs"].keys() == want["inputs"].keys()
    for name, value in want["inputs"].items():
        assert torch.equal(got["inputs"][name], value), name
    assert torch.equal(got["labels"], want["labels"]) and torch.equal(got["task_ids"], want["task_ids"])
    assert all(torch.equal(got["packing"][k], v) for k, v in want["packing"].items())


def test_generation_inputs_and_labels_are_those_of_the_padded_batch(tiny_model_dirs):
    """Packing reorders the samples into rows; each sample's prompt for generation, its labels and its task stay its
    own, and a sample's first token predicts nothing (it never does in a padded batch)."""
    base = tiny_model_dirs["qwen2_vl"]
    enc = encoder(base, False)
    items = []
    for s in samples("qwen2_vl", copies=2):
        item = enc.encode(s)
        item["prompt"] = enc.encode_prompt(s)
        items.append(item)
    padded = enc.collate(items)
    packed = encoder(base, True).collate(items)  # rows no longer than the longest sample: several, reordered
    order = [padded["keys"].index(k) for k in packed["keys"]]
    assert sorted(order) == list(range(len(order))) and order != list(range(len(order)))  # reordered, all there
    assert packed["task_ids"].tolist() == padded["task_ids"][order].tolist()
    assert [packed["references"][i] for i in range(len(order))] == [padded["references"][i] for i in order]
    prompts = enc.collate([items[i] for i in order])["prompt_inputs"]  # the padded batch's prompts, in packed order
    assert prompts.keys() == packed["prompt_inputs"].keys()
    for name, value in packed["prompt_inputs"].items():
        assert torch.equal(value, prompts[name]), name
    lay = Layout.of(packed)
    labels = lay.unpack(packed["labels"], IGNORE_INDEX)  # (n, longest)
    for row, i in enumerate(order):
        n = int(lay.mask[row].sum())
        want = padded["labels"][i, :n].clone()
        want[0] = IGNORE_INDEX
        assert torch.equal(labels[row, :n], want)


# -- from shards: the stream's batches packed, deterministic and resumable -------------------------------------


def pad_share(batches: list[dict]) -> tuple[int, int]:
    """(padded positions, all positions) of token inputs, packed or not."""
    pad = total = 0
    for b in batches:
        rows, width = b["labels"].shape
        real = int((b["packing"]["sample"] >= 0).sum()) if "packing" in b else int(b["inputs"]["attention_mask"].sum())
        pad, total = pad + rows * width - real, total + rows * width
    return pad, total


def test_a_packed_pass_has_the_same_batches_with_under_5_percent_padding(tiny_model_dirs, shards):
    """72 samples of 31 to 57 tokens in batches of 4: padded in stream order, length-grouped, and packed."""

    def read(**kwargs) -> list[dict]:
        return list(datamodule(tiny_model_dirs, shards, **kwargs).train_dataloader())

    plain, grouped = read(), read(group_by_length=4)
    runs = {
        "padded": plain,
        "grouped": grouped,
        "packed": read(packing=True),
        "grouped+packed": read(group_by_length=4, packing=True),
        "packed 120": read(packing=True, pack_length=120),
        "grouped+packed 120": read(group_by_length=4, packing=True, pack_length=120),
    }
    for name, batches in runs.items():  # the same samples in every step
        assert [sorted(b["keys"]) for b in batches] == [
            sorted(b["keys"]) for b in (grouped if "grouped" in name else plain)
        ]
    pads = {name: pad_share(batches) for name, batches in runs.items()}
    real = {all_ - pad for pad, all_ in pads.values()}
    assert len(real) == 1  # the same real tokens
    # Rows no wider than each batch's longest sample (pack_length's default) pack nothing here: no two of a batch's
    # samples fit beside each other. Rows of 120 tokens (about two samples) leave under 5% once length-grouped.
    assert pads["padded"] == pads["packed"] == (779, 3740) and pads["grouped"] == pads["grouped+packed"] == (195, 3156)
    assert pads["packed 120"] == (165, 3126) and pads["grouped+packed 120"] == (37, 2998)
    for name in ("packed 120", "grouped+packed 120"):
        assert all(b["labels"].shape[1] <= 120 for b in runs[name])
    assert pads["grouped+packed 120"][0] / pads["grouped+packed 120"][1] < 0.05


def test_packed_batches_are_the_same_on_every_read_and_rank(tiny_model_dirs, shards, monkeypatch):
    def read(rank: int) -> list[dict]:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = datamodule(tiny_model_dirs, shards, num_workers=2, packing=True, pack_length=120, group_by_length=2)
        return list(dm.train_dataloader())

    first, again = read(1), read(1)
    assert len(first) == len(again) == 9
    for a, b in zip(first, again):
        assert a["keys"] == b["keys"]
        assert all(torch.equal(a["packing"][k], b["packing"][k]) for k in a["packing"])
        assert torch.equal(a["inputs"]["input_ids"], b["inputs"]["input_ids"])
    keys = [k for rank in (0, 1) for b in (first if rank == 1 else read(0)) for k in b["keys"]]
    assert len(keys) == len(set(keys)) == 72  # every sample once across the ranks


def test_a_packed_stream_resumes_with_the_rows_an_uninterrupted_epoch_would_give(tiny_model_dirs, shards):
    def dm() -> ShardDataModule:
        return datamodule(tiny_model_dirs, shards, group_by_length=4, packing=True, pack_length=120)

    whole = list(dm().train_dataloader())
    interrupted = dm()
    loader = iter(interrupted.train_dataloader())
    for _ in range(6):  # trained on before the checkpoint: 2 batches into the second pool
        interrupted.on_before_batch_transfer(next(loader), 0)
    next(loader)  # fetched ahead, never trained on
    del loader
    resumed = dm()
    resumed.load_state_dict(interrupted.state_dict())
    rest = list(resumed.train_dataloader())
    assert [b["keys"] for b in rest] == [b["keys"] for b in whole[6:]]
    assert all(torch.equal(a["packing"]["sample"], b["packing"]["sample"]) for a, b in zip(rest, whole[6:]))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "mllama", "gemma3"])
def test_training_packed_gives_the_padded_runs_losses_in_a_real_trainer(family, tmp_path, tiny_model_dirs, shards):
    """Two steps of NF4 AsymLoRA (instance routing, every routing loss) through Lightning, padded and packed: the same
    logged training losses (the second after an optimizer step on the packed gradients) and validation loss. For
    LLaVA, and for the two families that need more than positions (Mllama's image slots, Gemma 3's own masks)."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from test_cli import scalars

    from mmpeft.module import MMPeftModule, Optim

    logged = {}
    base = tiny_model_dirs[family]  # built on first use, from the global generator: before seeding, not between
    for packing in (False, True):
        torch.manual_seed(0)
        module = MMPeftModule(
            Backbone(pretrained=base, quantization="nf4"),
            [AdapterGroup("asymlora", ["all-linear"], {"r": 4, "heads": 3, "routing": "instance", "dropout": 0.0})],
            Optim(lr=1e-2, warmup=0),
            EVERY_LOSS,
        )
        data = ShardDataModule(
            train=shards,
            val=shards,
            processor=base,
            batch_size=4,
            max_length=256,
            packing=packing,
            pack_length=120,
            shuffle_buffer=0,
        )
        data.setup("fit")
        rows = next(iter(data.train_dataloader()))["labels"].shape[0]  # both runs draw the loader's seed
        assert rows < 4 if packing else rows == 4  # rows of 120 tokens hold several of the family's samples
        version = f"packed{int(packing)}"
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=2,
            limit_val_batches=2,
            val_check_interval=2,
            logger=TensorBoardLogger(tmp_path, name="run", version=version),
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
        )
        trainer.fit(module, data)
        run = tmp_path / "run" / version
        logged[packing] = scalars(run, "train/loss") + scalars(run, "val/loss")
    assert len(logged[False]) == 3
    assert logged[True] == pytest.approx(logged[False], rel=1e-4)
