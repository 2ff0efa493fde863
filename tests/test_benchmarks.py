"""The benchmarks' loop references must compute what the adapters compute, or their ratios mean nothing."""

from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python benchmarks/<script>.py ARGS`` from the repository root, which must succeed."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_check(script: str) -> subprocess.CompletedProcess:
    """``python benchmarks/<script>.py --check``, which must succeed."""
    return run_script(script, "--check")


def test_adapter_overhead_references_match_the_adapters():
    result = run_check("adapter_overhead")
    assert "loop references compute the same update and input gradient as their adapters" in result.stdout


def test_data_throughput_check_compares_identical_batches_and_reports_rates():
    result = run_check("data_throughput")
    out = result.stdout
    assert "the shard and folder pipelines yield the same batches for all 48 samples" in out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and cells[0] in ("shards", "folder") and cells[1].isdigit():
            rows[(cells[0], int(cells[1]))] = cells
    assert set(rows) == {(p, w) for p in ("shards", "folder") for w in (0, 1)}
    for cells in rows.values():
        rate, per_batch, first, cpu = float(cells[2].split()[0]), float(cells[3]), float(cells[4]), float(cells[5])
        assert rate > 0 and per_batch > 0 and first > 0 and cpu > 0
    steps = [
        line
        for line in out.splitlines()
        if line.startswith(("| cached |", "| fed by shards, 1 worker |", "| fed by folder, 1 worker |"))
    ]
    assert len(steps) == 3 and all(float(line.split("|")[2].split()[0]) > 0 for line in steps)
    assert "| shard loading (1 worker) s / batch < training step s |" in out


def test_vs_peft_check_gives_the_same_first_loss_and_a_row_per_variant():
    result = run_check("vs_peft")
    out = result.stdout
    agree = [line for line in out.splitlines() if line.startswith("first-step losses agree: mmpeft ")]
    assert len(agree) == 1 and "(all 12 variants, packed ones on the first batch packed)" in agree[0]
    relative = float(agree[0].split("largest relative difference ")[1].split()[0])
    assert relative <= 1e-4
    setup = next(line for line in out.splitlines() if line.startswith("setup: "))
    padded = setup.split("padded_tokens_per_pass ")[1].split("}")[0] + "}"
    padding = ast.literal_eval(padded)  # {'as given': n, 'length-grouped': m, ...}: the same samples, regrouped
    assert padding["length-grouped"] <= padding["as given"]
    # Packing (issue 18): the same real tokens in fewer positions; rows of 2x --max-len (256) hold no padding here.
    layouts = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[1].isdigit():
            layouts[cells[0]] = [int(c.replace(",", "")) for c in cells[1:5]] + [float(cells[5].rstrip("%"))]
    grouped = "length-grouped"
    assert set(layouts) == {
        "as given",
        grouped,
        "as given, packed to the longest",
        f"{grouped}, packed to the longest",
        f"{grouped}, packed to 256",
        f"{grouped}, packed to 512",
    }
    for name, (rows, positions, real, padded, share) in layouts.items():
        assert rows > 0 and real == layouts["as given"][2] and positions == real + padded, name
        assert abs(share - 100 * padded / positions) < 0.05 and positions == padding[name], name
    assert layouts["as given, packed to the longest"][1] <= layouts["as given"][1]
    assert layouts[f"{grouped}, packed to the longest"][1] <= layouts[grouped][1]
    assert layouts[f"{grouped}, packed to 256"][3] == 0 and layouts[f"{grouped}, packed to 256"][0] == 2
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[1][:1].isdigit():
            rows[cells[0]] = cells
    assert set(rows) == {
        "peft",
        "levers off",
        "+ loss_chunk 16",
        "+ inplace_add",
        "- input_grads",
        "checkpoint_every 2",
        "+ length-grouped batches",
        "+ packed batches",
        "+ packed batches, pack_length 256",
        "+ packed batches, pack_length 512",
        "defaults",
        "all levers",
        "all levers + packed batches, pack_length 256",
    }
    for name, cells in rows.items():
        seconds, rate, peak = float(cells[1].split()[0]), float(cells[2]), float(cells[5])
        assert seconds > 0 and rate > 0 and peak > 0, name
        assert float(cells[3].split("x")[0]) > 0 and float(cells[6].rstrip("x")) > 0
    assert rows["peft"][3].startswith("1.000x") and rows["levers off"][4].startswith("1.000x")
    # The chunked loss never holds the (positions x vocabulary) logits; the memory measure must see it.
    assert float(rows["+ loss_chunk 16"][7].rstrip("x")) < 1.0
    # Each packed variant against its padded twin, with the padded shares of both.
    packing = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in rows and "x [" in cells[3]:
            packing[cells[0]] = cells
    assert set(packing) == {name for name in rows if "packed" in name}
    assert packing["all levers + packed batches, pack_length 256"][1] == "all levers"
    assert packing["+ packed batches, pack_length 256"][2] == "0.0% (against 12.3%)"
    for cells in packing.values():
        assert float(cells[3].split("x")[0]) > 0 and float(cells[4].rstrip("x")) > 0
    targets = [
        line for line in out.splitlines() if line.startswith(("| defaults |", "| all levers |")) and "<= 0.85x" in line
    ]
    assert len(targets) == 2


