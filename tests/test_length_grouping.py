"""Length-grouped batching (data.group_by_length): the grouping itself, the stream's samples and batch counts, exact
resume."""

from __future__ import annotations

import logging
import random
from collections import Counter

import pytest

from data_recipes.synthetic import SyntheticRecipe
from mmpeft.data.datamodule import ShardDataModule
from mmpeft.data.stream import StreamPosition, batch_padding, length_groups
from mmpeft.errors import ConfigError

# A mixed-length pool of 16: short answers and long captions, interleaved as a shuffled stream gives them.
LENGTHS = [10, 200, 35, 90, 12, 180, 60, 40, 150, 20, 75, 110, 30, 220, 50, 95]


def test_length_groups_take_every_index_once_as_runs_of_the_sorted_order():
    batches = length_groups(LENGTHS, 4, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(16))
    order = sorted(range(16), key=lambda i: LENGTHS[i])
    runs = [order[j : j + 4] for j in range(0, 16, 4)]
    assert sorted(sorted(b) for b in batches) == sorted(sorted(r) for r in runs)  # each batch: neighbours in length
    assert batches != runs  # yielded in a random order, not shortest first
    # 18 indices: four full batches and the two longest together.
    odd = length_groups(LENGTHS + [5, 300], 4, random.Random(1))
    assert sorted(len(b) for b in odd) == [2, 4, 4, 4, 4]
    assert sorted(next(b for b in odd if len(b) == 2)) == [13, 17]
    assert sorted(i for b in odd for i in b) == list(range(18))
    assert length_groups([], 4, random.Random(0)) == []
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        length_groups(LENGTHS, 0, random.Random(0))


def test_length_groups_are_deterministic_for_a_seed():
    assert length_groups(LENGTHS, 4, random.Random("s:0:1:2:pool3")) == length_groups(
        LENGTHS, 4, random.Random("s:0:1:2:pool3")
    )
    orders = {tuple(map(tuple, length_groups(LENGTHS, 4, random.Random(seed)))) for seed in range(10)}
    assert len(orders) > 1  # the seed decides the order of the batches...
    assert {frozenset(map(frozenset, o)) for o in orders} == {
        frozenset(map(frozenset, orders.pop()))
    }  # ...not their members


def test_length_groups_pad_less_than_batches_in_stream_order():
    in_order = [list(range(j, j + 4)) for j in range(0, 16, 4)]
    # Stream order: batches padded to 200, 180, 150, 220 -> 3000 positions for 1377 tokens.
    assert sum(LENGTHS) == 1377 and batch_padding(LENGTHS, in_order) == 3000 - 1377 == 1623
    # Grouped: runs padded to 30, 60, 110, 220 -> 1680 positions.
    assert batch_padding(LENGTHS, length_groups(LENGTHS, 4, random.Random(0))) == 1680 - 1377 == 303
    # Over many random batchings of the same pool, grouping is never worse and over 4x less on average.
    rng = random.Random(0)
    shuffled = []
    for _ in range(200):
        order = list(range(16))
        rng.shuffle(order)
        shuffled.append(batch_padding(LENGTHS, [order[j : j + 4] for j in range(0, 16, 4)]))
    assert min(shuffled) >= 303 and sum(shuffled) / len(shuffled) > 4 * 303


