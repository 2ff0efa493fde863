"""What a run logs beyond the loss: routing statistics by hand, per-sample losses, and real runs read back from
TensorBoard."""

from __future__ import annotations

import io
import json
import math
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import demo_config, mmpeft

from data_recipes.synthetic import SyntheticRecipe
from mmpeft import plots
from mmpeft.adapters import AdapterGroup, inject_adapters
from mmpeft.adapters.inject import group_labels
from mmpeft.adapters.routing import RouterRecord, RoutingContext, RoutingStats, top_k_gate
from mmpeft.monitor import Monitor, RunSummary, TokensProgressBar, default_callbacks
from mmpeft.objective import IGNORE_INDEX, lm_loss, lm_losses

E = 3


def record(name: str, probs: list, top_k: int = E, level: str = "token") -> RouterRecord:
    probs = torch.tensor(probs, dtype=torch.float32)  # (batch, T, E)
    gate, selected = top_k_gate(probs, top_k)  # the gate a top-k router applies: the kept probabilities renormalised
    return RouterRecord(name, probs.log(), probs, selected, top_k, level, gate)


def entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0) / math.log(len(p))


def test_routing_stats_by_hand():
    """Two routed layers in one group, a top-1 instance router in another, a task with no sample, padding left out."""
    context = RoutingContext()
    context.groups = {"layers.0.mlp": "g", "layers.1.mlp": "g", "layers.0.attn": "h"}
    layer0 = [
        [[0.5, 0.3, 0.2], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]],
        [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.9, 0.05, 0.05]],
    ]
    layer1 = [
        [[0.1, 0.1, 0.8], [0.4, 0.4, 0.2], [0.6, 0.2, 0.2]],
        [[0.3, 0.3, 0.4], [0.25, 0.25, 0.5], [0.2, 0.2, 0.6]],
    ]
    with context.step(torch.tensor([[1, 1, 1], [1, 1, 0]]), task_ids=torch.tensor([0, 2])):
        context.record(record("layers.0.mlp", layer0))
        context.record(record("layers.1.mlp", layer1))
        context.record(record("layers.0.attn", [[[0.6, 0.3, 0.1]], [[0.2, 0.5, 0.3]]], top_k=1, level="instance"))
        context.record(record("layers.1.attn", [[[1.0]], [[1.0]]], top_k=1))  # one expert: nothing routed
    stats = RoutingStats(num_tasks=3)
    stats.add(context)
    results = stats.results()
    assert sorted(results) == ["g", "h"]

    # g: the 5 real tokens of each of its 2 layers; the padded last token of sample 1 is left out.
    real = [(layer, b, t) for layer in (layer0, layer1) for b, t in ((0, 0), (0, 1), (0, 2), (1, 0), (1, 1))]
    g = results["g"]
    assert g.count == 10
    for e in range(E):
        assert g.load[e].item() == pytest.approx(sum(layer[b][t][e] for layer, b, t in real) / 10)
    assert g.entropy == pytest.approx(sum(entropy(layer[b][t]) for layer, b, t in real) / 10)
    assert float(g.load.sum()) == pytest.approx(1.0)
    # Task 0 is sample 0 (3 tokens per layer), task 2 is sample 1 (2 real tokens per layer), task 1 has no sample.
    for task, sample, n in ((0, 0, 3), (2, 1, 2)):
        expected = [
            sum(layer[sample][t][e] for layer in (layer0, layer1) for t in range(n)) / (2 * n) for e in range(E)
        ]
        assert g.task_expert[task].tolist() == pytest.approx(expected)
    assert torch.isnan(g.task_expert[1]).all()

    # h: top-1 of each sample's instance routing, gate 1 on the chosen expert; its entropy is of the probabilities.
    h = results["h"]
    assert h.count == 2
    assert h.load.tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert h.entropy == pytest.approx((entropy([0.6, 0.3, 0.1]) + entropy([0.2, 0.5, 0.3])) / 2)
    assert h.task_expert[0].tolist() == [1.0, 0.0, 0.0] and h.task_expert[2].tolist() == [0.0, 1.0, 0.0]

    # Sums add up over batches: the same pass twice gives the same means.
    stats.add(context)
    assert stats.results()["g"].count == 20 and stats.results()["g"].load.tolist() == pytest.approx(g.load.tolist())
    assert RoutingStats(num_tasks=0).results() == {}
    without_tasks = RoutingStats(num_tasks=0)
    without_tasks.add(context)
    assert without_tasks.results()["g"].task_expert is None