def test_memory_model_quick_predicts_every_measured_peak_within_15_percent(tmp_path):
    """Issue 16's calibration: the planner's peak against the CPU profiler's on real 4-bit models, row by row."""
    out = tmp_path / "memory_model.json"
    result = run_script("memory_model", "--quick", "--out", str(out))
    report = json.loads(out.read_text())
    rows = report["rows"]
    for r in rows:
        assert 0.85 <= r["ratio"] <= 1.15, (r["name"], r["ratio"], r["step_lines"], r["tracked"])
        assert r["ratio"] == r["predicted_bytes"] / r["measured_bytes"]
        assert r["measured_bytes"] == r["resident_bytes"] + r["measured_step_bytes"]
        assert r["resident_bytes"] > 0 and r["measured_step_bytes"] > 0 and r["predicted_step_bytes"] > 0
    assert len({r["family"] for r in rows}) >= 2
    assert len({r["adapter"] for r in rows}) >= 2
    assert {r["checkpointing"] for r in rows} == {True, False}
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    assert f"worst ratio: {worst['ratio']:.3f} ({worst['name']}); every row within 15%: yes" in result.stdout
    # bf16-mixed (planned with precision="bf16-mixed") is an ordinary row of the check, the real step tracked too
    mixed = [r for r in rows if r["autocast"]]
    assert mixed and all(r["dtype"] == "bfloat16" for r in mixed)
    assert all(r["measured_step_bytes"] > 0 and r["tracked"]["peak"] > 0 for r in mixed)
    assert "bf16_mixed" not in report


def test_conflict_suite_base_build_is_reproducible_to_the_bit_whatever_the_callers_thread_settings(tmp_path):
    """The suite's base model: the same settings give the same weights (fingerprint), with 2 threads or 1 set by the
    caller, and the caller's settings come back after the build."""
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.conflict_suite.base import BaseSettings, ensure_base

    settings = BaseSettings(steps=20, pool=160, held_out=10, warmup=4, batch=8)
    threads = torch.get_num_threads()
    prints = []
    for n, folder in ((2, "a"), (1, "b")):
        torch.set_num_threads(n)
        out, info = ensure_base(tmp_path / folder, settings, progress=False)
        assert torch.get_num_threads() == n and not torch.are_deterministic_algorithms_enabled()
        assert not info["cached"] and len(info["fingerprint"]) == 16
        assert set(info["held_out_by_skill"]) <= {
            "colour",
            "shape",
            "count",
            "corner",
            "describe",
            "left/right colour",
            "left/right shape",
        }
        prints.append(info["fingerprint"])
    torch.set_num_threads(threads)
    assert prints[0] == prints[1]
    again = ensure_base(tmp_path / "a", settings, progress=False)[1]
    assert again["cached"] and again["fingerprint"] == prints[0]


