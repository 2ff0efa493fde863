"""Nothing of the user's is lost, and every command says clearly what it did (issue 14).

Every case runs through the command line on tiny data and asserts the outcome: the files that
must survive are still there and byte-identical, the exit code, and the one line that names the
file, key or sample. Each case failed on the code before its fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import io
import json
import logging
import os
import re
import shutil
import stat
import warnings
from collections import Counter
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import ROOT, demo_config, mmpeft, run_cli, run_main  # test_cli imports lightning before any capture

from data_recipes.synthetic import SyntheticRecipe
from mmpeft import plots
from mmpeft.adapters import AdapterGroup, inject_adapters
from mmpeft.adapters.routing import RoutingContext
from mmpeft.data.build import BadRecord, Record, ShardRecipe
from mmpeft.data.datamodule import RecipeRun, ShardDataModule
from mmpeft.errors import ConfigError, DataError
from mmpeft.models.backbone import Backbone, language_model, load_backbone
from mmpeft.report import Run, task_table
from mmpeft.saving import AdapterSpec, base_summary, save_adapter, trainable_tensors

# ----------------------------------------------------------------------------------------------
# Data: builds that would replace another data set, damaged shards, empty sources, broken shards in words
# ----------------------------------------------------------------------------------------------


def last_line(err: str) -> str:
    return (err.strip().splitlines() or [""])[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def build(capsys, out: Path, *args: str) -> tuple[int, str]:
    return run_main(capsys, "data", "build", "synthetic", "--out", str(out), "--progress", "false", *args)


def keys_in(path: Path) -> list[str]:
    return [s["__key__"] for s in wds.tarfile_samples([{"url": str(path)}])]


# -- 1. `data build` into a folder that holds another data set ------------------------------------------


def test_build_refuses_a_folder_holding_another_data_set_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "s"
    assert build(capsys, out, "--samples", "20", "--samples_per_shard", "10", "--seed", "1")[0] == 0
    before = snapshot(out)
    code, err = build(capsys, out, "--samples", "10", "--samples_per_shard", "10", "--seed", "2")
    line = last_line(err)
    assert code == 2 and line.startswith("error: ") and "Traceback" not in err
    assert str(out) in line and "dataset.json" in line
    assert "other arguments" in line and "--overwrite" in line
    assert snapshot(out) == before  # nothing touched: the old index and both shards are byte-identical

    code, err = build(capsys, out, "--samples", "10", "--samples_per_shard", "10", "--seed", "2", "--overwrite")
    assert code == 0, err
    index = json.loads((out / "dataset.json").read_text())
    assert index["args"]["seed"] == 2 and sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar"]


def test_build_refuses_a_folder_with_tar_files_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "train-000003.tar").write_bytes(b"the user's own shard" * 100)
    (out / "photos.tar").write_bytes(b"an archive" * 100)
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    code, err = build(capsys, out, "--samples", "10", "--samples_per_shard", "10")
    line = last_line(err)
    assert (
        code == 2
        and line.startswith("error: ")
        and "photos.tar" in line
        and "train-000003.tar" in line
        and "--overwrite" in line
    )
    assert snapshot(out) == before

    code, err = build(capsys, out, "--samples", "10", "--samples_per_shard", "10", "--overwrite")
    assert code == 0, err
    # --overwrite replaces this recipe's shard names; a file it does not recognise stays.
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "notes.txt", "photos.tar", "train-000000.tar"]
    assert (out / "photos.tar").read_bytes() == before["photos.tar"]


def test_an_unfinished_build_with_other_arguments_is_not_replaced_unasked(tmp_path, capsys):
    out = tmp_path / "s"
    SyntheticRecipe(samples=30, samples_per_shard=10, seed=1).build(out, progress=False)
    (out / "dataset.json").rename(out / "dataset.json.partial")  # as if interrupted after the last shard
    before = snapshot(out)
    code, err = build(capsys, out, "--samples", "30", "--samples_per_shard", "10", "--seed", "2")
    line = last_line(err)
    assert code == 2 and "dataset.json.partial" in line and "unfinished" in line and "--overwrite" in line
    assert snapshot(out) == before
    # The same arguments resume it: the finished shards are kept, not rewritten.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    code, err = build(capsys, out, "--samples", "30", "--samples_per_shard", "10", "--seed", "1")
    assert code == 0, err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes


def test_an_interrupted_build_of_the_same_arguments_still_resumes(tmp_path, capsys):
    """Killed after shard 1 was renamed into place but before the list of finished shards named it:
    the same build resumes (shard 0 kept), and the finished folder is the clean build's."""
    out = tmp_path / "s"
    args = dict(samples=30, samples_per_shard=10, seed=4)
    index = SyntheticRecipe(**args).build(out, progress=False)
    partial = {k: index[k] for k in ("format", "recipe", "args")} | {"shards": index["shards"][:1], "bad": []}
    (out / "dataset.json.partial").write_text(json.dumps(partial))
    (out / "dataset.json").unlink()
    (out / "train-000002.tar").unlink()
    kept = (out / "train-000000.tar").stat().st_mtime_ns
    code, err = build(capsys, out, "--samples", "30", "--samples_per_shard", "10", "--seed", "4")
    assert code == 0, err
    assert (out / "train-000000.tar").stat().st_mtime_ns == kept
    assert json.loads((out / "dataset.json").read_text()) == SyntheticRecipe(**args).build(
        tmp_path / "clean", progress=False
    )
    # A finished build run again with the same arguments is fine too.
    assert build(capsys, out, "--samples", "30", "--samples_per_shard", "10", "--seed", "4")[0] == 0


def test_data_prepare_refuses_another_data_set_unless_its_entry_says_overwrite(tmp_path):
    """`data.prepare` names its folder as the recipe's output: an earlier build of that recipe is rebuilt when
    the arguments change (tests/test_datamodule.py), but another recipe's data set or tar files it did not
    write are refused unless the entry says `overwrite: true`."""
    out = tmp_path / "prepared"
    src = tmp_path / "chat.jsonl"
    src.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]})
        + "\n"
    )
    from data_recipes.chat import ChatRecipe

    ChatRecipe(src=str(src)).build(out, progress=False)
    (out / "photos.tar").write_bytes(b"an archive" * 100)
    before = snapshot(out)
    run = RecipeRun(recipe="synthetic", out=str(out), args={"samples": 10, "samples_per_shard": 10, "seed": 9})
    with pytest.raises(
        ConfigError,
        match=(
            r"data\.prepare \(synthetic\): .*data set of the 'chat' recipe \(dataset\.json, 1 shard\(s\)\) "
            r"and 1 tar file\(s\) this build did not write \(photos\.tar\).*overwrite: true"
        ),
    ):
        run.run()
    assert snapshot(out) == before
    RecipeRun(
        recipe="synthetic", out=str(out), args={"samples": 10, "samples_per_shard": 10, "seed": 9}, overwrite=True
    ).run()
    assert json.loads((out / "dataset.json").read_text())["args"]["seed"] == 9
    assert (out / "photos.tar").read_bytes() == before["photos.tar"]
    # Already built with these arguments: nothing is rebuilt.
    mtime = (out / "train-000000.tar").stat().st_mtime_ns
    run.run()
    assert (out / "train-000000.tar").stat().st_mtime_ns == mtime


# -- 2. a shard truncated at a 512-byte boundary (an interrupted copy) ------------------------------------