def test_router_groups_are_named_after_the_config_and_seen_by_observers(tiny_llama):
    groups = [
        AdapterGroup("asymlora", ["q_proj", "k_proj"], {"r": 2, "heads": 3}),
        AdapterGroup("asymlora", ["mlp"], {"r": 2, "heads": 2, "top_k": 1}),
        AdapterGroup("mixlora", ["v_proj"], {"r": 2, "factors": 5}),
        AdapterGroup("lora", ["o_proj"], {"r": 2}),
    ]
    assert group_labels(groups) == ["asymlora.0", "asymlora.1", "mixlora", "lora"]
    context = RoutingContext()
    inject_adapters(tiny_llama.model, groups, context)
    assert sorted(set(context.groups.values())) == ["asymlora.0", "asymlora.1", "mixlora/router_a", "mixlora/router_b"]
    assert context.groups["layers.0.self_attn.v_proj.router_a"] == "mixlora/router_a"

    stats = RoutingStats(num_tasks=2)
    context.observers.append(stats.add)
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad(), context.step(torch.ones(2, 6, dtype=torch.long), task_ids=torch.tensor([1, 1])):
        tiny_llama(input_ids=ids)
    with torch.no_grad(), context.step(None, record=False):  # not recorded: not observed
        tiny_llama(input_ids=ids)
    results = stats.results()
    assert sorted(results) == sorted(set(context.groups.values()))
    # asymlora.0: 2 layers x 2 projections x 12 tokens; mixlora: 2 layers x 2 samples per router.
    assert results["asymlora.0"].count == 48 and results["mixlora/router_a"].count == 4
    assert results["asymlora.1"].load.shape == (2,) and results["mixlora/router_b"].load.shape == (5,)
    for group in results.values():
        assert float(group.load.sum()) == pytest.approx(1.0) and 0.0 < group.entropy <= 1.0
        assert torch.isnan(group.task_expert[0]).all() and group.task_expert[1].tolist() == pytest.approx(
            group.load.tolist()
        )


def test_per_sample_losses_equal_each_sample_alone(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (3, 8))
    mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2, [1] * 5 + [0] * 3])
    labels = torch.full((3, 8), IGNORE_INDEX)
    labels[0, 3:8] = ids[0, 3:8]
    labels[1, 2:6] = ids[1, 2:6]  # sample 2 has nothing to train on
    inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        loss, per_sample = lm_losses(tiny_llama, inputs, labels)
        alone = [lm_loss(tiny_llama, {k: v[i : i + 1] for k, v in inputs.items()}, labels[i : i + 1]) for i in range(2)]
        assert loss.item() == pytest.approx(lm_loss(tiny_llama, inputs, labels).item())
    assert per_sample.shape == (3,) and not per_sample.requires_grad
    torch.testing.assert_close(per_sample[:2], torch.stack(alone), rtol=1e-5, atol=1e-6)
    assert math.isnan(per_sample[2])
    # The batch loss weighs tokens: sample 0 trains 5, sample 1 trains 4.
    assert loss.item() == pytest.approx((5 * per_sample[0] + 4 * per_sample[1]).item() / 9, rel=1e-5)


def test_default_callbacks_add_only_what_the_config_lacks():
    kinds = lambda callbacks: [type(c) for c in callbacks]  # noqa: E731
    assert kinds(default_callbacks([ModelCheckpoint()])) == [TokensProgressBar, Monitor, RunSummary]
    assert kinds(default_callbacks([TQDMProgressBar(), Monitor(window=5)])) == [RunSummary]
    assert kinds(default_callbacks([], progress_bar=False)) == [Monitor, RunSummary]


def read_events(run_dir) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def values(events: EventAccumulator, tag: str) -> list[float]:
    return [e.value for e in events.Scalars(tag)]


def parse_table(markdown: str) -> tuple[list[str], list[list[float]]]:
    """Rows (task names) and values of the monitor's Markdown task x expert table."""
    lines = [line.strip("|").split("|") for line in markdown.strip().splitlines()]
    header, rows = lines[0], lines[2:]
    assert [h.strip() for h in header] == ["task"] + [f"expert {e}" for e in range(len(header) - 1)]
    return [r[0].strip() for r in rows], [[math.nan if v.strip() == "n/a" else float(v) for v in r[1:]] for r in rows]


