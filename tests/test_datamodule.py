"""Streaming shards: patterns, node and worker splitting, bad samples inside shards."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds

from data_recipes.synthetic import SyntheticRecipe
from mmpeft.data.datamodule import RecipeRun, ShardDataModule, resolve_shards
from mmpeft.errors import ConfigError

from test_encode import assistant, image, raw_sample, user


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards") / "train"
    SyntheticRecipe(samples=60, samples_per_shard=10, seed=3, prefix="train").build(out, progress=False)
    return str(out)


def keys_of(loader) -> list[str]:
    return [key for batch in loader for key in batch["keys"]]


def datamodule(tiny_model_dirs, train: str, **kwargs) -> ShardDataModule:
    dm = ShardDataModule(train=train, processor=tiny_model_dirs["llava"], batch_size=4, max_length=256, **kwargs)
    dm.setup("fit")
    return dm


def test_shard_specs_directory_brace_and_glob(shards):
    by_dir = resolve_shards(shards, "data.train")
    assert len(by_dir) == 6
    assert resolve_shards(f"{shards}/train-{{000000..000005}}.tar", "data.train") == by_dir
    assert sorted(resolve_shards(f"{shards}/*.tar", "data.train")) == sorted(by_dir)


@pytest.mark.parametrize("spec", ["{root}/nothing-*.tar", "{root}/train-{{000000..000009}}.tar", "{root}/empty-dir"])
def test_shard_pattern_matching_nothing_is_named(shards, tmp_path, spec):
    (tmp_path / "empty-dir").mkdir()
    root = shards if "train-" in spec else tmp_path
    pattern = spec.format(root=root)
    with pytest.raises(ConfigError, match=r"data\.val: shard pattern .*" + pattern.split("/")[-1].replace("{", r"\{").replace("*", r"\*")):
        resolve_shards(pattern, "data.val")


def test_every_sample_once_across_ranks_and_workers(tiny_model_dirs, shards, monkeypatch):
    """2 ranks x 2 dataloader workers each: the union of what they read is the data set, without repeats."""
    seen: list[str] = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        dm = datamodule(tiny_model_dirs, shards, num_workers=2, shuffle_buffer=8)
        rank_keys = keys_of(dm.train_dataloader())
        assert 0 < len(rank_keys) < 60
        seen += rank_keys
    counts = Counter(seen)
    assert len(counts) == 60 and set(counts.values()) == {1}


def test_tasks_come_from_the_index_and_label_every_sample(tiny_model_dirs, shards):
    dm = datamodule(tiny_model_dirs, shards, shuffle_buffer=1)
    index = json.loads((Path(shards) / "dataset.json").read_text())
    assert dm.tasks == index["tasks"]
    task_counts = Counter()
    for batch in dm.train_dataloader():
        assert batch["task_ids"].shape == (len(batch["keys"]),)
        task_counts.update(dm.tasks[i] for i in batch["task_ids"].tolist())
    assert task_counts == Counter(index["samples_per_task"])


def test_bad_samples_in_a_shard_are_skipped_counted_and_the_rest_trains(tiny_model_dirs, tmp_path):
    good = [raw_sample(f"good{i}", "color", [user("What colour?", 1), assistant("green")], [image()]) for i in range(6)]
    bad = [
        dict(good[0], **{"__key__": "broken-json", "json": b"{"}),
        raw_sample("missing-image", "color", [user("What colour?", 1), assistant("green")], []),
    ]
    path = tmp_path / "mixed-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for raw in good[:3] + bad + good[3:]:
            sink.write({k: v for k, v in raw.items() if k != "__url__"})
    dm = datamodule(tiny_model_dirs, str(path), tasks=["color"], shuffle_buffer=1)
    batches = list(dm.train_dataloader())
    assert sorted(k for b in batches for k in b["keys"]) == sorted(r["__key__"] for r in good)
    skipped = Counter()
    for b in batches:
        skipped.update(b["skipped"])
    assert skipped == {"bad_json": 1, "image_count_mismatch": 1}


def test_prepare_builds_once_and_rebuilds_when_arguments_change(tmp_path):
    out = tmp_path / "prep"
    run = RecipeRun("synthetic", str(out), {"samples": 8, "samples_per_shard": 4, "seed": 0})
    run.run()
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    run.run()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == first
    RecipeRun("synthetic", str(out), {"samples": 12, "samples_per_shard": 4, "seed": 0}).run()
    assert json.loads((out / "dataset.json").read_text())["samples"] == 12
    with pytest.raises(ConfigError, match=r"data.prepare \(synthetic\).args.*bogus"):
        RecipeRun("synthetic", str(out), {"bogus": 1}).run()


def test_processor_kwargs_reach_the_processor(tiny_model_dirs, shards):
    """Capping Qwen2-VL's pixels caps its image tokens: 64x64 pixels give 16 tokens, 32x32 give 4."""
    from mmpeft.data.sample import Sample

    counts = []
    for kwargs in (None, {"max_pixels": 32 * 32, "min_pixels": 16 * 16}):
        dm = ShardDataModule(train=shards, processor=tiny_model_dirs["qwen2_vl"], processor_kwargs=kwargs)
        dm.setup("fit")
        item = dm.encoder.encode(Sample("k", dm.tasks[0], [user("What?", 1), assistant("red")], [image(size=(64, 64))]))
        counts.append(int((item["tokens"]["input_ids"] == dm.encoder.image_token_id).sum()))
    assert counts == [16, 4]