@pytest.fixture
def truncated(tmp_path) -> tuple[Path, Path, int, int, int]:
    """4 shards of 10; shard 1 cut to half its size at a 512-byte boundary. Returns the folder, the shard,
    its size in the index, its size now, and how many of its samples are still complete."""
    out = tmp_path / "shards"
    SyntheticRecipe(samples=40, samples_per_shard=10, seed=2).build(out, progress=False)
    shard = out / "train-000001.tar"
    size = shard.stat().st_size
    cut = size // 2 // 512 * 512
    os.truncate(shard, cut)
    complete = 0
    for raw in wds.tarfile_samples([{"url": str(shard)}]):
        complete += "json" in raw and "png" in str(sorted(raw))
    assert 0 < complete < 10
    return out, shard, size, cut, complete


def test_inspect_fails_on_a_truncated_shard_naming_it_and_both_sizes(truncated, tmp_path, capsys):
    out, shard, size, cut, complete = truncated
    code, stdout, err = run_cli(
        capsys, "data", "inspect", str(out), "--no-progress", "--json", str(tmp_path / "r.json")
    )
    assert code == 2
    line = last_line(err)
    assert line.startswith("error: ") and "train-000001.tar" in line and str(size) in line and str(cut) in line
    assert "no sample would be dropped" not in stdout
    assert "train-000001.tar" in stdout and f"{cut} bytes" in stdout and f"{size}" in stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["samples_read"] < 40
    # Every sample the index promises is accounted for: read, or counted as dropped.
    assert report["usable"] + sum(report["skipped"].values()) == 40
    assert report["skipped"]["damaged_shard"] >= 10 - complete - 1
    (problem,) = report["damaged_shards"]
    assert "train-000001.tar" in problem and str(size) in problem and str(cut) in problem


def test_fit_refuses_a_truncated_shard_unless_allowed(truncated, tiny_model_dirs, tmp_path, capsys, caplog):
    out, shard, size, cut, _ = truncated
    config = demo_config(tmp_path, tiny_model_dirs["llava"], "llava", steps=2)
    common = ("fit", "--config", str(config), "--data.prepare", "[]", "--data.train", str(out), "--data.val", "null")
    code, err = run_main(capsys, *common)
    line = last_line(err)
    assert code == 2 and line.startswith("error: data.train: ") and "Traceback" not in err
    assert str(shard) in line and str(size) in line and str(cut) in line and "data.allow_damaged_shards" in line
    assert not (tmp_path / "checkpoints").exists()

    with caplog.at_level("WARNING", logger="mmpeft.data"):
        code, err = run_main(capsys, *common, "--data.allow_damaged_shards", "true")
    assert code == 0, err[-3000:]
    assert (
        f"data.train: shard {shard} is {cut} bytes, but {out / 'dataset.json'} records {size} bytes; "
        "reading what is left" in caplog.text
    )


def test_an_allowed_damaged_shard_counts_its_lost_samples_as_skipped(truncated, tiny_model_dirs, caplog):
    out, shard, size, cut, complete = truncated
    dm = ShardDataModule(
        train=str(out), processor=tiny_model_dirs["llava"], batch_size=4, max_length=256, shuffle_buffer=1
    )
    with pytest.raises(DataError, match=rf"data\.train: shard {shard} is {cut} bytes, .*records {size} bytes"):
        dm.setup("fit")
    dm = ShardDataModule(
        train=str(out),
        processor=tiny_model_dirs["llava"],
        batch_size=4,
        max_length=256,
        shuffle_buffer=1,
        allow_damaged_shards=True,
    )
    with caplog.at_level("WARNING", logger="mmpeft.data"):
        dm.setup("fit")
        batches = list(dm.train_dataloader())
    keys = [k for b in batches for k in b["keys"]]
    skipped = Counter()
    for b in batches:
        skipped.update(b["skipped"])
    assert len(keys) + sum(skipped.values()) == 40  # every sample of the index: trained on, or counted as skipped
    assert skipped["damaged_shard"] >= 10 - complete - 1 and str(shard) in caplog.text


# -- 3. a source that gives no sample --------------------------------------------------------------------


RECORD = {"id": "r1", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}


def test_a_one_line_json_object_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "llava_instruct.json"
    src.write_text(json.dumps({"data": [RECORD, RECORD]}) + "\n")
    out = tmp_path / "out"
    code, err = run_main(capsys, "data", "build", "llava", "--src", str(src), "--out", str(out), "--progress", "false")
    line = last_line(err)
    assert code == 2 and line.startswith("error: ") and str(src) in line and "Traceback" not in err
    assert "none of its 1 record(s) became a sample" in line and "bad_record" in line and "JSON list" in line
    assert not out.exists() or not any(out.iterdir())  # no empty shard, no index


@pytest.mark.parametrize(
    ("recipe", "records", "reason"),
    [
        ("llava", [dict(RECORD, image="gone.jpg"), dict(RECORD, id="r2", image="gone2.jpg")], "missing_image"),
        ("vision_flan", [{"task_name": "t", "instruction": "Say hi", "output": ""}], "bad_record"),
        ("chat", [{"messages": [{"role": "user", "content": "Hi?"}]}], "no_assistant_turn"),
    ],
)
def test_no_good_sample_from_a_non_empty_source_is_an_error(tmp_path, capsys, recipe, records, reason):
    src = tmp_path / "records.json"
    src.write_text(json.dumps(records))
    out = tmp_path / "out"
    code, err = run_main(capsys, "data", "build", recipe, "--src", str(src), "--out", str(out), "--progress", "false")
    line = last_line(err)
    assert (
        code == 2
        and line.startswith("error: ")
        and str(src) in line
        and reason in line
        and f"{len(records)} record" in line
    )
    assert not out.exists() or not any(out.iterdir())


@dataclass(kw_only=True)
class _AllBad(ShardRecipe):
    name: ClassVar[str] = "all_bad"

    def __len__(self) -> int:
        return 3

    def record(self, index: int) -> Record:
        raise BadRecord("bad_image", f"image {index} is broken")


