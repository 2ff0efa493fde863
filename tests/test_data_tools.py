"""``python -m mmpeft data build|inspect``: atomic and resumable builds, reports of what training would drop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds
import yaml
from test_cli import ROOT, demo_config, run_main
from test_datamodule import write_mixed_shard

from data_recipes.synthetic import SyntheticRecipe
from mmpeft.data.tools import inspect_shards


def samples_in(path: Path) -> list[str]:
    """Keys of a shard read with webdataset's own reader (an incomplete tar raises)."""
    return [s["__key__"] for s in wds.tarfile_samples([{"url": str(path)}])]


def test_build_command_writes_shards_and_an_index(tmp_path, capsys):
    code = run_main(
        capsys,
        "data",
        "build",
        "synthetic",
        "--out",
        str(tmp_path / "s"),
        "--samples",
        "30",
        "--samples_per_shard",
        "10",
        "--progress",
        "false",
    )[0]
    assert code == 0
    index = json.loads((tmp_path / "s" / "dataset.json").read_text())
    assert [s["name"] for s in index["shards"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert index["samples"] == 30 and sum(index["samples_per_task"].values()) == 30
    assert index["bytes"] == sum((tmp_path / "s" / s["name"]).stat().st_size for s in index["shards"])
    assert index["bad_records"] == {"count": 0, "by_reason": {}, "first": []}
    assert not (tmp_path / "s" / "dataset.json.partial").exists()


def test_build_command_names_a_bad_option_and_a_bad_recipe(tmp_path, capsys):
    code, err = run_main(capsys, "data", "build", "synthetic", "--out", str(tmp_path), "--samples", "0")
    assert code == 2 and "data build synthetic: samples must be >= 1" in err
    code, err = run_main(capsys, "data", "build", "nope", "--out", str(tmp_path))
    assert code == 2 and "unknown data recipe 'nope'; registered data recipes: " in err and "synthetic" in err


@pytest.mark.slow
def test_a_killed_build_leaves_no_complete_looking_shard_and_resumes(tmp_path):
    """SIGKILL in the middle of a build: finished shards are whole, the one being written is only a .tmp,
    there is no index; running the same build again keeps the finished shards and ends byte-identical to a clean
    build."""
    args = [
        "--samples",
        "4000",
        "--samples_per_shard",
        "200",
        "--image_size",
        "48",
        "--seed",
        "5",
        "--progress",
        "false",
    ]
    out = tmp_path / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmpeft", "data", "build", "synthetic", "--out", str(out), *args], cwd=ROOT, env=env
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("train-*.tar"))) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(out.glob("train-*.tar"))
    assert 2 <= len(finished) < 20, "the build ended before it could be interrupted"
    assert not (out / "dataset.json").exists()
    for shard in finished:
        assert len(samples_in(shard)) == 200, shard  # complete, or not under a final name at all
    assert {p.suffix for p in out.iterdir()} <= {".tar", ".tmp", ".partial"}
    partial = json.loads((out / "dataset.json.partial").read_text())
    assert {s["name"] for s in partial["shards"]} <= {p.name for p in finished}
    kept = {s["name"]: (out / s["name"]).stat().st_mtime_ns for s in partial["shards"]}

    recipe_args = dict(samples=4000, samples_per_shard=200, image_size=48, seed=5)
    index = SyntheticRecipe(**recipe_args).build(out, progress=False)
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # resumed, not rewritten
    clean = SyntheticRecipe(**recipe_args).build(tmp_path / "clean", progress=False)
    assert index == clean
    for shard in clean["shards"]:
        assert (out / shard["name"]).read_bytes() == (tmp_path / "clean" / shard["name"]).read_bytes()
    assert not list(out.glob("*.tmp")) and not (out / "dataset.json.partial").exists()