@pytest.mark.slow
def test_conflict_suite_check_trains_every_row_and_compares_each_with_its_lora_paired_by_seed(tmp_path):
    """The quality suite's smoke mode, in two worker processes: every row x seed trained through the product (the
    MASA plugin registered from its source folder) and scored per task on held-out samples; both tables printed, each
    row with its paired difference from its LoRA."""
    out = tmp_path / "conflict.json"
    result = run_script("conflict_suite/run", "--check", "--jobs", "2", "--out", str(out), timeout=900)
    report = json.loads(out.read_text())
    tasks = report["setup"]["tasks"]
    assert len(tasks) == 5 and report["setup"]["mixture"] == "conflict"
    assert len(report["setup"]["base fingerprint"]) == 16
    counts = report["param_counts"]
    equal = ["lora", "asymlora", "asymlora-block", "moelora", "mixlora", "mixlora-r8", "masa"]
    assert set(counts) == {*equal, "lora-r4", "lora-r9"}
    assert all(abs(counts[n] / counts["lora"] - 1) <= 0.05 for n in equal)
    assert counts["lora-r4"] == counts["lora"] // 5 and counts["masa"] == counts["asymlora"]
    seeds = report["setup"]["seeds"]
    assert len(seeds) == 2
    for name, row in report["rows"].items():
        assert row["trainable_params"] == counts[name]
        assert row["chosen_lr"] in report["setup"]["lr grid"]
        assert [run["seed"] for run in row["runs"]] == seeds
        for run in row["runs"]:
            assert run["lr"] == row["chosen_lr"] and run["row"] == name
            scores = run["test"]
            assert set(scores) == {*tasks, "mean"} and all(0.0 <= v <= 1.0 for v in scores.values())
            assert abs(scores["mean"] - sum(scores[t] for t in tasks) / len(tasks)) < 1e-6
    assert list(report["tables"]) == ["equal trainable parameters", "equal rank"]
    # The printed tables: the base model's row, then each LoRA and each row, a mean ± std cell per task; a compared
    # row ends with its paired difference, a 95% interval and the seeds won (of 2).
    text = result.stdout
    first, second = text.index("**equal trainable parameters**"), text.index("**equal rank**")
    for part, names in ((text[first:second], equal), (text[second:], ["lora-r4", "mixlora", "lora-r9", "asymlora"])):
        lines = {line.split(" | ")[0][2:]: line for line in part.splitlines() if line.startswith("| ")}
        assert "base (no adapter)" in lines and set(names) <= set(lines)
        for name in names:
            assert lines[name].count("±") == len(tasks) + 1
            compared = name not in ("lora", "lora-r4", "lora-r9")
            assert (re.search(r"\[[-+]\d\.\d{3}, [-+]\d\.\d{3}\], [0-2]/2 \|$", lines[name]) is not None) == compared
    assert text.startswith("command: python benchmarks/conflict_suite/run.py --check")
    assert "environment: python" in text and f"fingerprint {report['setup']['base fingerprint']}" in text


def test_conflict_suite_second_base_knows_the_second_mixtures_words_and_the_first_base_is_unchanged():
    """``BaseSettings.vocabulary``: the default base keeps its settings (so its cache key and fingerprint) and its
    general data to the byte; the ``format`` base's general answers use every word of the second mixture's answers,
    which the default's never do; ``--mixture format`` trains on it."""
    import hashlib
    import random

    sys.path.insert(0, str(ROOT))
    from benchmarks.conflict_suite.base import BaseSettings
    from benchmarks.conflict_suite.data import MIXTURES, general_samples, task_sample
    from benchmarks.conflict_suite.run import VOCABULARY, base_settings

    assert "vocabulary" not in BaseSettings().as_dict() and BaseSettings(vocabulary="format").as_dict()["vocabulary"]
    assert BaseSettings().key() != BaseSettings(vocabulary="format").key()
    assert base_settings(BaseSettings(), "general") == BaseSettings()
    second = base_settings(BaseSettings(), "format")  # 11 question families instead of 7: as much of each
    assert (second.vocabulary, second.steps, second.pool) == ("format", 4714, 25142)
    digest = hashlib.sha256()
    for sample in general_samples(40, 0):
        digest.update(repr(sample.messages).encode())
        digest.update(sample.images[0].tobytes())
    assert digest.hexdigest()[:16] == "7416b6cc785042d4"  # the data base 181214ec4f89c605 was trained on

    def words(samples) -> set[str]:
        return {w for s in samples for w in s.messages[-1]["content"][0]["text"].split()}

    for vocabulary in ("general", "format"):
        known = words(general_samples(1000, 0, vocabulary))
        for task in MIXTURES["format"]:
            knows_all = vocabulary == "format" or task == "colour_en"  # the general base answers colours in English
            answers = {
                w for i in range(60) for w in task_sample(task, random.Random(i))[0][-1]["content"][0]["text"].split()
            }
            assert (answers <= known) == knows_all, (vocabulary, task, answers - known)
    assert VOCABULARY == {"conflict": "general", "format": "format"}
    with pytest.raises(ValueError, match="BaseSettings.vocabulary: unknown vocabulary 'latin'"):
        BaseSettings(vocabulary="latin")


def test_conflict_suite_router_lr_rows_set_the_groups_router_lr_as_a_multiple_of_the_runs(tiny_model_dirs):
    sys.path.insert(0, str(ROOT))
    from benchmarks.conflict_suite.run import MODES, ROWS, module_for

    base = Path(tiny_model_dirs["llava"])
    assert module_for(base, ROWS["mixlora-rlr10"], 3e-3, MODES["quick"]).adapter_groups[0].router_lr == 3e-2
    assert module_for(base, ROWS["mixlora"], 3e-3, MODES["quick"]).adapter_groups[0].router_lr is None