def test_no_good_sample_is_an_error_for_any_recipe(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(
        DataError,
        match=(
            r"all_bad: none of its 3 record\(s\) became a sample: "
            r"bad_image 3 \(e\.g\. 0: bad_image: image 0 is broken\)"
        ),
    ):
        _AllBad(samples_per_shard=2).build(tmp_path / "out", progress=False)
    assert list((tmp_path / "out").iterdir()) == []


# -- 4. a broken shard is named in words, not as a Python tuple ------------------------------------------


def test_a_broken_shard_is_reported_as_a_readable_line(tmp_path, tiny_model_dirs, capsys, caplog):
    out = tmp_path / "mixed"
    SyntheticRecipe(samples=8, samples_per_shard=8, seed=1).build(out, progress=False)
    broken = tmp_path / "mixed" / "zz-000000.tar"
    broken.write_bytes(b"this is not a tar file " * 40)
    code, stdout, err = run_cli(capsys, "data", "inspect", f"{out}/*.tar", "--no-progress")
    assert code == 2
    problem = next(line for line in stdout.splitlines() if "zz-000000.tar" in line)
    assert problem.startswith("unreadable shard: ") and "not a tar file" in problem
    assert "BufferedReader" not in stdout + err and "('" not in problem
    assert "zz-000000.tar" in last_line(err)

    dm = ShardDataModule(
        train=f"{out}/*.tar",
        processor=tiny_model_dirs["llava"],
        tasks=sorted(SyntheticRecipe().tasks),
        batch_size=4,
        shuffle_buffer=1,
    )
    dm.setup("fit")
    with caplog.at_level("WARNING", logger="mmpeft.data"):
        batches = list(dm.train_dataloader())
    assert sum(b["skipped"].get("bad_shard", 0) for b in batches) == 1
    (warning,) = [r.getMessage() for r in caplog.records if "zz-000000.tar" in r.getMessage()]
    assert f"{broken}: not a tar file" in warning and "BufferedReader" not in warning and "('" not in warning


def test_predict_and_merge_name_a_broken_shard_in_words(tmp_path, tiny_model_dirs):
    from mmpeft.data.encode import ChatEncoder
    from mmpeft.data.predict import PromptStream
    from mmpeft.data.stream import Shard, Source
    from mmpeft.merge import task_batches
    from mmpeft.models.backbone import load_processor

    broken = tmp_path / "zz-000000.tar"
    broken.write_bytes(b"this is not a tar file " * 40)
    processor = load_processor(tiny_model_dirs["llava"])
    stream = PromptStream(
        [Source(str(broken), (Shard(str(broken)),))], ChatEncoder(processor, ["color"], 256), 2, rank=0, world=1
    )
    with pytest.raises(DataError) as caught:
        list(stream)
    assert str(caught.value) == f"shard {broken} cannot be read: not a tar file, or a damaged one (invalid header)"
    with pytest.raises(DataError) as caught:
        task_batches(str(broken), processor, ["color"], None, 4, 2, 256)
    assert (
        str(caught.value)
        == f"--data {str(broken)!r}: cannot read a shard: {broken}: not a tar file, or a damaged one (invalid header)"
    )


# ----------------------------------------------------------------------------------------------
# Outputs: never over an input, base paths that work from anywhere, file modes, sorted PEFT targets,
# one spelling per flag
# ----------------------------------------------------------------------------------------------


TASKS = ["color", "shape"]
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def digest(path: Path) -> dict[str, str]:
    """Every file and folder under ``path`` (or ``path`` itself, a file) with its content's hash: equal means
    byte-identical."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    entries = {}
    for p in sorted(path.rglob("*")):
        entries[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return entries


@pytest.fixture(scope="module")
def trained(tiny_model_dirs) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    """A LoRA on the tiny LLaVA's attention with random nonzero tensors, as training would save it."""
    base = tiny_model_dirs["llava"]
    model = load_backbone(Backbone(base, quantization="none"), torch.device("cpu"))
    groups = [AdapterGroup("lora", ["attention"], LORA)]
    inject_adapters(language_model(model), groups, RoutingContext())
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapter." in name:
                param.normal_(0, 0.1)
    return AdapterSpec(groups, base, base_summary(model.config), TASKS).resolved(), trainable_tensors(model)


@pytest.fixture
def workspace(tmp_path, tiny_model_dirs, trained) -> dict[str, Path]:
    """A private copy of the base (the tests try to overwrite it), an adapter naming it, and shards."""
    base = tmp_path / "models" / "base"
    shutil.copytree(tiny_model_dirs["llava"], base)
    spec, tensors = trained
    adapter = save_adapter(tmp_path / "runs" / "adapter", dataclasses.replace(spec, base_model=str(base)), tensors)
    shards = tmp_path / "shards"
    SyntheticRecipe(samples=8, samples_per_shard=4, tasks=tuple(TASKS), seed=0).build(shards, progress=False)
    return {"base": base, "adapter": adapter, "shards": shards, "models": base.parent, "runs": adapter.parent}


# -- 1. an output over an input is refused --------------------------------------------------------

OVER_INPUTS = {
    # tool, the input, where --out points (relative to the workspace's paths)
    "merge-into-the-base": ("merge", "base", "base"),
    "merge-inside-the-base": ("merge", "base", "base/merged"),
    "merge-over-the-base's-parent": ("merge", "base", "models"),
    "merge-over-the-data": ("merge", "shards", "shards"),
    "export-into-the-adapter": ("export", "adapter", "adapter"),
    "export-inside-the-adapter": ("export", "adapter", "adapter/peft"),
    "export-over-the-adapter's-parent": ("export", "adapter", "runs"),
    "export-into-the-base": ("export", "base", "base"),
}


@pytest.mark.parametrize("case", list(OVER_INPUTS))
def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused(capsys, workspace, case):
    tool, what, where = OVER_INPUTS[case]
    first, _, rest = where.partition("/")
    out = workspace[first] / rest if rest else workspace[first]
    before = {name: digest(path) for name, path in workspace.items()}
    extra = ["--format", "peft"] if tool == "export" else ["--dtype", "fp32"]
    code, err = run_main(
        capsys,
        tool,
        *extra,
        "--adapter",
        str(workspace["adapter"]),
        "--out",
        str(out),
        "--quantization",
        "none",
        "--data",
        str(workspace["shards"]),
    )
    assert code == 2, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: --out ") and str(out) in line and str(workspace[what]) in line, line
    assert {name: digest(path) for name, path in workspace.items()} == before  # every input byte-identical
    assert not (workspace["base"] / "merged").exists() and not (workspace["adapter"] / "peft").exists()


def test_merge_and_export_beside_their_inputs_still_write(capsys, workspace):
    before = {name: digest(path) for name, path in workspace.items()}
    out = workspace["models"] / "peft"  # a sibling of the base: nothing of it is replaced
    code, err = run_main(
        capsys, "export", "--format", "peft", "--adapter", str(workspace["adapter"]), "--out", str(out)
    )
    assert code == 0, err[-2000:]
    assert (out / "adapter_model.safetensors").is_file()
    assert {name: digest(path) for name, path in workspace.items() if name != "models"} == {
        k: v for k, v in before.items() if k != "models"
    }


def tensorboard_run(run_dir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(run_dir)) as writer:
        for step in range(3):
            writer.add_scalar("train/loss", 3.0 - step, step)
    (run_dir / "config.yaml").write_text("trainer:\n  max_steps: 3\n")


@pytest.mark.parametrize("where", ["config.yaml", "events", "parent"])
def test_report_refuses_to_write_over_the_run_it_reads(capsys, tmp_path, where):
    run_dir = tmp_path / "runs" / "demo" / "version_0"
    tensorboard_run(run_dir)
    events = next(run_dir.glob("events.out.tfevents.*"))
    out = {"config.yaml": run_dir / "config.yaml", "events": events, "parent": run_dir.parent}[where]
    before = digest(tmp_path / "runs")
    code, err = run_main(capsys, "report", str(run_dir), "--out", str(out))
    assert code == 2, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: --out ") and str(out) in line, line
    assert str(run_dir / "config.yaml") in line or str(events) in line, line
    assert digest(tmp_path / "runs") == before
    # Its own file beside the run's is fine.
    code, err = run_main(capsys, "report", str(run_dir), "--out", str(run_dir / "report.html"))
    assert code == 0, err[-2000:]
    assert (run_dir / "report.html").read_text().startswith("<!doctype html>")


# -- 2. the base named by an adapter works from any folder ----------------------------------------


def test_an_adapter_saved_with_a_relative_base_loads_from_another_folder(
    capsys, monkeypatch, tmp_path, tiny_model_dirs, trained
):
    training = tmp_path / "project"
    shutil.copytree(tiny_model_dirs["llava"], training / ".cache" / "mmpeft" / "tiny-llava")
    spec, tensors = trained
    monkeypatch.chdir(training)  # fit ran here, with model.backbone.pretrained relative to it
    save_adapter(
        "runs/demo/version_0/adapter", dataclasses.replace(spec, base_model=".cache/mmpeft/tiny-llava"), tensors
    )
    save_adapter("hub-adapter", dataclasses.replace(spec, base_model="llava-hf/llava-1.5-7b-hf"), tensors)
    recorded = json.loads((training / "runs/demo/version_0/adapter/adapter_config.json").read_text())["base_model"][
        "name_or_path"
    ]
    assert recorded == str(training / ".cache" / "mmpeft" / "tiny-llava")  # absolute
    assert (
        json.loads((training / "hub-adapter/adapter_config.json").read_text())["base_model"]["name_or_path"]
        == "llava-hf/llava-1.5-7b-hf"
    )

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    adapter = str(training / "runs/demo/version_0/adapter")
    code, err = run_main(capsys, "export", "--format", "peft", "--adapter", adapter, "--out", "peft")
    assert code == 0, err[-2000:]
    assert json.loads((elsewhere / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == recorded


@pytest.mark.parametrize("recorded", [".cache/mmpeft/tiny-llava", "models/tiny-llava"])
def test_an_old_adapter_with_a_relative_base_says_which_path_was_tried(
    capsys, monkeypatch, tmp_path, trained, recorded
):
    spec, tensors = trained
    adapter = save_adapter(tmp_path / "adapter", spec, tensors)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model"]["name_or_path"] = recorded  # what mmpeft wrote before it stored absolute paths
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    for tool, extra in (("merge", []), ("export", ["--format", "peft"])):
        code, err = run_main(capsys, tool, *extra, "--adapter", str(adapter), "--out", str(tmp_path / "out"))
        assert code == 2, err[-2000:]
        line = err.strip().splitlines()[-1]
        assert f"{recorded!r}" in line and str(tmp_path / recorded) in line, line  # the recorded path and the one tried
        assert "relative to the folder training ran in" in line and "--base" in line, line
        assert not (tmp_path / "out").exists()


# -- 3. and 4. the files written: modes, a deterministic adapter_config.json ----------------------


@pytest.fixture
def usual_umask():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def test_every_written_file_has_the_umasks_mode(capsys, tmp_path, workspace, usual_umask):
    adapter = save_adapter(tmp_path / "adapter", *_spec_and_tensors(workspace))
    out = {"adapter": adapter, "peft": tmp_path / "peft", "merged": tmp_path / "merged", "tiny": tmp_path / "tiny"}
    common = ["--adapter", str(adapter), "--quantization", "none"]
    assert run_main(capsys, "export", "--format", "peft", *common, "--out", str(out["peft"]))[0] == 0
    assert run_main(capsys, "merge", *common, "--dtype", "fp32", "--out", str(out["merged"]))[0] == 0
    assert run_main(capsys, "tiny-model", "--family", "llava", "--out", str(out["tiny"]))[0] == 0
    modes = {
        f"{name}/{p.name}": oct(stat.S_IMODE(p.stat().st_mode))
        for name, folder in out.items()
        for p in folder.iterdir()
    }
    assert {
        "adapter/adapter.safetensors",
        "peft/adapter_model.safetensors",
        "merged/model.safetensors",
        "tiny/model.safetensors",
    } <= set(modes)
    assert modes == dict.fromkeys(modes, oct(usual_umask))
    assert {oct(stat.S_IMODE(folder.stat().st_mode)) for folder in out.values()} == {"0o755"}


def _spec_and_tensors(workspace: dict[str, Path]) -> tuple[AdapterSpec, dict]:
    from mmpeft.saving import read_spec, read_tensors

    return read_spec(workspace["adapter"]), read_tensors(workspace["adapter"])


def test_export_writes_target_modules_sorted(capsys, tmp_path, workspace):
    out = tmp_path / "peft"
    code, err = run_main(
        capsys, "export", "--format", "peft", "--adapter", str(workspace["adapter"]), "--out", str(out)
    )
    assert code == 0, err[-2000:]
    modules = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert len(modules) == 2 * 4 and modules == sorted(modules)  # q, k, v, o of 2 layers, in one order on every run


# -- 5. one spelling of every flag in --help, both accepted ---------------------------------------


@pytest.mark.parametrize("spelling", ["--batch-size", "--batch_size"])
@pytest.mark.parametrize("tool", ["merge", "export"])
def test_merge_and_export_take_both_spellings(capsys, tmp_path, tool, spelling):
    extra = ["--format", "peft"] if tool == "export" else []
    code, err = run_main(
        capsys,
        tool,
        *extra,
        "--adapter",
        str(tmp_path / "a"),
        "--out",
        str(tmp_path / "o"),
        spelling,
        "0",
        "--max_length",
        "64",
    )
    assert (
        code == 2 and err.strip().splitlines()[-1] == "error: --samples and --batch-size must be >= 1, got 64 and 0"
    ), err[-2000:]


@pytest.mark.parametrize(
    ("command", "shown", "hidden"),
    [
        (
            ["merge"],
            ["--batch-size", "--max-length", "--double-quant", "--merge-into", "--trust-remote-code"],
            ["--batch_size", "--max_length"],
        ),
        (["export"], ["--batch-size", "--max-length"], ["--batch_size", "--max_length"]),
        (
            ["data", "inspect"],
            ["--max-length", "--trust-remote-code", "--no-progress"],
            ["--max_length", "--trust_remote_code"],
        ),
        (
            ["data", "build", "synthetic"],
            ["--samples-per-shard", "--image-size"],
            ["--samples_per_shard", "--image_size"],
        ),
        (
            ["data", "build", "llava"],
            ["--samples-per-shard", "--task-map", "--task-field"],
            ["--samples_per_shard", "--task_map", "--task_field"],
        ),
        (["report"], ["--out"], []),
        (["tiny-model"], ["--family", "--out"], []),
    ],
)
def test_help_shows_each_flag_with_dashes_only(capsys, command, shown, hidden):
    code, out, err = run_cli(capsys, *command, "--help")
    assert code == 0, err
    assert all(flag in out for flag in shown), out
    assert not [flag for flag in hidden if flag in out], out


@pytest.mark.parametrize(
    "spelling", [["--samples-per-shard", "4", "--image-size", "24"], ["--samples_per_shard", "4", "--image_size", "24"]]
)
def test_data_build_and_inspect_take_both_spellings(capsys, tmp_path, spelling):
    out = tmp_path / "shards"
    code, err = run_main(
        capsys, "data", "build", "synthetic", "--out", str(out), "--samples", "8", *spelling, "--progress", "false"
    )
    assert code == 0, err[-2000:]
    index = json.loads((out / "dataset.json").read_text())
    assert len(index["shards"]) == 2 and index["args"]["samples_per_shard"] == 4 and index["args"]["image_size"] == 24
    for flags in (["--max-length", "64", "--trust-remote-code"], ["--max_length", "64", "--trust_remote_code"]):
        code, out_text, err = run_cli(capsys, "data", "inspect", str(out), *flags, "--no-progress")
        assert code == 0, err[-2000:]
        assert "8 samples read" in " ".join(out_text.split())


# ----------------------------------------------------------------------------------------------
# Task names: any name in figures, TensorBoard and the report; evaluation on tasks an adapter never saw
# ----------------------------------------------------------------------------------------------


NAMES = ["a/b", "a$_$b", "x y", "zählen-ζ", "<i>|&"]
"""Task names that broke something: a slash (tag parsing), dollars (matplotlib mathtext), a space, non-ASCII, HTML and
Markdown."""


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def build_shards(capsys, folder: Path, tasks: list[str], per_task: int = 2) -> Path:
    """Chat shards (built by the chat recipe, through the CLI) with ``per_task`` samples of each task."""
    src = folder / "src"
    src.mkdir(parents=True)
    lines = []
    for t, task in enumerate(tasks):
        for n in range(per_task):
            name = f"img{t}-{n}.png"
            Image.new("RGB", (32, 32), (40 * t % 255, 60 * n % 255, 200)).save(src / name)
            messages = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"What is sample {n}?"}]},
                {"role": "assistant", "content": f"answer {t} {n}"},
            ]
            lines.append(json.dumps({"id": f"r{t}x{n}", "task": task, "images": [name], "messages": messages}))
    (src / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = folder / "shards"
    code, _, err = run_cli(
        capsys, "data", "build", "chat", "--src", str(src / "chats.jsonl"), "--out", str(out), "--progress", "false"
    )
    assert code == 0, err
    assert sorted(json.loads((out / "dataset.json").read_text(encoding="utf-8"))["tasks"]) == sorted(tasks)
    return out


CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  precision: 32-true
  max_steps: {steps}
  val_check_interval: {steps}
  check_val_every_n_epoch: null
  limit_val_batches: 20
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  default_root_dir: {root}
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {root}/runs, name: fit}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{dirpath: {root}/checkpoints, save_last: true, every_n_train_steps: {steps}}}
model:
  backbone: {{pretrained: {base}}}
  adapters: {adapters}
  optim: {{lr: 1.0e-3, warmup: 0}}
  evaluation: {{max_new_tokens: 2}}
