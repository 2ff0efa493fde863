"""Weighted task mixing: proportions over thousands of draws, temperature, determinism, epochs in steps."""

from __future__ import annotations

import itertools
import json
import random
import shutil
from collections import Counter

import pytest

from data_recipes.synthetic import SyntheticRecipe
from mmpeft.data.datamodule import ShardDataModule, resolve_source
from mmpeft.data.stream import Mixing, ShardStream, plan_mixture
from mmpeft.errors import ConfigError

DRAWS = 4000
TOLERANCE = 0.03  # 4000 draws: one standard deviation of a share near 0.5 is 0.008


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """Two sources of unequal size: ``a`` has 90 colour/shape samples, ``b`` 30 count samples."""
    root = tmp_path_factory.mktemp("mix")
    SyntheticRecipe(samples=90, samples_per_shard=20, tasks=("color", "shape"), seed=1, prefix="a").build(
        root / "a", progress=False
    )
    SyntheticRecipe(samples=30, samples_per_shard=10, tasks=("count",), seed=2, prefix="b").build(
        root / "b", progress=False
    )
    return {"a": str(root / "a"), "b": str(root / "b")}


def draw_tasks(sources: dict[str, str], mixing: Mixing, n: int = DRAWS, seed: int = 0, rank: int = 0) -> list[str]:
    """The tasks of the first ``n`` raw samples of the resampled stream (read from the real shards, not encoded)."""
    resolved = [resolve_source(spec, "data.train")[0] for spec in sources.values()]
    plan = plan_mixture(mixing, resolved, "data.train")
    stream = ShardStream(resolved, None, 1, train=True, seed=seed, shuffle_buffer=1, rank=rank, world=2, plan=plan)
    raws = stream._resampled(random.Random(f"{seed}:{rank}"))
    return [json.loads(raw["json"])["task"] for raw in itertools.islice(raws, n)]


def shares(tasks: list[str]) -> dict[str, float]:
    return {task: count / len(tasks) for task, count in sorted(Counter(tasks).items())}


def assert_shares(tasks: list[str], expected: dict[str, float]) -> None:
    got = shares(tasks)
    assert got.keys() == expected.keys()
    for task, share in expected.items():
        assert abs(got[task] - share) < TOLERANCE, (task, got, expected)


def test_sources_mixed_with_config_weights(sources):
    paths = list(sources.values())
    # a : b = 1 : 3, each source keeping its own task proportions (a: half colour, half shape).
    tasks = draw_tasks(sources, Mixing(by="source", weights={paths[0]: 1.0, paths[1]: 3.0}))
    assert_shares(tasks, {"color": 0.125, "shape": 0.125, "count": 0.75})


def test_tasks_within_a_source_mixed_with_config_weights(sources):
    tasks = draw_tasks({"a": sources["a"]}, Mixing(by="task", weights={"color": 4.0, "shape": 1.0}))
    assert_shares(tasks, {"color": 0.8, "shape": 0.2})


@pytest.mark.parametrize(
    ("temperature", "expected"),
    [
        (1.0, {"color": 0.375, "shape": 0.375, "count": 0.25}),  # as in the data: 45, 45, 30 samples
        (1e6, {"color": 1 / 3, "shape": 1 / 3, "count": 1 / 3}),  # towards uniform
        (2.0, {t: n**0.5 / (2 * 45**0.5 + 30**0.5) for t, n in {"color": 45, "shape": 45, "count": 30}.items()}),
    ],
)
def test_temperature_sampling_over_tasks(sources, temperature, expected):
    tasks = draw_tasks(sources, Mixing(by="task", temperature=temperature))
    assert_shares(tasks, expected)
    assert plan_mixture(
        Mixing(by="task", temperature=temperature), [resolve_source(s, "x")[0] for s in sources.values()], "x"
    ).target == pytest.approx(expected)


def test_draws_are_deterministic_per_seed_and_differ_across_ranks(sources):
    mixing = Mixing(by="task", temperature=2.0)
    first = draw_tasks(sources, mixing, n=300, seed=7)
    assert draw_tasks(sources, mixing, n=300, seed=7) == first
    assert draw_tasks(sources, mixing, n=300, seed=8) != first
    assert draw_tasks(sources, mixing, n=300, seed=7, rank=1) != first


def test_weights_must_name_exactly_the_sources_or_tasks(sources):
    resolved = [resolve_source(s, "x")[0] for s in sources.values()]
    with pytest.raises(
        ConfigError, match=r"unknown task\(s\) 'colour'.*no weight for 'color'.*the tasks are 'color', 'count', 'shape'"
    ):
        plan_mixture(Mixing(by="task", weights={"colour": 1, "shape": 1, "count": 1}), resolved, "data.train")
    with pytest.raises(ConfigError, match=r"no weight for '.*/b'"):
        plan_mixture(Mixing(by="source", weights={sources["a"]: 1}), resolved, "data.train")
    with pytest.raises(ConfigError, match=r"data.mixing.temperature must be > 0"):
        ShardDataModule(train=sources["a"], mixing={"temperature": 0})


def test_mixing_needs_index_counts(sources, tmp_path):
    shutil.copy(f"{sources['b']}/b-000000.tar", tmp_path / "loose-000000.tar")
    with pytest.raises(ConfigError, match=r"data.mixing needs the sample counts.*loose"):
        plan_mixture(Mixing(), [resolve_source(str(tmp_path / "loose-*.tar"), "x")[0]], "data.train")


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_is_epoch_steps_batches_of_the_mixture(tiny_model_dirs, sources, workers):
    dm = ShardDataModule(
        train=list(sources.values()),
        processor=tiny_model_dirs["llava"],
        batch_size=4,
        max_length=256,
        num_workers=workers,
        shuffle_buffer=8,
        seed=3,
        mixing={"by": "task", "weights": {"color": 0, "shape": 1, "count": 1}, "epoch_steps": 5},
    )
    dm.setup("fit")
    assert dm.tasks == ["color", "count", "shape"]
    loader = dm.train_dataloader()
    epochs = [[batch for batch in loader] for _ in range(2)]
    assert [len(batches) for batches in epochs] == [5, 5]
    task_ids = {i for batches in epochs for b in batches for i in b["task_ids"].tolist()}
    assert task_ids == {1, 2}  # colour has weight 0
    keys = [[k for b in batches for k in b["keys"]] for batches in epochs]
    assert keys[0] != keys[1]  # a new draw every epoch
    if workers == 2:  # the loader alternates workers: their streams are seeded apart
        assert epochs[0][0]["keys"] != epochs[0][1]["keys"]
