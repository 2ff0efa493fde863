"""Streaming shards: patterns, node and worker splitting, bad samples inside shards."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from test_encode import assistant, image, raw_sample, user

from data_recipes.synthetic import SyntheticRecipe
from mmpeft.data.datamodule import RecipeRun, ShardDataModule, resolve_shards
from mmpeft.errors import ConfigError, DataError


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
    with pytest.raises(
        ConfigError,
        match=r"data\.val: shard pattern .*" + pattern.split("/")[-1].replace("{", r"\{").replace("*", r"\*"),
    ):
        resolve_shards(pattern, "data.val")


def read_as_ranks(tiny_model_dirs, train: str, monkeypatch, world: int = 2, **kwargs) -> list[list[list[str]]]:
    """The keys of every batch each rank reads (rank and world as torchrun's environment gives them)."""
    ranks = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        dm = datamodule(tiny_model_dirs, train, **kwargs)
        ranks.append([batch["keys"] for batch in dm.train_dataloader()])
    return ranks


def test_every_sample_once_across_ranks_and_workers(tiny_model_dirs, shards, monkeypatch):
    """2 ranks x 2 dataloader workers each: no sample twice, and both ranks read the same number of full batches."""
    ranks = read_as_ranks(tiny_model_dirs, shards, monkeypatch, num_workers=2, shuffle_buffer=8)
    # 6 shards of 10: a rank's 3 shards fall to its workers as 20 + 10 samples, 5 + 2 full batches of 4.
    assert [len(batches) for batches in ranks] == [7, 7]
    assert all(len(keys) == 4 for batches in ranks for keys in batches)
    counts = Counter(key for batches in ranks for keys in batches for key in keys)
    assert len(counts) == 56 and set(counts.values()) == {1}


@pytest.mark.parametrize("workers", [0, 2])
def test_uneven_shard_counts_give_every_rank_the_same_batches(tiny_model_dirs, tmp_path, monkeypatch, workers):
    """5 shards of different sizes over 2 ranks: equal batch counts (no DDP hang), still no repeats."""
    out = tmp_path / "uneven"
    SyntheticRecipe(samples=46, samples_per_shard=10, seed=4).build(out, progress=False)  # 10, 10, 10, 10, 6
    ranks = read_as_ranks(tiny_model_dirs, str(out), monkeypatch, num_workers=workers, shuffle_buffer=4)
    assert len(ranks[0]) == len(ranks[1]) > 0
    keys = [key for batches in ranks for keys in batches for key in keys]
    assert len(keys) == len(set(keys)) >= 4 * 2 * 4


def test_several_ranks_need_sample_counts(tiny_model_dirs, shards, tmp_path, monkeypatch):
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "a-000000.tar").write_bytes((Path(shards) / "train-000000.tar").read_bytes())
    with pytest.raises(ConfigError, match=r"same number of batches.*a-000000.tar has none"):
        read_as_ranks(tiny_model_dirs, str(lone), monkeypatch, tasks=["color"])


def test_tasks_come_from_the_index_and_label_every_sample(tiny_model_dirs, shards):
    dm = datamodule(tiny_model_dirs, shards, shuffle_buffer=1)
    index = json.loads((Path(shards) / "dataset.json").read_text())
    assert dm.tasks == index["tasks"]
    task_counts = Counter()
    for batch in dm.train_dataloader():
        assert batch["task_ids"].shape == (len(batch["keys"]),)
        task_counts.update(dm.tasks[i] for i in batch["task_ids"].tolist())
    assert task_counts == Counter(index["samples_per_task"])


def write_mixed_shard(path: Path, good: int, reasons_bad: int = 1) -> list[str]:
    """A shard with ``good`` usable samples and two bad ones (malformed JSON, a missing image) per ``reasons_bad``."""
    rows = [
        raw_sample(f"good{i}", "color", [user("What colour?", 1), assistant("green")], [image()]) for i in range(good)
    ]
    bad = []
    for j in range(reasons_bad):
        bad += [
            dict(rows[0], **{"__key__": f"broken-json{j}", "json": b"{"}),
            raw_sample(f"missing-image{j}", "color", [user("What colour?", 1), assistant("green")], []),
        ]
    with wds.TarWriter(str(path)) as sink:
        for raw in rows[: good // 2] + bad + rows[good // 2 :]:
            sink.write({k: v for k, v in raw.items() if k != "__url__"})
    return [r["__key__"] for r in rows]


@pytest.mark.parametrize("workers", [0, 1])
def test_bad_samples_in_a_shard_are_skipped_counted_and_the_rest_trains(tiny_model_dirs, tmp_path, workers):
    path = tmp_path / "mixed-000000.tar"
    good = write_mixed_shard(path, 6)
    dm = datamodule(
        tiny_model_dirs, str(path), tasks=["color"], shuffle_buffer=1, num_workers=workers, max_skip_fraction=0.25
    )
    batches = list(dm.train_dataloader())
    assert sorted(k for b in batches for k in b["keys"]) == sorted(good)
    skipped = Counter()
    for b in batches:
        skipped.update(b["skipped"])
    assert skipped == {"bad_json": 1, "image_count_mismatch": 1}


@pytest.mark.parametrize("workers", [0, 1])
def test_too_many_bad_samples_stop_the_run_naming_the_shard(tiny_model_dirs, tmp_path, workers):
    """2 bad of 8 is above a limit of 0.2: a DataError names the shard (also from a worker process)."""
    path = tmp_path / "mostly-bad-000000.tar"
    write_mixed_shard(path, 6)
    dm = datamodule(tiny_model_dirs, str(path), tasks=["color"], num_workers=workers, max_skip_fraction=0.2)
    with pytest.raises(
        DataError,
        match=(
            r"2 of 8 samples skipped \(bad_json 1, image_count_mismatch 1\)"
            r".*max_skip_fraction=0.2.*mostly-bad-000000.tar"
        ),
    ):
        list(dm.train_dataloader())


def test_the_skip_limit_is_checked_while_streaming(tiny_model_dirs, tmp_path):
    """With many samples the limit trips as soon as the fraction is over it, not only at the end."""
    from mmpeft.data import encode

    path = tmp_path / "bad-000000.tar"
    write_mixed_shard(path, 40, reasons_bad=20)  # 20 good, 40 bad, 20 good
    dm = datamodule(tiny_model_dirs, str(path), tasks=["color"], shuffle_buffer=1)
    dm.encoder.skip_check_after = 30
    with pytest.raises(DataError, match=r"10 of 30 samples skipped"):
        list(dm.train_dataloader())
    assert encode.SKIP_CHECK_AFTER == 100 and dm.encoder.seen == 30


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


def test_task_ids_come_from_the_checkpoint_on_resume(tiny_model_dirs, shards):
    """A resumed run keeps its checkpoint's task ids even when the config now lists the tasks in another order."""
    from mmpeft.data.sample import Sample

    saved = datamodule(tiny_model_dirs, shards).state_dict()
    assert saved["tasks"] == ["caption", "color", "count", "shape"]
    resumed = datamodule(tiny_model_dirs, shards, tasks=["shape", "count", "color", "caption"])
    resumed.load_state_dict(saved)
    assert resumed.tasks == saved["tasks"]
    item = resumed.encoder.encode(Sample("k", "count", [user("How many?", 1), assistant("2")], [image()]))
    assert item["task_id"] == 2
    with pytest.raises(
        ConfigError, match=r"lacks task\(s\) \['count', 'shape'\] of the data; task ids must not change"
    ):
        datamodule(tiny_model_dirs, shards).load_state_dict({"tasks": ["caption", "color"]})