data:
  train: {train}
  val: {val}
  batch_size: 2
  max_length: 4096
  max_skip_fraction: 0.0
"""
LORA_AND_ASYMLORA = (
    "[{name: lora, targets: [attention], config: {r: 4}}, {name: asymlora, targets: [mlp], config: {r: 4, heads: 2}}]"
)


def write_config(
    root: Path, base: str, train: Path, val: Path, steps: int = 2, adapters: str = LORA_AND_ASYMLORA
) -> Path:
    path = root / "fit.yaml"
    path.write_text(
        CONFIG.format(root=root, base=base, train=train, val=val, steps=steps, adapters=adapters), encoding="utf-8"
    )
    return path


def event_tags(run: Path) -> dict[str, list[str]]:
    (events,) = run.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator.Tags()


class Cells(HTMLParser):
    """The text of every table cell of a page, by row, and the number of images."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.images: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs)["alt"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join(self._cell))
            self._cell = None


# -- 1. any task name in the figures -------------------------------------------------------------
def test_figures_draw_any_task_name_as_it_is():
    """Dollars are matplotlib's mathtext markers: a name like ``a$_$b`` crashed the heatmap and the report's charts."""
    import matplotlib
    from matplotlib.text import Text

    heatmap = plots.heatmap(np.array([[0.5, 0.5]] * len(NAMES)), NAMES, "g$roup: mean gate of each task's tokens")
    assert plots.rgb(heatmap).shape[:2] == plots.heatmap_size(NAMES, 2)[::-1]
    assert [label.get_text() for label in heatmap.axes[0].get_yticklabels()] == NAMES
    texts = heatmap.findobj(Text)
    assert NAMES[1] in [t.get_text() for t in texts] and not any(
        t.get_parse_math() or t.get_usetex() for t in texts
    )  # drawn as it is
    chart = plots.line_chart({name: ([0, 1], [1.0, 0.5]) for name in NAMES}, "loss of $x$", "$")
    assert Image.open(io.BytesIO(plots.png(chart))).size == (700, 360)
    # Nor is it TeX where the user's matplotlibrc asks for it (this machine has no LaTeX: TeX would fail).
    with matplotlib.rc_context({"text.usetex": True}):
        assert Image.open(
            io.BytesIO(plots.png(plots.heatmap(np.eye(2), ["a_b", "50%"], "#1 & more")))
        ).size == plots.heatmap_size(["a_b", "50%"], 2)


