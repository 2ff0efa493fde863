"""Validation and test scores: each metric on hand-made answers, per-task grouping, the metric choice, and `validate`
end to end."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
import yaml
from test_cli import demo_config, mmpeft, run_main, scalars

from data_recipes.synthetic import SyntheticRecipe
from mmpeft.data import ShardDataModule, parse_sample
from mmpeft.data.datamodule import resolve_shards
from mmpeft.errors import ConfigError
from mmpeft.metrics import (
    Evaluation,
    ExactMatch,
    MeanLoss,
    TaskMetrics,
    TokenAccuracy,
    VQAAccuracy,
    YesNoAccuracy,
    normalize_answer,
    yes_no,
)
from mmpeft.models.backbone import Backbone, load_backbone, load_processor

NAN = float("nan")


# -- each score on hand-made answers ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The  Red circle.", "red circle"),
        ("  an Apple!\n", "apple"),
        ("Three", "3"),
        ("3.5", "3.5"),
        ("3.", "3"),
        ("red, blue; green", "red blue green"),
        ("It's «yes»", "its yes"),
        ("ＲＥＤ", "red"),  # full-width letters, NFKC
        ("theory", "theory"),  # an article only as a whole word
        ("", ""),
    ],
)
def test_normalisation(text, normalised):
    assert normalize_answer(text) == normalised


def scores(metric, answers, references, task_ids, num_tasks=2) -> list[float]:
    m = metric(num_tasks)
    m.update(answers, references, torch.tensor(task_ids))
    return m.compute().tolist()


def test_exact_match_compares_with_the_first_reference_after_normalisation():
    answers = ["The red circle.", "Circle", "2", "two", "blue"]
    references = [["red circle"], ["square", "circle"], ["2"], ["2"], ["red"]]
    # task 0: 1, 0 (a later reference does not count); task 1: 1, 1 (number word), 0
    assert scores(ExactMatch, answers, references, [0, 0, 1, 1, 1]) == pytest.approx([1 / 2, 2 / 3])


def test_vqa_accuracy_takes_any_reference():
    answers = ["Circle", "a square", "triangle", "Yes."]
    references = [["square", "circle"], ["square"], ["circle", "square"], ["yes", "yes", "no"]]
    assert scores(VQAAccuracy, answers, references, [0, 0, 0, 1]) == pytest.approx([2 / 3, 1.0])


def test_yes_no_reads_the_leading_word():
    answers = ["Yes, it is.", "no", "NO!", "Yes", "I think yes", "", "yes"]
    references = [["yes"], ["No."], ["yes"], ["Yes, there is."], ["yes"], ["no"], ["a cat"]]
    # task 0: right, right, wrong; task 1: right, neither yes nor no (wrong), empty (wrong).
    # A non-yes/no reference is not scored.
    assert scores(YesNoAccuracy, answers, references, [0, 0, 0, 1, 1, 1, 1]) == pytest.approx([2 / 3, 1 / 3])


def test_a_task_without_answers_is_nan():
    values = scores(ExactMatch, ["a"], [["a"]], [1])
    assert math.isnan(values[0]) and values[1] == 1.0


def test_token_accuracy_and_loss_on_trained_positions_only():
    logits = torch.tensor(
        [
            [[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 5.0]],
            [[0.0, 4.0, 0.0], [9.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 2.0, 1.0]],
        ]
    )  # (batch 2, seq 4, vocab 3)
    target = torch.tensor([[0, 2, -100, 2], [-100, 0, -100, 2]])  # (2, 4); -100: not trained
    task_ids = torch.tensor([0, 1])  # per sample, broadcast over the sequence
    accuracy, loss = TokenAccuracy(2), MeanLoss(2)
    accuracy.update(logits, target, task_ids)
    loss.update(logits, target, task_ids)
    # sample 0: argmax 0 (right), 1 (wrong), 2 (right); sample 1: argmax 0 (right), 1 (wrong)
    assert accuracy.compute().tolist() == pytest.approx([2 / 3, 1 / 2])
    ce = -F.log_softmax(logits, dim=-1)  # (2, 4, 3)
    expected = [(ce[0, 0, 0] + ce[0, 1, 2] + ce[0, 3, 2]) / 3, (ce[1, 1, 0] + ce[1, 3, 2]) / 2]
    assert loss.compute().tolist() == pytest.approx([float(e) for e in expected])


# -- per-task grouping ----------------------------------------------------------------------------


def forced(metrics: TaskMetrics, task_of_token: list[int], right: list[bool], sample_tasks: list[int]) -> None:
    """Teacher-forced tokens of two-word vocabulary: token 0 is the target, the logits favour 0 where ``right``."""
    logits = torch.tensor([[1.0, 0.0] if r else [0.0, 1.0] for r in right])  # (n, 2)
    metrics.update_forced(
        logits, torch.zeros(len(right), dtype=torch.long), torch.tensor(task_of_token), torch.tensor(sample_tasks)
    )


def test_per_task_scores_with_a_task_absent_from_a_batch_and_one_from_the_epoch():
    tasks = ["count", "compare", "caption"]
    metrics = TaskMetrics(
        tasks, {"count": ["exact_match", "vqa_accuracy"], "compare": ["yes_no"], "caption": ["exact_match"]}
    )
    # Batch 1: count and compare.
    forced(metrics, [0, 0, 1], [True, False, True], [0, 1])
    metrics.update_answers(["3", "Yes."], [["3"], ["no"]], torch.tensor([0, 1]))
    # Batch 2: count only (compare absent from it, caption from every batch).
    forced(metrics, [0, 0], [True, True], [0, 0])
    metrics.update_answers(["two", "one"], [["1", "2"], ["one"]], torch.tensor([0, 0]))
    results = metrics.compute()

    assert list(results.tasks) == ["count", "compare"]  # caption: not reported
    count, compare = results.tasks["count"], results.tasks["compare"]
    assert count["samples"] == 3 and compare["samples"] == 1
    assert count["token_accuracy"] == pytest.approx(3 / 4) and compare["token_accuracy"] == 1.0
    right, wrong = -math.log(math.e / (math.e + 1)), -math.log(1 / (math.e + 1))
    assert count["loss"] == pytest.approx((3 * right + wrong) / 4) and compare["loss"] == pytest.approx(right)
    assert count["exact_match"] == pytest.approx(2 / 3)  # "3" and "one"; "two" is not the first reference
    assert count["vqa_accuracy"] == 1.0
    assert compare["yes_no"] == 0.0 and "exact_match" not in compare
    # The mean over the tasks that report a score, never over an absent one.
    assert results.mean == pytest.approx(
        {
            "samples": 4,
            "loss": (count["loss"] + compare["loss"]) / 2,
            "token_accuracy": (3 / 4 + 1) / 2,
            "exact_match": 2 / 3,
            "vqa_accuracy": 1.0,
            "yes_no": 0.0,
        }
    )
    assert not any(math.isnan(v) for v in results.scalars("val").values())
    assert set(results.scalars("val")) == {
        "val/loss",
        "val/token_accuracy",
        "val/exact_match",
        "val/vqa_accuracy",
        "val/yes_no",
        "val/count/loss",
        "val/count/token_accuracy",
        "val/count/exact_match",
        "val/count/vqa_accuracy",
        "val/compare/loss",
        "val/compare/token_accuracy",
        "val/compare/yes_no",
    }

    # A new pass starts from nothing.
    metrics.reset()
    forced(metrics, [2], [False], [2])
    again = metrics.compute()
    assert list(again.tasks) == ["caption"] and again.tasks["caption"]["token_accuracy"] == 0.0


def test_states_of_two_processes_add_up_as_one():
    """What torchmetrics' DDP sync does with the states (``dist_reduce_fx="sum"``): rank 0 saw one task, rank 1 the
    other."""
    chosen = {"a": ["exact_match"], "b": ["exact_match"]}
    ranks, alone = [TaskMetrics(["a", "b"], chosen) for _ in range(2)], TaskMetrics(["a", "b"], chosen)
    for metrics, rank in ((ranks[0], 0), (ranks[1], 1), (alone, 0), (alone, 1)):
        if rank == 0:
            forced(metrics, [0, 0], [True, False], [0])
            metrics.update_answers(["x"], [["x"]], torch.tensor([0]))
        else:
            forced(metrics, [1, 1, 1], [True, True, False], [1, 1])
            metrics.update_answers(["x", "z"], [["y"], ["z"]], torch.tensor([1, 1]))
    for name in ranks[0].collection:
        ranks[0].collection[name].metric.merge_state(ranks[1].collection[name].metric)
    merged, expected = ranks[0].compute(), alone.compute()
    assert merged == expected
    assert [(row["samples"], row["token_accuracy"], row["exact_match"]) for row in merged.tasks.values()] == [
        (1, 0.5, 1.0),
        (2, pytest.approx(2 / 3), 0.5),
    ]
    assert merged.mean["exact_match"] == 0.75


def test_table_has_a_row_per_task_and_a_dash_where_a_task_has_no_such_score():
    from rich.console import Console

    metrics = TaskMetrics(["a", "b"], {"a": ["exact_match"], "b": ["yes_no"]})
    forced(metrics, [0, 1], [True, False], [0, 1])
    metrics.update_answers(["x", "no"], [["x"], ["no"]], torch.tensor([0, 1]))
    console = Console(width=200, record=True)
    console.print(metrics.compute().table("validation"))
    rows = {cells[0]: cells[1:] for cells in table_rows(console.export_text())}
    assert rows == {
        "task": ["samples", "loss", "token_accuracy", "exact_match", "yes_no"],
        "a": ["1", rows["a"][1], "1.0000", "1.0000", "-"],
        "b": ["1", rows["b"][1], "0.0000", "-", "1.0000"],
        "mean": ["2", rows["mean"][1], "0.5000", "1.0000", "1.0000"],
    }


def table_rows(text: str) -> list[list[str]]:
    """The cells of each row of a rich table printed as text."""
    return [
        [c.strip() for c in line.strip().strip("│┃").split("│" if "│" in line else "┃")]
        for line in text.splitlines()
        if line.strip()[:1] in "│┃"
    ]


# -- which metrics a task gets -------------------------------------------------------------------


def test_config_overrides_the_index_which_overrides_the_default():
    evaluation = Evaluation(
        metrics={"count": ["vqa_accuracy"], "caption": []}, default_metrics=["exact_match", "vqa_accuracy"]
    )
    index = {"count": ["exact_match"], "compare": ["yes_no"]}
    assert evaluation.choose(["caption", "compare", "count", "shape"], index) == {
        "caption": [],
        "compare": ["yes_no"],
        "count": ["vqa_accuracy"],
        "shape": ["exact_match", "vqa_accuracy"],
    }
    assert Evaluation().generates(fitting=False) and not Evaluation().generates(fitting=True)
    assert Evaluation(generate_in_fit=True).generates(fitting=True) and not Evaluation(generate=False).generates(
        fitting=False
    )


@pytest.mark.parametrize(
    ("evaluation", "message"),
    [
        (
            Evaluation(metrics={"count": ["exact", "yes_no"]}),
            "model.evaluation.metrics['count']: unknown metric(s) 'exact'; "
            "the metrics are exact_match, vqa_accuracy, yes_no",
        ),
        (
            Evaluation(metrics={"count": "exact_match"}),
            "model.evaluation.metrics['count'] must be a list of metric names, got 'exact_match'",
        ),
        (Evaluation(default_metrics=["bleu"]), "model.evaluation.default_metrics: unknown metric(s) 'bleu'"),
        (Evaluation(max_new_tokens=0), "model.evaluation.max_new_tokens must be >= 1, got 0"),
    ],
)
def test_bad_evaluation_settings_are_errors_naming_them(evaluation, message):
    with pytest.raises(ConfigError) as info:
        evaluation.check()
    assert message in str(info.value)


def test_an_unknown_metric_in_the_config_fails_before_any_loading(tmp_path, tiny_model_dirs, capsys):
    config = demo_config(tmp_path, tiny_model_dirs["llava"], "llava", steps=2)
    code, stderr = run_main(capsys, "validate", "--config", str(config), "--model.evaluation.metrics", "{count: [f1]}")
    assert (
        code == 2
        and "model.evaluation.metrics['count']: unknown metric(s) 'f1'; "
        "the metrics are exact_match, vqa_accuracy, yes_no"
        in stderr
    )
    assert "Traceback" not in stderr and not (tmp_path / "shards").exists()


def test_the_index_carries_the_recipes_metrics_and_the_data_module_exposes_them(tmp_path, tiny_model_dirs):
    SyntheticRecipe(samples=10, samples_per_shard=5, tasks=("count", "compare"), prefix="val").build(
        tmp_path / "val", progress=False
    )
    index = json.loads((tmp_path / "val" / "dataset.json").read_text())
    assert index["metrics"] == {"compare": ["yes_no"], "count": ["exact_match"]}  # the tasks built, no others
    data = ShardDataModule(val=str(tmp_path / "val"), processor=tiny_model_dirs["llava"])
    data.setup("validate")
    assert data.index_metrics == {"compare": ["yes_no"], "count": ["exact_match"]}

    index["metrics"]["count"] = ["exact_match", "bleu"]
    (tmp_path / "val" / "dataset.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError) as info:
        ShardDataModule(val=str(tmp_path / "val"), processor=tiny_model_dirs["llava"]).setup("validate")
    assert f"{tmp_path / 'val' / 'dataset.json'}: metrics['count']: unknown metric(s) 'bleu'" in str(info.value)


# -- what evaluation batches carry --------------------------------------------------------------


def test_evaluation_batches_carry_left_padded_prompts_and_references(tiny_model_dirs):
    from test_encode import assistant, image, raw_sample, user

    from mmpeft.data.encode import ChatEncoder

    processor = load_processor(tiny_model_dirs["llava"])
    encoder = ChatEncoder(processor, ["count", "color"], max_length=256)
    raws = [
        raw_sample("a", "count", [user("How many shapes?", images=1), assistant("3")], [image()]),
        raw_sample(
            "b",
            "color",
            [user("A long question about the colour of this shape?", images=1), assistant("red")],
            [image()],
        ),
        raw_sample("c", "color", [user("Colour?", images=1), assistant("red")], [image()]),
    ]
    meta = json.loads(raws[0]["json"])
    raws[0]["json"] = json.dumps({**meta, "references": ["3", "three"]}).encode()
    raws[2]["json"] = json.dumps({**json.loads(raws[2]["json"]), "references": "red"}).encode()  # not a list: skipped

    items = [encoder(raw, prompt=True) for raw in raws]
    assert items[2] is None and encoder.skipped == {"bad_json": 1}
    batch = encoder.collate(items[:2])
    assert batch["references"] == [["3", "three"], ["red"]]  # the JSON's, else the final assistant turn
    prompts = batch["prompt_inputs"]
    for row, sample in enumerate(parse_sample(raw) for raw in raws[:2]):
        text = processor.apply_chat_template(sample.messages[:-1], tokenize=False, add_generation_prompt=True)
        ids = processor(text=[text], images=sample.images, return_tensors="pt")["input_ids"][0]  # (n,)
        assert torch.equal(prompts["input_ids"][row, -len(ids) :], ids)  # left padding: the prompt ends the row
        assert prompts["attention_mask"][row].sum() == len(ids)
    assert prompts["pixel_values"].shape[0] == 2
    assert "prompt_inputs" not in encoder.collate([encoder(raw) for raw in raws[:2]])  # training: nothing extra


def test_only_evaluation_streams_encode_prompts(tmp_path, tiny_model_dirs):
    for split in ("train", "val"):
        SyntheticRecipe(samples=4, samples_per_shard=4, prefix=split).build(tmp_path / split, progress=False)
    data = ShardDataModule(
        train=str(tmp_path / "train"), val=str(tmp_path / "val"), processor=tiny_model_dirs["llava"], batch_size=4
    )
    data.setup("fit")
    assert "prompt_inputs" not in next(iter(data.train_dataloader()))
    val = next(iter(data.val_dataloader()))
    assert val["prompt_inputs"]["input_ids"].shape[0] == 4 and len(val["references"]) == 4
    data.eval_prompts = False  # what the module sets when it generates nothing
    assert "prompt_inputs" not in next(iter(data.val_dataloader()))


# -- end to end ---------------------------------------------------------------------------------

TASKS = ("color", "count", "compare")
NEW_TOKENS = 4
BATCH = 3  # one shard per batch


@dataclass(kw_only=True)
class Answered(SyntheticRecipe):
    """Synthetic samples whose references are the model's own answer (a task's 1st, 3rd, ... sample) or hold it second
    (the others)."""

    answers: tuple[str, ...] = ()

    def record(self, index: int):
        record = super().record(index)
        if record.task != "compare":  # compare keeps its "yes"/"no" as the only reference
            answer = self.answers[index]
            record.references = [answer] if self._order[:index].count(record.task) % 2 == 0 else ["zzz", answer]
        return record


def greedy_answers(model_dir: str, shards: Path) -> tuple[list[str], list[str], list[str]]:
    """Each sample's task, true answer and greedy answer, batched and left-padded as validation batches them."""
    samples = [
        parse_sample(raw)
        for raw in wds.tarfile_samples([{"url": url} for url in resolve_shards(str(shards), "shards")])
    ]
    processor = load_processor(model_dir)
    model = load_backbone(Backbone(pretrained=model_dir), torch.device("cpu")).eval()  # a fresh LoRA adds exactly 0
    answers = []
    for start in range(0, len(samples), BATCH):
        chunk = samples[start : start + BATCH]
        texts = [
            processor.apply_chat_template(s.messages[:-1], tokenize=False, add_generation_prompt=True) for s in chunk
        ]
        inputs = processor(
            text=texts,
            images=[i for s in chunk for i in s.images],
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        answers += processor.batch_decode(tokens[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [s.task for s in samples], [s.messages[-1]["content"][0]["text"] for s in samples], answers


@pytest.mark.slow
@pytest.mark.parametrize(("command", "stage"), [("validate", "val"), ("test", "test")])
def test_validate_and_test_print_a_table_per_task_and_log_every_score(tmp_path, tiny_model_dirs, command, stage):
    model_dir = tiny_model_dirs["llava"]
    recipe = {"samples": 6, "samples_per_shard": BATCH, "tasks": TASKS, "seed": 3, "prefix": "val"}
    SyntheticRecipe(**recipe).build(tmp_path / "plain", progress=False)
    tasks, truths, answers = greedy_answers(model_dir, tmp_path / "plain")
    Answered(**recipe, answers=tuple(answers)).build(tmp_path / "val", progress=False)

    config_path = demo_config(tmp_path, model_dir, "llava", steps=2)
    config = yaml.safe_load(config_path.read_text())
    config["data"].update({"prepare": [], "batch_size": BATCH, stage: str(tmp_path / "val")})
    config["model"]["evaluation"] = {
        "max_new_tokens": NEW_TOKENS,
        "metrics": {"count": ["vqa_accuracy"]},
    }  # count: the config's choice
    config_path.write_text(yaml.safe_dump(config))
    result = mmpeft(command, "--config", str(config_path))
    assert result.returncode == 0, result.stderr[-3000:]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    expected = {
        "color": {"exact_match": 0.5},  # 2 samples: the first's reference is its answer, the second's is not
        "count": {"vqa_accuracy": 1.0},  # the answer is among the references of every sample
        "compare": {
            "yes_no": mean([float(yes_no(a) == truth) for a, t, truth in zip(answers, tasks, truths) if t == "compare"])
        },
    }
    (run_dir,) = (tmp_path / "runs" / "demo").iterdir()
    for task, scores_ in expected.items():
        for name, value in scores_.items():
            assert scalars(run_dir, f"{stage}/{task}/{name}") == [pytest.approx(value)], (task, name)
    for name, task in {
        "exact_match": "color",
        "vqa_accuracy": "count",
        "yes_no": "compare",
    }.items():  # one task each: the mean is its
        assert scalars(run_dir, f"{stage}/{name}") == scalars(run_dir, f"{stage}/{task}/{name}")
    losses = [scalars(run_dir, f"{stage}/{task}/loss")[0] for task in TASKS]
    assert scalars(run_dir, f"{stage}/loss") == [pytest.approx(mean(losses))]
    accuracies = [scalars(run_dir, f"{stage}/{task}/token_accuracy")[0] for task in TASKS]
    assert scalars(run_dir, f"{stage}/token_accuracy") == [pytest.approx(mean(accuracies))]

    rows = {cells[0]: cells[1:] for cells in table_rows(result.stdout)}
    assert rows["task"] == ["samples", "loss", "token_accuracy", "exact_match", "vqa_accuracy", "yes_no"]
    assert set(rows) == {"task", *TASKS, "mean"}
    assert rows["color"] == [
        "2",
        f"{losses[0]:.4f}",
        f"{accuracies[0]:.4f}",
        f"{expected['color']['exact_match']:.4f}",
        "-",
        "-",
    ]
    assert rows["count"] == ["2", f"{losses[1]:.4f}", f"{accuracies[1]:.4f}", "-", "1.0000", "-"]
    assert rows["compare"][3:] == ["-", "-", f"{expected['compare']['yes_no']:.4f}"]
    assert rows["mean"][0] == "6" and rows["mean"][1] == f"{mean(losses):.4f}"
    assert "DataLoader 0" not in result.stdout  # Lightning's own table of every logged name is off
    assert ("validation" if stage == "val" else "test") + ": scores per task (3 tasks)" in result.stdout


def test_a_single_task_is_scored_like_several():
    """torchmetrics squeezes a one-task result to a scalar; validation of a one-task data set crashed on it."""
    metrics = TaskMetrics(["only"], {"only": ["exact_match"]})
    logits = torch.tensor([[0.0, 5.0], [5.0, 0.0], [5.0, 0.0]])  # predicts 1, 0, 0
    metrics.update_forced(
        logits, torch.tensor([1, 1, 0]), torch.zeros(3, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    )
    metrics.update_answers(["Red."], [["red"]], torch.zeros(1, dtype=torch.long))
    results = metrics.compute()
    assert results.tasks["only"]["samples"] == 1.0
    assert results.tasks["only"]["token_accuracy"] == pytest.approx(2 / 3)
    assert results.tasks["only"]["exact_match"] == 1.0
    assert results.mean["exact_match"] == 1.0