def test_conflict_suite_paired_difference_and_its_interval_by_hand():
    sys.path.insert(0, str(ROOT))
    from benchmarks.conflict_suite.run import paired

    d = paired([0.5, 0.6, 0.7], [0.4, 0.4, 0.6])  # differences 0.1, 0.2, 0.1
    sd = math.sqrt(((0.1 - 0.4 / 3) ** 2 * 2 + (0.2 - 0.4 / 3) ** 2) / 2)
    half = 4.303 * sd / math.sqrt(3)  # Student's t, 2 degrees of freedom, 97.5%
    assert d["mean"] == pytest.approx(0.4 / 3) and d["won"] == 3 and d["n"] == 3
    assert (d["low"], d["high"]) == pytest.approx((0.4 / 3 - half, 0.4 / 3 + half))


@pytest.mark.slow
def test_gpu_check_cpu_mode_trains_both_families_with_both_adapters_and_peft(tmp_path):
    """The one-shot GPU check's CPU-sized mode: the same code path as on the GPU (models built on meta, NF4 layer by
    layer), both families, mmpeft's LoRA and AsymLoRA and PEFT's LoRA, the same step-0 loss as PEFT; then the
    packing rows: padded, packed and packed 2x batches of mixed lengths give the same first loss and gradients, the
    control (no sample boundaries) does not, and flash-attention is skipped on a CPU."""
    out = tmp_path / "gpu_check.json"
    # One thread: the suite runs in two processes on two cores; two threads each would fight over them.
    result = run_script("gpu_check", "--cpu", "--threads", "1", "--out", str(out))
    text = result.stdout
    assert text.startswith("command: python benchmarks/gpu_check.py --cpu")
    assert "torch " in text and "transformers " in text and "bitsandbytes " in text
    assert "mode: CPU-sized" in text
    tables: dict[str, dict[str, list[str]]] = {}
    family = None
    for line in text.splitlines():
        if line.startswith("## "):
            family = line[3:].split(":")[0]
            tables[family] = {}
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if family and line.startswith("|") and len(cells) == 12 and cells[0] in ("lora", "asymlora", "peft"):
            tables[family][cells[0]] = cells
    assert set(tables) == {"llava", "qwen2_vl"}
    for family, rows in tables.items():
        assert set(rows) == {"lora", "asymlora", "peft"}, family
        for name, cells in rows.items():
            step, rate, resident, peak = float(cells[3]), float(cells[4]), float(cells[5]), float(cells[7])
            assert all(math.isfinite(v) and v > 0 for v in (step, rate, resident, peak)), (family, name, cells)
            assert peak > resident  # the step allocates above what it holds
            if name != "peft":  # mmpeft's planned peak, from the config alone, against the measured one
                assert 0.85 <= float(cells[9]) <= 1.15, (family, name, cells)
        # same model, same batch, zero-init B: mmpeft's LoRA computes PEFT's loss at step 0
        ours, theirs = float(rows["lora"][2]), float(rows["peft"][2])
        assert abs(ours - theirs) <= 1e-4 * abs(theirs), (family, ours, theirs)
        assert int(rows["lora"][1].replace(",", "")) == int(rows["peft"][1].replace(",", ""))
        agree = next(line for line in text.splitlines() if line.startswith(f"{family}: step-0 losses agree"))
        assert float(agree.split("relative ")[1].rstrip(")")) <= 1e-4
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu"
    assert {(r["family"], r["variant"]) for r in report["rows"]} == {
        (f, v) for f in ("llava", "qwen2_vl") for v in ("lora", "asymlora", "peft")
    }
    for r in report["rows"]:
        assert r["peak_bytes"] == r["resident_bytes"] + r["step_peak_bytes"] > 0
        assert len(r["step_s"]) == report["setup"]["steps"] and all(s > 0 for s in r["step_s"])
        assert all(math.isfinite(loss) for loss in r["losses"])

    # The packing rows, per family: (attention, layout) -> the table's cells.
    packing: dict[str, dict[tuple[str, str], list[str]]] = {}
    for line in text.splitlines():
        if line.startswith("### packing, "):
            family = line.removeprefix("### packing, ").split(":")[0]
            packing[family] = {}
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 15 and cells[0] in ("sdpa", "flash_attention_2"):
            packing[family][cells[0], cells[1]] = cells
    control = "packed 2x, boundaries ignored (control)"
    assert set(packing) == {"llava", "qwen2_vl"}
    for family, rows in packing.items():
        sdpa = {("sdpa", name) for name in ("padded", "packed", "packed 2x", control)}
        assert set(rows) == sdpa | {("flash_attention_2", "all")}, (family, sorted(rows))
        assert "flash-attn not installed" in rows["flash_attention_2", "all"][14]
        padded = rows["sdpa", "padded"]
        for name in ("packed", "packed 2x"):
            cells = rows["sdpa", name]
            assert cells[14] == "ok", (family, cells)
            loss, first = float(cells[4]), float(padded[4])
            assert abs(loss - first) <= 1e-4 * abs(first) and float(cells[5]) <= 1e-4, (family, cells)
            assert float(cells[6]) <= 1e-4, (family, cells)  # the first step's adapter gradients
            time_x, peak_x = float(cells[12]), float(cells[13])
            assert math.isfinite(time_x) and time_x > 0 and 0 < peak_x < 1.5, (family, cells)
        # samples seeing each other move the gradients far beyond the tolerance
        assert float(rows["sdpa", control][6]) > 1e-2 and rows["sdpa", control][14].startswith("ok: differs")

        def share(cells: list[str]) -> float:  # "640 / 2,048 (31.2%)"
            padding, positions = cells[3].split(" (")[0].replace(",", "").split(" / ")
            return int(padding) / int(positions)

        assert share(rows["sdpa", "packed 2x"]) < share(rows["sdpa", "packed"]) <= share(padded)
        assert share(padded) > 0.2  # mixed lengths: the padded batch is a fifth padding or more
    assert report["packing"]["setup"]["batch"] == 8 and report["packing"]["setup"]["grad_tolerance"] == 1e-4
    rows = report["packing"]["rows"]
    assert len(rows) == 2 * 5
    for r in rows:
        if r["status"].startswith("skipped"):
            continue
        assert r["real_tokens"] == sum(report["packing"]["setup"]["lengths"][r["family"]])
        assert r["rows"] * r["width"] == r["real_tokens"] + r["padded_positions"]
        if r["layout"] != control:
            assert r["peak_bytes"] == r["resident_bytes"] + r["step_peak_bytes"] > 0
            assert len(r["step_s"]) == report["packing"]["setup"]["steps"] == 1