def test_task_expert_table_keeps_every_name_in_its_own_cell():
    """TensorBoard renders the monitor's table as Markdown: a ``|`` split a row, ``_``/``*`` became emphasis, ``<i>``
    HTML."""
    import torch
    from tensorboard import plugin_util

    from mmpeft.monitor import task_expert_table

    page = plugin_util.markdown_to_safe_html(task_expert_table(torch.tensor([[0.25, 0.75]] * len(NAMES)), NAMES))
    parser = Cells()
    parser.feed(page)
    header, *rows = parser.rows
    assert header == ["task", "expert 0", "expert 1"]
    assert rows == [[name, "0.2500", "0.7500"] for name in NAMES]


def test_report_finds_tasks_whose_names_hold_a_slash():
    """Tags are ``val/<task>/<metric>`` and ``train/loss/<task>``: the task is everything between the prefix and the
    metric."""
    run = Run(Path("."))
    for i, name in enumerate(NAMES):
        run.scalars[f"train/loss/{name}"] = [(1, 2.0 + i)]
        run.scalars[f"val/{name}/loss"] = [(2, 3.0 + i)]
        run.scalars[f"val/{name}/exact_match"] = [(2, 0.5)]
    run.scalars["val/loss"] = [(2, 5.0)]
    tasks, metrics, cells = task_table(run)
    assert tasks == sorted(NAMES) + ["all tasks"]
    assert metrics == ["train loss", "loss", "exact_match"]
    assert cells[("a/b", "loss")] == [(2, 3.0)] and cells[("a/b", "train loss")] == [(1, 2.0)]
    assert cells[("all tasks", "loss")] == [(2, 5.0)]


def test_score_table_prints_any_task_name_as_it_is():
    """``validate``/``test`` print a rich table: a task name is text, not rich markup (``[/x]`` raised, ``[b]y`` lost
    its brackets)."""
    from rich.console import Console

    from mmpeft.metrics import Results

    names = [*NAMES, "[/x]", "[b]y"]
    results = Results(
        {name: {"samples": 1.0, "loss": float(i)} for i, name in enumerate(names)}, {"samples": 7.0, "loss": 3.0}
    )
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(results.table("validation: [/scores] per task"))
    text = console.export_text()
    rows = [line.split("│")[1].strip() for line in text.splitlines() if line.count("│") == 4]
    assert rows == [*names, "mean"]
    assert "validation: [/scores] per task" in text
    assert {f"val/{name}/loss" for name in names} <= set(results.scalars("val"))


# -- 1 and 2 through the CLI: fit (LoRA and AsymLoRA), TensorBoard, report ------------------------
@pytest.mark.slow
def test_any_task_name_works_in_fit_tensorboard_and_report(tiny_model_dirs, tmp_path, capsys):
    shards = build_shards(capsys, tmp_path / "data", NAMES)
    config = write_config(
        tmp_path, tiny_model_dirs["llava"], shards, shards, steps=5
    )  # 5 batches of 2: every sample trained on
    code, _, err = run_cli(capsys, "fit", "--config", str(config))
    assert code == 0, err[-3000:]
    run = tmp_path / "runs" / "fit" / "version_0"
    assert (run / "adapter" / "adapter.safetensors").is_file()

    tags = event_tags(run)
    for name in NAMES:  # every task's tags, its name as it is
        assert {f"val/{name}/loss", f"val/{name}/token_accuracy", f"train/loss/{name}"} <= set(tags["scalars"]), name
    (heatmap,) = [tag for tag in tags["images"] if tag.endswith("/task_expert")]

    code, out, err = run_cli(capsys, "report", str(run))
    assert code == 0, err[-3000:]
    page = (run / "report.html").read_text(encoding="utf-8")
    parser = Cells()
    parser.feed(page)
    header, *rows = [row for row in parser.rows if row]
    assert header[:3] == ["task", "train loss", "loss"]
    assert sorted(row[0] for row in rows) == sorted([*NAMES, "all tasks"])  # every task has its row
    assert all(row[1] and row[2] for row in rows if row[0] != "all tasks")  # with its train loss and val loss
    for name in NAMES:
        assert f"<td>{html.escape(name)}</td>" in page  # escaped once, in its cell
    assert "<i>|&" not in page
    # The charts: losses, per-task training losses, auxiliary losses, the heatmap, router entropy.
    assert {"loss", "training loss per task", "asymlora task x expert", "router entropy / log(experts)"} <= set(
        parser.images
    ), parser.images
    assert heatmap == "routing/asymlora/task_expert"