# -- the training stream ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """72 samples of all five synthetic tasks (one and two images, one and two turns): 31 to 57 tokens with the tiny
    LLaVA."""
    out = tmp_path_factory.mktemp("grouping") / "train"
    SyntheticRecipe(
        samples=72, samples_per_shard=12, seed=4, tasks=("color", "shape", "count", "caption", "compare")
    ).build(out, progress=False)
    return str(out)


def datamodule(tiny_model_dirs, train: str, **kwargs) -> ShardDataModule:
    kwargs = {"batch_size": 4, "max_length": 256, "shuffle_buffer": 16, **kwargs}
    dm = ShardDataModule(train=train, val=train, processor=tiny_model_dirs["llava"], **kwargs)
    dm.setup("fit")
    return dm


def pad_positions(batches: list[dict]) -> int:
    return sum(int((b["inputs"]["attention_mask"] == 0).sum()) for b in batches)


def test_a_grouped_pass_yields_the_same_samples_once_with_less_padding(tiny_model_dirs, shards):
    plain = list(datamodule(tiny_model_dirs, shards).train_dataloader())
    grouped = list(datamodule(tiny_model_dirs, shards, group_by_length=4).train_dataloader())
    keys = [k for b in grouped for k in b["keys"]]
    assert len(keys) == len(set(keys)) == 72
    assert set(keys) == {k for b in plain for k in b["keys"]}
    assert len(grouped) == len(plain) == 18
    # Each pool is the stream's next 16 samples, unchanged by the grouping: it only regroups them.
    pool = lambda batches, p: sorted(k for b in batches[4 * p : 4 * p + 4] for k in b["keys"])  # noqa: E731
    assert all(pool(grouped, p) == pool(plain, p) for p in range(5))
    # The same 72 samples padded to their batch's longest: 779 pad positions in stream order, 195 grouped (-75%).
    assert (pad_positions(plain), pad_positions(grouped)) == (779, 195)
    # The validation stream is never grouped.
    val = datamodule(tiny_model_dirs, shards, group_by_length=4)
    val.eval_prompts = False
    assert [b["keys"] for b in val.val_dataloader()] == [
        b["keys"] for b in datamodule(tiny_model_dirs, shards).val_dataloader()
    ]


def read_as_ranks(tiny_model_dirs, train: str, monkeypatch, world: int = 2, **kwargs) -> list[list[list[str]]]:
    ranks = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        ranks.append([batch["keys"] for batch in datamodule(tiny_model_dirs, train, **kwargs).train_dataloader()])
    return ranks


@pytest.mark.parametrize("uneven", [False, True], ids=["6-shards-of-12", "5-uneven-shards"])
def test_grouping_keeps_every_rank_and_worker_at_its_quota(tiny_model_dirs, shards, tmp_path, monkeypatch, uneven):
    """2 ranks x 2 workers, pools of 4 batches: the same full batches per rank as without grouping, from the same
    samples.

    6 shards of 12: a rank's workers read 24 and 12 samples, so their quotas are 6 batches (a pool of 4, then one cut
    to the 2 still due) and 3 (one pool cut to 3). 5 uneven shards (10, 10, 10, 10, 6): every worker's quota is 2
    batches (rank 0 drops 2 of its 6), in one pool cut to 2.
    """
    train, expected = shards, 9
    if uneven:
        train, expected = str(tmp_path / "uneven"), 4
        SyntheticRecipe(samples=46, samples_per_shard=10, seed=4).build(train, progress=False)
    plain = read_as_ranks(tiny_model_dirs, train, monkeypatch, num_workers=2, shuffle_buffer=4)
    grouped = read_as_ranks(tiny_model_dirs, train, monkeypatch, num_workers=2, shuffle_buffer=4, group_by_length=4)
    assert [len(r) for r in grouped] == [len(r) for r in plain] == [expected, expected]
    assert all(len(keys) == 4 for batches in grouped for keys in batches)
    for p, g in zip(plain, grouped):
        assert sorted(k for keys in g for k in keys) == sorted(k for keys in p for k in keys)
    assert Counter(k for batches in grouped for keys in batches for k in keys).most_common(1)[0][1] == 1
    if not uneven:
        assert plain != grouped  # the grouping did regroup


def test_a_grouped_resampled_epoch_has_its_epoch_steps(tiny_model_dirs, shards):
    mixing = {"by": "task", "temperature": 2.0, "epoch_steps": 7}
    batches = list(
        datamodule(tiny_model_dirs, shards, mixing=mixing, group_by_length=4, num_workers=0).train_dataloader()
    )
    assert len(batches) == 7 and all(len(b["keys"]) == 4 for b in batches)
    assert [b["stream"]["pooled"] for b in batches] == [
        1,
        2,
        3,
        0,
        1,
        2,
        0,
    ]  # a pool of 4 batches, then the 3 still due


# -- resume -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "workers, mixing, world, taken, pooled",
    [
        (0, None, 1, 6, {0: 2}),  # 2 batches into the second pool
        (0, None, 1, 8, {0: 0}),  # at the end of the second pool
        (2, None, 1, 5, {0: 3, 1: 2}),  # the workers take turns: 3 and 2 batches into their first pools
        (
            2,
            {"by": "task", "temperature": 2.0, "epoch_steps": 12},
            1,
            7,
            {0: 0, 1: 3},
        ),  # 6 batches per worker: pools of 4 and 2
        (0, None, 2, 5, {0: 1}),  # rank 1 of 2: a quota of 9 batches in pools of 4, 4 and 1; 1 into the second
    ],
    ids=["mid-pool-0-workers", "pool-end-0-workers", "mid-pool-2-workers", "resampled-2-workers", "quota-rank-1-of-2"],
)
def test_a_grouped_stream_resumes_with_the_batches_an_uninterrupted_epoch_would_give(
    tiny_model_dirs, shards, monkeypatch, workers, mixing, world, taken, pooled
):
    monkeypatch.setenv("RANK", str(world - 1))
    monkeypatch.setenv("WORLD_SIZE", str(world))

    def dm() -> ShardDataModule:
        return datamodule(tiny_model_dirs, shards, num_workers=workers, mixing=mixing, group_by_length=4)

    whole = [batch["keys"] for batch in dm().train_dataloader()]
    assert len(whole) == {1: 18 if not mixing else 12, 2: 9}[world]
    interrupted = dm()
    loader = iter(interrupted.train_dataloader())
    for _ in range(taken):  # trained on before the checkpoint
        interrupted.on_before_batch_transfer(next(loader), 0)
    next(loader)  # fetched ahead, never trained on
    del loader
    state = interrupted.state_dict()
    (position,) = state["stream"]
    assert position["group"] == 4 and position["pooled"] == pooled

    resumed = dm()
    resumed.load_state_dict(state)
    assert [batch["keys"] for batch in resumed.train_dataloader()] == whole[taken:]


def test_a_resume_with_another_grouping_restarts_the_epoch(tiny_model_dirs, shards, caplog):
    interrupted = datamodule(tiny_model_dirs, shards, group_by_length=4)
    loader = iter(interrupted.train_dataloader())
    for _ in range(6):
        interrupted.on_before_batch_transfer(next(loader), 0)
    state = interrupted.state_dict()
    whole = sorted(k for b in datamodule(tiny_model_dirs, shards).train_dataloader() for k in b["keys"])
    for other in (0, 2):
        resumed = datamodule(tiny_model_dirs, shards, group_by_length=other)
        resumed.load_state_dict(state)
        with caplog.at_level(logging.WARNING, logger="mmpeft.data"):
            caplog.clear()
            assert sorted(k for b in resumed.train_dataloader() for k in b["keys"]) == whole  # the whole pass again
        assert (
            f"resuming with data.group_by_length={other} where the checkpoint had 4: "
            "epoch 0 restarts from its beginning (set data.group_by_length=4 " in caplog.text
        )


def test_positions_saved_before_grouping_load_as_ungrouped_and_resume_exactly(tiny_model_dirs, shards):
    interrupted = datamodule(tiny_model_dirs, shards)
    loader = iter(interrupted.train_dataloader())
    for _ in range(5):
        interrupted.on_before_batch_transfer(next(loader), 0)
    (saved,) = interrupted.state_dict()["stream"]
    old = {
        k: saved[k] for k in ("epoch", "workers", "drawn", "batches", "next_worker")
    }  # as written before this option
    position = StreamPosition.from_dict(old)
    assert (position.group, position.pooled) == (1, {})
    assert StreamPosition.from_dict(saved).to_dict() == saved and saved["pooled"] == {
        0: 0
    }  # ungrouped: never inside a pool
    resumed = datamodule(tiny_model_dirs, shards)
    resumed.load_state_dict({"tasks": interrupted.tasks, "stream": [old]})
    assert [b["keys"] for b in resumed.train_dataloader()] == [
        b["keys"] for b in datamodule(tiny_model_dirs, shards).train_dataloader()
    ][5:]


def test_a_negative_group_by_length_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.group_by_length must be >= 0.*got -1"):
        ShardDataModule(train="x", group_by_length=-1)