def test_gpu_check_shapes_have_the_published_parameter_counts(monkeypatch):
    """The 7B shapes written into gpu_check.py build models of exactly the published checkpoints' sizes (on the meta
    device: no weight is allocated)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    # (hub pages' sizes in billions, the exact count these shapes build)
    published = {"llava": (7.06, 7_063_427_072), "qwen2_vl": (8.29, 8_291_375_616)}
    for family, (billions, count) in published.items():
        with init_empty_weights():
            model = AutoModelForImageTextToText.from_config(gpu_check.model_config(gpu_check.SHAPES[family]))
        built = sum(p.numel() for p in model.parameters())
        assert round(built / 1e9, 2) == billions and built == count, (family, built)
        assert gpu_check.image_tokens(gpu_check.SHAPES[family]) == 576


def test_conflict_suite_answers_keeps_what_the_metrics_score_and_groups_the_misses_by_reference():
    """benchmarks/conflict_suite/answers.py: every answer TaskMetrics scores inside kept_answers() is kept (and still
    scored), and the misses are grouped by normalised reference; outside the block nothing is kept."""
    import torch

    from benchmarks.conflict_suite.answers import kept_answers, misses
    from mmpeft.metrics import TaskMetrics

    metrics = TaskMetrics(["colour_fr", "count_fr"], {"colour_fr": ["exact_match"], "count_fr": ["exact_match"]})
    answers, references = ["yellow", "Rouge.", "orange", "trois"], [["jaune"], ["rouge"], ["jaune"], ["deux"]]
    with kept_answers() as kept:
        metrics.update_answers(answers, references, torch.tensor([0, 0, 0, 1]))
    metrics.update_answers(["x"], [["y"]], torch.tensor([1]))
    assert kept == [("yellow", "jaune", 0), ("Rouge.", "rouge", 0), ("orange", "jaune", 0), ("trois", "deux", 1)]
    assert misses(kept, ["colour_fr", "count_fr"]) == {
        "colour_fr": {"jaune": {"yellow": 1, "orange": 1}},
        "count_fr": {"deux": {"trois": 1}},
    }
    scored = metrics.collection["exact_match"].compute()  # still scored, the answer after the block included
    assert [round(float(v), 4) for v in scored.values()] == [0.3333, 0.0]