@pytest.mark.slow
def test_fit_logs_task_losses_throughput_memory_and_routing(tmp_path, tiny_model_dirs):
    config = demo_config(tmp_path, tiny_model_dirs["llava"], "llava", steps=4)
    result = mmpeft(
        "fit",
        "--config",
        str(config),
        "--trainer.log_every_n_steps",
        "1",
        "--trainer.limit_val_batches",
        "1",
        "--model.adapters",
        '[{"name": "asymlora", "config": {"r": 4, "heads": 3}}]',
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "demo").iterdir()
    events = read_events(run_dir)
    tasks = json.loads((tmp_path / "shards" / "train" / "dataset.json").read_text())["tasks"]
    assert len(tasks) == 4

    losses = values(events, "train/loss")
    assert len(losses) == 4
    per_task = {task: values(events, f"train/loss/{task}") for task in tasks}
    assert all(per_task.values()), per_task  # every task was logged at least once
    assert all(abs(v - losses[0]) < 2.0 for task_values in per_task.values() for v in task_values[:1])
    samples, tokens = values(events, "train/samples_per_sec"), values(events, "train/tokens_per_sec")
    assert len(samples) == len(tokens) == 4 and all(s > 0 for s in samples)
    assert all(1 < t / s <= 256 for s, t in zip(samples, tokens))  # tokens per sample: real ones, at most max_length
    memory = values(events, "train/peak_memory_gib")
    assert all(0.1 < m < 64 for m in memory) and memory == sorted(memory)  # a peak never goes down

    # Routing: one group (asymlora, 3 heads), logged with the loss.
    entropies = values(events, "routing/asymlora/entropy")
    assert len(entropies) == 4 and all(0 < h <= 1 for h in entropies)
    loads = [values(events, f"routing/asymlora/load/expert_{e}") for e in range(3)]
    assert all(len(load) == 4 for load in loads)
    assert [sum(step) for step in zip(*loads)] == pytest.approx([1.0] * 4, abs=1e-5)
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("routing/") and "expert_3" in tag]

    # At each of the 2 validations, the task x expert heatmap: an image sized for 4 tasks x 3 experts, and its table.
    images = events.Images("routing/asymlora/task_expert")
    assert len(images) == 2
    width, height = plots.heatmap_size(tasks, 3)
    assert {(i.width, i.height) for i in images} == {(width, height)} and width != plots.heatmap_size(tasks, 4)[0]
    assert height != plots.heatmap_size(tasks[:3], 3)[1]
    assert Image.open(io.BytesIO(images[-1].encoded_image_string)).size == (width, height)
    (table,) = events.Tensors("routing/asymlora/task_expert/text_summary")[-1:]
    rows, matrix = parse_table(table.tensor_proto.string_val[0].decode())
    assert rows == tasks and all(len(row) == 3 for row in matrix)
    assert [sum(row) for row in matrix] == pytest.approx(
        [1.0] * 4, abs=1e-3
    )  # every validation batch has every task here

    # The summary, after the progress bar (which shows tokens/s).
    out = result.stdout
    assert "tokens/s" in out
    assert re.search(r"fit: 4 steps in \d+m \d\ds", out)
    assert re.search(r"val/loss\s*│\s*[\d.]+\s*│\s*\d+", out)
    adapter = run_dir.resolve() / "adapter"
    assert f"adapter:     {adapter}" in out and (adapter / "adapter_config.json").is_file()
    assert f"logs:        {run_dir.resolve()}" in out and f"checkpoints: {(tmp_path / 'checkpoints').resolve()}" in out
    assert out.index("tokens/s") < out.index("fit: 4 steps")

    # The report of this run: its heatmap and per-task losses on one page.
    report = mmpeft("report", str(run_dir))
    assert report.returncode == 0, report.stderr
    page = (run_dir / "report.html").read_text()
    assert report.stdout.strip() == str(run_dir / "report.html")
    assert all(f"<td>{task}</td>" in page for task in tasks) and "asymlora task x expert" in page


def test_a_lora_run_logs_no_routing(tmp_path, tiny_model_dirs):
    from mmpeft.data.datamodule import ShardDataModule
    from mmpeft.models.backbone import Backbone
    from mmpeft.module import MMPeftModule, Optim

    shards = tmp_path / "shards"
    SyntheticRecipe(samples=24, samples_per_shard=24, seed=5).build(shards, progress=False)
    path = tiny_model_dirs["qwen2_vl"]
    module = MMPeftModule(
        Backbone(pretrained=path), [AdapterGroup("lora", ["mlp"], {"r": 4})], Optim(lr=1e-3, warmup=0)
    )
    data = ShardDataModule(train=str(shards), val=str(shards), processor=path, batch_size=4, max_length=256)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=logger,
        log_every_n_steps=1,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[Monitor()],
    )
    trainer.fit(module, data)
    events = read_events(tmp_path / "run" / "version_0")
    tags = events.Tags()
    assert not [t for t in tags["scalars"] if t.startswith("routing/")] and not tags["images"] and not tags["tensors"]
    assert len(values(events, "train/tokens_per_sec")) == 2
    assert {t for t in tags["scalars"] if t.startswith("train/loss/")} <= {f"train/loss/{task}" for task in data.tasks}
    assert any(t.startswith("train/loss/") for t in tags["scalars"])
    assert module.routing_context.observers == []  # the monitor let go of the model at the end