# -- 3. evaluation scores tasks the adapter never saw ---------------------------------------------
@pytest.mark.slow
def test_evaluation_scores_tasks_the_adapter_never_saw_and_the_resume_advice_works(tiny_model_dirs, tmp_path, capsys):
    base = tiny_model_dirs["llava"]
    old = build_shards(capsys, tmp_path / "old", ["color", "shape"])
    new = build_shards(capsys, tmp_path / "new", ["ocr", "a/b c"])
    config = write_config(
        tmp_path, base, old, old, steps=1, adapters="[{name: asymlora, targets: [mlp], config: {r: 4, heads: 2}}]"
    )
    code, _, err = run_cli(capsys, "fit", "--config", str(config), "--trainer.limit_val_batches", "0")
    assert code == 0, err[-3000:]
    adapter = tmp_path / "runs" / "fit" / "version_0" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["tasks"] == ["color", "shape"]

    # validate and test: every task of the data is scored, with or without data.tasks; so with a checkpoint.
    runs = [
        ("validate", "--model.init_adapter", str(adapter), "--data.val", str(new)),
        ("validate", "--model.init_adapter", str(adapter), "--data.val", str(new), "--data.tasks", "[ocr, a/b c]"),
        ("test", "--model.init_adapter", str(adapter), "--data.test", str(new)),
        ("validate", "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt"), "--data.val", str(new)),
    ]
    for command, *args in runs:
        code, out, err = run_cli(capsys, command, "--config", str(config), *args)
        assert code == 0, (command, args, err[-3000:])
        table = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 3}
        assert {"ocr", "a/b c", "mean"} <= set(table), out  # a row per task of the data
        assert not {"color", "shape"} & set(table), out

    # predict answers them too (generation uses no task id).
    answers = tmp_path / "answers.jsonl"
    code, _, err = run_cli(
        capsys,
        "predict",
        "--config",
        str(config),
        "--model.init_adapter",
        str(adapter),
        "--data.predict",
        str(new),
        "--predictions.output",
        str(answers),
        "--model.generation.max_new_tokens",
        "2",
    )
    assert code == 0, err[-3000:]
    assert sorted(json.loads(line)["task"] for line in answers.read_text().splitlines()) == [
        "a/b c",
        "a/b c",
        "ocr",
        "ocr",
    ]

    # Training on from the adapter keeps its task ids: a task it lacks is refused, with advice that works.
    args = (
        "fit",
        "--config",
        str(config),
        "--model.init_adapter",
        str(adapter),
        "--data.train",
        str(new),
        "--data.val",
        str(new),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.default_root_dir",
        str(tmp_path / "more"),
    )
    code, _, err = run_cli(capsys, *args)
    line = error_line(err)
    assert code == 2 and "['color', 'shape']" in line and "['a/b c', 'ocr']" in line, line
    advice = re.search(r"set data\.tasks to (\[[^]]*\])", line)
    assert advice, line
    assert json.loads(advice.group(1)) == ["color", "shape", "a/b c", "ocr"]  # the old ids kept, the new appended
    code, _, err = run_cli(capsys, *args, "--data.tasks", "[ocr, a/b c, color, shape]")  # renumbers the adapter's tasks
    line = error_line(err)
    assert code == 2 and line.startswith(
        "error: data.tasks ['ocr', 'a/b c', 'color', 'shape'] changes the task ids of model.init_adapter"
    ), line
    assert (
        'set data.tasks to ["color", "shape", "ocr", "a/b c"]' in line
    )  # the adapter's tasks first, then the new in the order given
    code, _, err = run_cli(capsys, *args, "--data.tasks", advice.group(1))
    assert code == 0, err[-3000:]
    (adapter2,) = set((tmp_path / "runs" / "fit").glob("version_*/adapter")) - {adapter}
    assert json.loads((adapter2 / "adapter_config.json").read_text())["tasks"] == ["color", "shape", "a/b c", "ocr"]


# ----------------------------------------------------------------------------------------------
# The command line: progress, quiet output, run folders, summaries, one-line errors
# ----------------------------------------------------------------------------------------------


STEPS = 12
"""The first fit's length: validations and checkpoints after steps 6 and 12, a plain line every 5 steps (the demo's
log_every_n_steps)."""

NOISE = [
    "Failed to load CPU gemm_4bit_forward",
    "pip install kernels",
    "Skipping publisher trust check",
    "litlogger",
    "litmodels",
    "_pytree",
    "isinstance(treespec, LeafSpec)",
    "Loading weights",
]
"""Lines every command printed: bitsandbytes' CPU kernel message (and kernels' offline note), Lightning's tips, a
deprecation, transformers' loading bars."""

PLAIN = re.compile(
    r"^step (\d+)/(\d+)  loss (\d+\.\d+)  ([\d,]+) tokens/s  elapsed (\d+:\d\d:\d\d)  eta (\d+:\d\d:\d\d)$"
)


def noise_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(n in line for n in NOISE)]


def versions(root: Path) -> list[str]:
    folder = root / "runs" / "demo"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def scalar_steps(run_dir: Path, tag: str) -> list[int]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def first_fit(tmp_path_factory, tiny_model_dirs):
    """The demo config for 12 steps, run as a user would with its output going to a log file (a pipe)."""
    root = tmp_path_factory.mktemp("fit")
    config = demo_config(root, tiny_model_dirs["llava"], "llava", steps=STEPS)
    # A real warning, which must still show: evaluation metrics for a task the data does not have.
    result = mmpeft("fit", "--config", str(config), "--model.evaluation.metrics", "{nosuch: [exact_match]}")
    assert result.returncode == 0, result.stderr[-3000:]
    return root, config, result


# -- 1. the progress bar ---------------------------------------------------------------------------


@pytest.mark.slow
def test_fit_into_a_log_file_prints_a_plain_line_every_n_steps(first_fit):
    root, config, result = first_fit
    lines = [PLAIN.match(line) for line in result.stdout.splitlines() if line.startswith("step ")]
    assert all(lines), result.stdout
    assert [int(m.group(1)) for m in lines] == [5, 10, 12]  # every log_every_n_steps, and the last step
    assert {int(m.group(2)) for m in lines} == {STEPS}  # of trainer.max_steps
    assert all(float(m.group(3)) > 0 and int(m.group(4).replace(",", "")) > 0 for m in lines)
    assert lines[-1].group(6) == "0:00:00"  # nothing left at the end
    assert "Epoch 0/0" not in result.stdout and "v_num" not in result.stdout and "/--" not in result.stdout
    # A line after each validation, before the summary.
    validations = [line for line in result.stdout.splitlines() if line.startswith("validation at step ")]
    assert [line.split()[3] for line in validations] == [f"6/{STEPS}", f"{STEPS}/{STEPS}"], result.stdout
    assert all(re.search(r"val/loss \d+\.\d+", line) for line in validations)