def test_temporary_files_of_an_interrupted_build_are_removed(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    leftovers = [
        ".train-000001.tar.k2j_x9.tmp",
        ".dataset.json.partial.rrzmrf9y.tmp",
        ".dataset.json.a1b2.tmp",
        "train-000007.tar.tmp",
    ]
    for name in leftovers + ["notes.txt", "val-000000.tar"]:
        (out / name).write_bytes(b"x")  # as a kill in the middle of writing each would leave them
    # val-000000.tar is no file of this build's: without overwrite the folder is refused (tests/test_issue14_data.py).
    SyntheticRecipe(samples=20, samples_per_shard=10, seed=1).build(out, progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "dataset.json",
        "notes.txt",
        "train-000000.tar",
        "train-000001.tar",
        "val-000000.tar",
    ]


def test_a_build_with_other_arguments_starts_over(tmp_path):
    out = tmp_path / "s"
    SyntheticRecipe(samples=40, samples_per_shard=10, seed=1).build(out, progress=False)
    (out / "dataset.json").rename(out / "dataset.json.partial")  # as if interrupted after the last shard
    # Only when asked (tests/test_issue14_data.py: refused otherwise).
    index = SyntheticRecipe(samples=20, samples_per_shard=10, seed=2).build(out, progress=False, overwrite=True)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert index["args"]["seed"] == 2
    assert index == SyntheticRecipe(samples=20, samples_per_shard=10, seed=2).build(tmp_path / "fresh", progress=False)


def test_inspect_reports_tasks_images_lengths_and_drops(tiny_model_dirs, tmp_path):
    out = tmp_path / "s"
    SyntheticRecipe(samples=24, samples_per_shard=8, tasks=("color", "compare"), seed=0).build(out, progress=False)
    write_mixed_shard(out / "extra-000000.tar", 2)  # not in the index: 2 good "color" samples, 2 bad
    report = inspect_shards(f"{out}/*.tar", tiny_model_dirs["llava"], max_length=10_000, progress=False)
    assert report["shards"] == 4 and report["samples_read"] == 28 and report["usable"] == 26
    assert report["samples_per_task"] == {"color": 14, "compare": 12}
    assert report["index_samples_per_task"] is None  # one shard has no index entry
    assert report["images_per_sample"] == {"1": 14, "2": 12}
    assert report["skipped"] == {"bad_json": 1, "image_count_mismatch": 1}
    assert report["skipped_examples"]["bad_json"] == ["extra-000000.tar:broken-json0"]
    lengths = report["tokens"]["all"]
    assert 0 < lengths["p50"] <= lengths["p90"] <= lengths["max"] and report["tokens"]["truncated"] == 0

    # One token short of the longest sample: it is truncated (the cut is after its images), not dropped.
    longest = int(report["tokens"]["per_task"]["compare"]["max"])
    tight = inspect_shards(str(out), tiny_model_dirs["llava"], max_length=longest - 1, progress=False)
    assert tight["index_samples_per_task"] == {"color": 12, "compare": 12}
    assert tight["tokens"]["truncated"] >= 1 and tight["skipped"] == {}
    # A cut inside the image tokens drops every sample, named by shard and key, lengths still measured.
    cut = inspect_shards(str(out), tiny_model_dirs["llava"], max_length=8, progress=False)
    assert cut["skipped"] == {"cuts_image_tokens": 24} and cut["usable"] == 0
    assert cut["skipped_examples"]["cuts_image_tokens"][0].startswith("train-000000.tar:")
    assert cut["tokens"]["per_task"]["compare"]["max"] == longest


def test_inspect_command_prints_a_report_and_writes_json(tiny_model_dirs, tmp_path, capsys):
    out = tmp_path / "s"
    SyntheticRecipe(samples=12, samples_per_shard=6, seed=0).build(out, progress=False)
    code, err = run_main(
        capsys,
        "data",
        "inspect",
        str(out),
        "--processor",
        tiny_model_dirs["llava"],
        "--json",
        str(tmp_path / "r.json"),
        "--no-progress",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["usable"] == 12 and set(report["tokens"]["per_task"]) == set(report["samples_per_task"])


def test_fit_stops_with_a_message_naming_the_shard_when_too_many_samples_are_bad(tiny_model_dirs, tmp_path, capsys):
    """Through the CLI and a dataloader worker: exit status 2, one line naming the shard, no traceback."""
    shard = tmp_path / "bad-000000.tar"
    write_mixed_shard(shard, 6, reasons_bad=2)
    config = demo_config(tmp_path, tiny_model_dirs["llava"], "llava", steps=4)
    data = yaml.safe_load(config.read_text())["data"]
    code, err = run_main(
        capsys,
        "fit",
        "--config",
        str(config),
        "--data.prepare",
        "[]",
        "--data.train",
        str(shard),
        "--data.val",
        "null",
        "--data.tasks",
        "[color]",
        "--data.max_skip_fraction",
        "0.2",
        "--data.num_workers",
        str(data["num_workers"]),
    )
    assert code == 2, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert (
        line.startswith("error: 4 of 10 samples skipped")
        and "bad-000000.tar" in line
        and "max_skip_fraction=0.2" in line
    )
    assert "Traceback" not in err.split("error: ")[-1]


@pytest.mark.slow
def test_ddp_on_two_cpu_ranks_reads_disjoint_samples_and_ends_with_identical_weights(
    tiny_model_dirs, tmp_path, monkeypatch
):
    """`fit` with strategy=ddp, devices=2 (gloo): 5 uneven shards, both ranks train the same number of steps
    (no hang), no sample is read twice, and DDP's gradient averaging leaves both with the same adapter."""
    from safetensors.torch import load_file
    from test_cli import mmpeft

    config = demo_config(tmp_path, tiny_model_dirs["llava"], "llava", steps=2)
    raw = yaml.safe_load(config.read_text())
    raw["trainer"].update(
        strategy="ddp",
        devices=2,
        max_steps=100,
        max_epochs=1,
        val_check_interval=None,
        check_val_every_n_epoch=1,
        limit_val_batches=None,
    )
    raw["trainer"]["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True},
        },
        {"class_path": "probes.RecordRanks", "init_args": {"out": str(tmp_path / "probe")}},
    ]
    train, val = raw["data"]["prepare"]
    train["args"].update(samples=72, samples_per_shard=16)  # 16, 16, 16, 16, 8: rank 0 gets 40 samples, rank 1 32
    val["args"].update(samples=36, samples_per_shard=9)
    config.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    result = mmpeft("fit", "--config", str(config), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert [len(r["batches"]) for r in ranks] == [4, 4]  # rank 0's fifth batch is dropped to keep ranks in step
    keys = [set(k for batch in r["batches"] for k in batch) for r in ranks]
    assert len(keys[0]) == len(keys[1]) == 32 and not keys[0] & keys[1]
    weights = [load_file(str(tmp_path / "probe" / f"rank{r}.safetensors")) for r in range(2)]
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) > 0
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    assert any(w.abs().sum() > 0 for n, w in weights[0].items() if n.endswith(".B"))  # B starts at zero: it trained
    # The checkpoint (written by rank 0) holds both ranks' stream positions, so each resumes its own.
    positions = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["ShardDataModule"]["stream"]
    assert [p["batches"] for p in positions] == [{0: 4}, {0: 4}]
    assert [p["drawn"][0] for p in positions] == [32, 32]


def test_skipped_samples_and_unreadable_shards_reach_tensorboard(tiny_model_dirs, tmp_path, capsys, caplog):
    """A real fit over a shard with bad samples and a truncated shard: the run goes on, and the
    counts by reason are in the TensorBoard event file."""
    from test_cli import scalars

    good = tmp_path / "good-000000.tar"
    write_mixed_shard(good, 14)  # 14 good, one malformed JSON, one missing image
    whole = tmp_path / "whole.tar"
    write_mixed_shard(whole, 6, reasons_bad=0)
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2 + 100])  # a tar that ends mid-member
    config = demo_config(tmp_path, tiny_model_dirs["llava"], "llava", steps=2)
    raw = yaml.safe_load(config.read_text())
    raw["trainer"].update(
        log_every_n_steps=1, val_check_interval=None, check_val_every_n_epoch=None, max_epochs=1, max_steps=3
    )
    config.write_text(yaml.safe_dump(raw))
    with caplog.at_level("WARNING", logger="mmpeft.data"):
        code, err = run_main(
            capsys,
            "fit",
            "--config",
            str(config),
            "--data.prepare",
            "[]",
            "--data.train",
            json.dumps([str(good), str(cut)]),
            "--data.val",
            "null",
            "--data.tasks",
            "[color]",
            "--data.shuffle_buffer",
            "1",
            "--data.max_skip_fraction",
            "0.2",
            "--data.num_workers",
            "0",
        )
    assert code == 0, err[-3000:]
    (run_dir,) = (tmp_path / "runs" / "demo").iterdir()
    assert scalars(run_dir, "data/skipped/bad_json")[-1] == 1
    assert scalars(run_dir, "data/skipped/image_count_mismatch")[-1] == 1
    assert scalars(run_dir, "data/skipped/bad_shard")[-1] == 1
    assert scalars(run_dir, "data/skipped/missing_json")[-1] == 1  # the cut shard's last sample lost its JSON
    assert f"skipped sample broken-json0 in {good}" in caplog.text and "cut-000000.tar" in caplog.text


def test_build_command_runs_a_source_recipe(tmp_path, capsys):
    """`data build llava --src FILE --images DIR --out DIR`: options come from the recipe's fields; a bad record is
    reported with its id and the build goes on; a missing source is one line naming it."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "img" / "a.jpg")
    records = [
        {
            "id": "r1",
            "image": "a.jpg",
            "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}],
        },
        {
            "id": "r2",
            "image": "gone.jpg",
            "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}],
        },
    ]
    (tmp_path / "mix.json").write_text(json.dumps(records))
    out = tmp_path / "shards"
    code, err = run_main(
        capsys,
        "data",
        "build",
        "llava",
        "--src",
        str(tmp_path / "mix.json"),
        "--images",
        str(tmp_path / "img"),
        "--out",
        str(out),
        "--progress",
        "false",
    )
    assert code == 0, err
    index = json.loads((out / "dataset.json").read_text())
    assert index["samples_per_task"] == {"mix": 1} and index["bad_records"]["first"][0]["id"] == "r2"
    assert index["bad_records"]["by_reason"] == {"missing_image": 1}
    code, err = run_main(
        capsys, "data", "build", "llava", "--src", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o2")
    )
    assert code == 2 and "nope.json" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "o2" / "dataset.json").exists()