def test_the_bar_counts_steps_of_max_steps_with_eta_loss_and_tokens_but_no_v_num(tmp_path, tiny_model_dirs):
    """In a terminal: the rich bar's task is `trainer.max_steps` long and advances by optimizer steps."""
    import rich
    from lightning.pytorch.loggers import TensorBoardLogger
    from rich.console import Console

    from data_recipes.synthetic import SyntheticRecipe
    from mmpeft.adapters import AdapterGroup
    from mmpeft.data.datamodule import ShardDataModule
    from mmpeft.models.backbone import Backbone
    from mmpeft.module import MMPeftModule, Optim
    from mmpeft.monitor import TokensProgressBar, default_callbacks

    shards = tmp_path / "shards"
    SyntheticRecipe(samples=40, samples_per_shard=40, seed=5).build(shards, progress=False)
    path = tiny_model_dirs["llava"]
    module = MMPeftModule(
        Backbone(pretrained=path), [AdapterGroup("lora", ["mlp"], {"r": 4})], Optim(lr=1e-3, warmup=0)
    )
    data = ShardDataModule(train=str(shards), processor=path, batch_size=4, max_length=256)
    screen = io.StringIO()
    bar = TokensProgressBar(console_kwargs={"file": screen, "force_terminal": True, "width": 200})
    rows = {}

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            console = Console(file=io.StringIO(), width=200)
            console.print(bar.progress.make_tasks_table([bar.train_progress_bar]))
            rows[trainer.global_step] = console.file.getvalue().strip()

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        max_epochs=1,
        logger=TensorBoardLogger(tmp_path, name="run"),
        log_every_n_steps=1,
        limit_val_batches=0,
        enable_checkpointing=False,
        callbacks=[bar, *default_callbacks([bar]), Snapshot()],
    )
    try:
        trainer.fit(module, data)
    finally:
        rich.reconfigure()  # the bar reconfigured rich's global console onto `screen`
    assert bar.train_progress_bar.total == 4 and bar.train_progress_bar.completed == 4
    row = rows[3]  # during the run: steps of max_steps, elapsed and a real ETA, loss and tokens/s
    assert "3/4" in row and re.search(r"\d:\d\d:\d\d • \d:\d\d:\d\d", row), row
    assert re.search(r"train/loss: \d+\.\d+", row) and re.search(r"tokens/s: [\d,]+", row), row
    assert "v_num" not in row and "Epoch" not in row and "-:--:--" not in row
    assert "4/4" in screen.getvalue() and "v_num" not in screen.getvalue()


# -- 2. noise ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_no_known_noise_on_any_command_and_real_warnings_still_show(first_fit):
    root, config, result = first_fit
    for args in (["adapters"], ["fit", "--help"]):
        run = mmpeft(*args)
        assert run.returncode == 0, run.stderr[-3000:]
        assert not noise_in(run.stdout + run.stderr), (args, noise_in(run.stdout + run.stderr))
    assert not noise_in(result.stdout + result.stderr), noise_in(result.stdout + result.stderr)
    # A real warning (mmpeft's own, through Lightning's rank_zero_warn) is still there.
    assert "model.evaluation.metrics names task(s) 'nosuch' not in the task vocabulary" in result.stderr


def test_only_the_exact_known_messages_are_silenced():
    from mmpeft.cli import quiet_known_noise

    quiet_known_noise()
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    gemm = (
        "Failed to load CPU gemm_4bit_forward from kernels-community: offline. "
        "Please make sure you already `pip install kernels`"
    )
    tip = (
        "💡 Tip: For seamless cloud logging and experiment tracking, "
        "try installing [litlogger](https://pypi.org/project/litlogger/)"
    )
    for name, known in (
        ("bitsandbytes.backends.cpu.ops", gemm),
        ("lightning.pytorch.utilities.rank_zero", tip),
        ("mmpeft", gemm),
    ):
        logger = logging.getLogger(name)
        handler = Keep()
        logger.addHandler(handler)
        try:
            logger.warning(known)
            logger.warning("a real warning from %s", name)
        finally:
            logger.removeHandler(handler)
    # Only the known message of each exact logger is dropped: the same text elsewhere still shows.
    assert seen == [
        "a real warning from bitsandbytes.backends.cpu.ops",
        "a real warning from lightning.pytorch.utilities.rank_zero",
        gemm,
        "a real warning from mmpeft",
    ]

    with warnings.catch_warnings(record=True) as caught:
        quiet_known_noise()  # pytest resets the warning filters for each test: set them again inside
        warnings.simplefilter("always")
        quiet_known_noise()
        module = "lightning.pytorch.utilities._pytree"
        warnings.warn_explicit(
            "`isinstance(treespec, LeafSpec)` is deprecated, "
            "use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` instead.",
            FutureWarning,
            "_pytree.py",
            21,
            module,
        )
        warnings.warn_explicit("something else is deprecated", FutureWarning, "_pytree.py", 22, module)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]

    from transformers.utils.logging import tqdm

    assert type(tqdm(range(3), desc="Loading weights")).__name__ == "EmptyTqdm"
    assert type(tqdm(range(3), desc="Downloading", disable=True)).__name__ != "EmptyTqdm"  # other bars stay


# -- 3. one run folder per run --------------------------------------------------------------------


@pytest.mark.slow
def test_resume_continues_the_run_folder_and_the_summary_counts_its_own_steps(first_fit):
    root, config, result = first_fit
    assert versions(root) == ["version_0"]
    assert re.search(rf"fit: {STEPS} steps in \d+m \d\ds", result.stdout), result.stdout
    resumed = mmpeft("fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "16")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert versions(root) == ["version_0"]  # the same folder: one set of curves, one report
    run = root / "runs" / "demo" / "version_0"
    steps = scalar_steps(run, "train/loss")
    assert steps == [4, 9, 14], steps  # every 5 steps (at Lightning's step - 1), before and after the resume, once each
    assert re.search(rf"fit: 4 steps \(resumed at step {STEPS}, now at step 16\) in \d+m \d\ds", resumed.stdout), (
        resumed.stdout
    )
    assert [line.split()[1] for line in resumed.stdout.splitlines() if line.startswith("step ")] == ["15/16", "16/16"]
    assert f"logs:        {run.resolve()}" in resumed.stdout and (run / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_a_run_resumed_after_a_kill_logs_each_step_once_in_its_folder(tmp_path, tiny_model_dirs, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))  # probes.KillAt in the subprocess
    config = demo_config(tmp_path, tiny_model_dirs["llava"], "llava", steps=8)  # checkpoints after steps 4 and 8
    args = ("fit", "--config", str(config), "--trainer.log_every_n_steps", "1")
    killed = mmpeft(*args, "--trainer.callbacks+=probes.KillAt", "--trainer.callbacks.step=6")
    assert killed.returncode == -9 and versions(tmp_path) == ["version_0"]
    resumed = mmpeft(*args, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert versions(tmp_path) == ["version_0"]
    run = tmp_path / "runs" / "demo" / "version_0"
    assert len(list(run.glob("events.out.tfevents.*"))) == 2
    # Steps 5 and 6 ran twice (killed after 6, resumed from 4): TensorBoard keeps the resumed run's.
    assert scalar_steps(run, "train/loss") == list(range(8))
    report = mmpeft("report", str(run))
    assert report.returncode == 0 and not report.stderr.strip(), report.stderr


@pytest.mark.slow
def test_evaluation_commands_make_no_training_run_folder_and_predict_says_where_it_wrote(first_fit, capsys):
    root, config, result = first_fit
    before, config_bytes = versions(root), config.read_bytes()
    code, out, err = run_cli(capsys, "validate", "--config", str(config), "--ckpt_path", "last")
    assert code == 0, err[-3000:]
    assert "validation: scores per task" in out
    # Its scores in a folder beside the training runs, not a version_N of its own.
    assert versions(root) == sorted([*before, "validate_0"])
    assert scalar_steps(root / "runs" / "demo" / "validate_0", "val/loss")
    before = versions(root)
    output = root / "answers" / "val.jsonl"
    code, out, err = run_cli(
        capsys,
        "predict",
        "--config",
        str(config),
        "--model.init_adapter",
        str(root / "runs" / "demo" / "version_0" / "adapter"),
        "--data.predict",
        str(root / "shards" / "val"),
        "--model.generation.max_new_tokens",
        "2",
        "--trainer.limit_predict_batches",
        "1",
        "--predictions.output",
        str(output),
    )
    assert code == 0, err[-3000:]
    assert versions(root) == before  # predict logs nothing
    assert config.read_bytes() == config_bytes and not list(
        root.glob("runs/demo/*.yaml")
    )  # no config saved over the user's
    rows = output.read_text().splitlines()
    assert f"predictions: {output.resolve()} ({len(rows)} answers)" in out.splitlines()


def test_a_failed_setup_leaves_no_empty_run_folder_and_names_the_stage(tmp_path, tiny_model_dirs, capsys):
    config = demo_config(tmp_path, tiny_model_dirs["llava"], "llava", steps=2)
    code, out, err = run_cli(capsys, "fit", "--config", str(config), "--data.prepare", "[]", "--data.train", "null")
    assert code == 2
    assert error_line(err) == "error: data.train is not set; `fit` needs it"  # 6: not `TrainerFn.FITTING`
    assert versions(tmp_path) == []  # the version folder the logger made is gone again


# -- 4. what the summary and predict say ---------------------------------------------------------


def test_the_summary_counts_skipped_samples_by_reason(tmp_path, tiny_model_dirs, capsys):
    from test_datamodule import write_mixed_shard

    shard = tmp_path / "mixed-000000.tar"
    write_mixed_shard(shard, 14)  # 14 good, one malformed JSON, one missing image
    config = demo_config(tmp_path, tiny_model_dirs["llava"], "llava", steps=2)
    code, out, err = run_cli(
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
        "--data.shuffle_buffer",
        "1",
        "--data.num_workers",
        "0",
        "--data.max_skip_fraction",
        "0.2",
        "--trainer.max_steps",
        "3",
        "--trainer.val_check_interval",
        "null",
    )
    assert code == 0, err[-3000:]
    assert "skipped:     2 training samples (bad_json 1, image_count_mismatch 1)" in out.splitlines(), out


# -- 5. errors from Lightning and the OS ----------------------------------------------------------


@pytest.fixture
def permission_denied(tmp_path) -> Path:
    """A folder nobody may create in: a read-only folder, or for root (who may write anywhere) /sys."""
    if os.geteuid() == 0:
        return Path("/sys/mmpeft-test")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return locked / "runs"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "corrupt", "last-without-checkpoint", "permission-denied", "disk-full"])
def test_lightning_and_os_errors_are_one_line(first_fit, tmp_path, capsys, permission_denied, case):
    root, config, result = first_fit
    before = versions(root)
    args = ["fit", "--config", str(config)]
    if case == "missing":
        args += ["--ckpt_path", str(tmp_path / "nope.ckpt")]
        expected = f"error: ckpt_path: no checkpoint file at '{tmp_path / 'nope.ckpt'}'"
    elif case == "corrupt":
        (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint\n")
        args += ["--ckpt_path", str(tmp_path / "bad.ckpt")]
        expected = f"error: ckpt_path: '{tmp_path / 'bad.ckpt'}' is not a checkpoint mmpeft can read"
    elif case == "last-without-checkpoint":
        (tmp_path / "empty").mkdir()
        args += ["--ckpt_path", "last", "--trainer.callbacks.dirpath", str(tmp_path / "empty")]
        expected = f"error: ckpt_path last: no last checkpoint in '{tmp_path / 'empty'}'"
    elif case == "permission-denied":
        args += ["--trainer.logger.init_args.save_dir", str(permission_denied)]
        expected = "error: "
    else:  # a full disk, for real: the prediction file's .partial is /dev/full
        output = tmp_path / "answers.jsonl"
        Path(f"{output}.partial").symlink_to("/dev/full")
        args = [
            "predict",
            "--config",
            str(config),
            "--data.predict",
            str(root / "shards" / "val"),
            "--predictions.output",
            str(output),
            "--model.generation.max_new_tokens",
            "1",
            "--trainer.limit_predict_batches",
            "1",
        ]
        expected = f"error: No space left on device: '{output}.partial'"
    code, out, err = run_cli(capsys, *args)
    assert code == 2, err[-3000:]
    line = error_line(err)
    assert line.startswith(expected), line
    assert "Traceback" not in err
    if case == "permission-denied":
        assert str(permission_denied).split("/")[1] in line and (
            "Permission denied" in line or "Operation not permitted" in line
        ), line
    if case == "last-without-checkpoint":
        assert "Set `ModelCheckpoint" not in err  # not Lightning's warning, and it did not train from scratch
    assert versions(root) == before


def test_the_debug_switch_keeps_the_traceback(tmp_path, tiny_model_dirs, capsys, monkeypatch):
    config = demo_config(tmp_path, tiny_model_dirs["llava"], "llava", steps=2)
    args = ("fit", "--config", str(config), "--ckpt_path", str(tmp_path / "nope.ckpt"))
    for switch in ("env", "flag"):
        if switch == "env":
            monkeypatch.setenv("MMPEFT_DEBUG", "1")
            code, out, err = run_cli(capsys, *args)
            monkeypatch.delenv("MMPEFT_DEBUG")
        else:
            code, out, err = run_cli(capsys, "--debug", *args)
        assert code == 2 and "Traceback (most recent call last)" in err, err[-3000:]
        assert err.strip().splitlines()[-1] == f"error: ckpt_path: no checkpoint file at '{tmp_path / 'nope.ckpt'}'"
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and "Traceback" not in err


# -- 6. smaller points ----------------------------------------------------------------------------


def test_fit_without_a_config_names_the_missing_setting_and_suggests_config(capsys):
    code, out, err = run_cli(capsys, "fit")
    assert code == 2
    line = error_line(err)
    assert "model.backbone.pretrained is not set" in line and "--config" in line, line
    assert "<class" not in err


def test_a_mistyped_command_lists_the_tools_too(capsys):
    code, out, err = run_cli(capsys, "fitt")
    assert code == 2
    line = error_line(err)
    assert line.startswith("error: unknown command 'fitt'") and "did you mean 'fit'?" in line, line
    for command in (
        "fit",
        "validate",
        "test",
        "predict",
        "adapters",
        "tiny-model",
        "data",
        "merge",
        "export",
        "report",
    ):
        assert (
            f" {command}," in line or f" {command} " in line or line.endswith(f" {command}") or f" {command};" in line
        ), (command, line)
    code, out, err = run_cli(capsys)  # no command at all: the same list
    assert code == 2 and error_line(err).startswith(
        "error: no command given; commands: fit, validate, test, predict, adapters, tiny-model"
    )


def test_generated_answers_do_not_start_with_a_space(tiny_model_dirs):
    from PIL import Image

    from mmpeft.adapters import AdapterGroup
    from mmpeft.models.backbone import Backbone, load_backbone, load_processor
    from mmpeft.module import MMPeftModule

    path = tiny_model_dirs["llava"]
    module = MMPeftModule(Backbone(pretrained=path), [AdapterGroup("lora", ["mlp"], {"r": 4})])
    module.model = load_backbone(Backbone(pretrained=path), torch.device("cpu")).eval()
    processor = load_processor(path)
    module.tokenizer = processor.tokenizer
    # A word token that decodes with a leading space, forced by a logits bias (greedy decoding picks it).
    vocab = processor.tokenizer.get_vocab()
    word = next(
        i
        for t, i in sorted(vocab.items())
        if processor.tokenizer.decode([i]).startswith(" ") and processor.tokenizer.decode([i]).strip().isalpha()
    )
    assert processor.tokenizer.decode([word, word]).startswith(" ")  # what decode gives: a leading space
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(text=[text], images=[Image.new("RGB", (32, 32), (200, 10, 10))], return_tensors="pt")
    (answer,) = module.generate_answers(dict(inputs), max_new_tokens=2, do_sample=False, sequence_bias={(word,): 100.0})
    assert answer == processor.tokenizer.decode([word, word]).lstrip() and not answer[0].isspace()


def test_readme_says_what_the_makefile_installs_on_a_cuda_machine():
    text = (ROOT / "README.md").read_text()
    assert "the pinned CPU build" not in text
    assert "TORCH=" in text and "CUDA" in text.split("## Train on a real model")[0]
    assert "MMPEFT_DEBUG=1" in text
