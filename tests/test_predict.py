"""``predict``: answers generated with a trained adapter from shards or a JSONL file, written as JSON lines."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image
from test_adapters_common import randomise_b
from test_cli import demo_config, mmpeft, run_main
from test_mixtures import RoutingSnapshots
from transformers import StoppingCriteriaList

from data_recipes.synthetic import SyntheticRecipe
from mmpeft.adapters import AdapterGroup, inject_adapters
from mmpeft.adapters.routing import Router, RoutingContext
from mmpeft.data import ShardDataModule, parse_sample
from mmpeft.data.datamodule import resolve_shards
from mmpeft.errors import ConfigError
from mmpeft.generation import Generation, JsonlWriter
from mmpeft.models.backbone import Backbone, language_model, load_backbone, load_processor
from mmpeft.module import MMPeftModule
from mmpeft.saving import AdapterSpec, apply_adapter, base_summary, save_adapter, trainable_tensors

CPU = torch.device("cpu")
BATCH = 3  # the shards hold 3 samples each, and a batch never spans two shards
NEW_TOKENS = 6
ADAPTERS = {
    "lora": AdapterGroup("lora", ["all-linear"], {"r": 16, "alpha": 32, "dropout": 0.0}),  # configs/demo.yaml's
    "asymlora": AdapterGroup("asymlora", ["all-linear"], {"r": 4, "heads": 3, "routing": "instance", "dropout": 0.0}),
    "moelora": AdapterGroup("moelora", ["all-linear"], {"r": 2, "experts": 4, "top_k": 2, "dropout": 0.0}),
    "mixlora": AdapterGroup("mixlora", ["all-linear"], {"r": 4, "factors": 8, "dropout": 0.0}),
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("predict") / "shards"
    SyntheticRecipe(samples=6, samples_per_shard=3, seed=5, prefix="val").build(out, progress=False)
    return str(out)


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dirs, tmp_path_factory, shards) -> dict[tuple[str, str], str]:
    """Adapter directories as fit writes them, with random B tensors so that each adapter changes the answers."""
    tasks = json.loads((Path(shards) / "dataset.json").read_text())["tasks"]
    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for family, name in [("llava", name) for name in ADAPTERS] + [("qwen2_vl", "mixlora")]:
        model = load_backbone(Backbone(pretrained=tiny_model_dirs[family]), CPU)
        torch.manual_seed(0)
        inject_adapters(language_model(model), [ADAPTERS[name]], RoutingContext())
        randomise_b(model, seed=2)
        spec = AdapterSpec([ADAPTERS[name]], tiny_model_dirs[family], base_summary(model.config), tasks).resolved()
        dirs[family, name] = str(save_adapter(root / f"{family}-{name}", spec, trainable_tensors(model)))
    return dirs


def module(tiny_model_dirs, adapter_dirs, family: str = "llava", name: str = "lora", **generation) -> MMPeftModule:
    generation = Generation(**{"max_new_tokens": NEW_TOKENS, **generation})
    return MMPeftModule(
        Backbone(pretrained=tiny_model_dirs[family]), init_adapter=adapter_dirs[family, name], generation=generation
    )


def predict(
    model: MMPeftModule, data: ShardDataModule, root: Path, *callbacks: L.Callback, output: Path | None = None
) -> list[dict]:
    """``trainer.predict`` as the CLI runs it (the JSONL writer as a callback); the file's rows."""
    writer = JsonlWriter(None if output is None else str(output))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=str(root),
        callbacks=[writer, *callbacks],
    )
    trainer.predict(model, data, return_predictions=False)
    assert writer.path == (output or root / "predictions.jsonl") and not Path(f"{writer.path}.partial").exists()
    return [json.loads(line) for line in writer.path.read_text(encoding="utf-8").splitlines()]


def data(tiny_model_dirs, spec: str, family: str = "llava", **kwargs) -> ShardDataModule:
    return ShardDataModule(predict=spec, processor=tiny_model_dirs[family], **{"batch_size": BATCH, **kwargs})


def decode(processor, tokens: torch.Tensor, prompt_len: int) -> list[str]:
    """The new tokens' text as mmpeft gives it: decoded, without the leading space of the first word."""
    return [text.lstrip() for text in processor.batch_decode(tokens[:, prompt_len:], skip_special_tokens=True)]


# -- the command line -----------------------------------------------------------------------


@pytest.mark.slow
def test_cli_predict_on_shards_gives_what_transformers_generate_gives(tmp_path, tiny_model_dirs, adapter_dirs, shards):
    """The demo's training config plus `model.init_adapter`: one line per sample, the answers of a plain `generate`."""
    config_path = demo_config(tmp_path, tiny_model_dirs["llava"], "llava", steps=2)
    config = yaml.safe_load(config_path.read_text())
    config["model"].update(init_adapter=adapter_dirs["llava", "lora"], generation={"max_new_tokens": NEW_TOKENS})
    config["data"].update(predict=shards, prepare=[], batch_size=BATCH)
    config_path.write_text(yaml.safe_dump(config))
    output = tmp_path / "out" / "answers.jsonl"
    result = mmpeft("predict", "--config", str(config_path), "--predictions.output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert not Path(f"{output}.partial").exists()

    # The same prompts, batched and left-padded by the processor itself, through transformers' generate.
    samples = [
        parse_sample(raw) for raw in wds.tarfile_samples([{"url": url} for url in resolve_shards(shards, "shards")])
    ]
    processor = load_processor(tiny_model_dirs["llava"])
    model = load_backbone(Backbone(pretrained=tiny_model_dirs["llava"]), CPU).eval()
    apply_adapter(model, adapter_dirs["llava", "lora"])
    expected = []
    for start in range(0, len(samples), BATCH):
        chunk = samples[start : start + BATCH]
        texts = [
            processor.apply_chat_template(s.messages[:-1], tokenize=False, add_generation_prompt=True) for s in chunk
        ]
        images = [image for s in chunk for image in s.images]
        inputs = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
        tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        expected += decode(processor, tokens, inputs["input_ids"].shape[1])

    assert len(rows) == len(samples) == 6
    assert [r["answer"] for r in rows] == expected
    assert all(r["answer"] for r in rows)
    assert [r["key"] for r in rows] == [s.key for s in samples]
    assert [r["task"] for r in rows] == [s.task for s in samples]
    last_text = lambda message: "\n".join(p["text"] for p in message["content"] if p["type"] == "text")  # noqa: E731
    assert [r["reference"] for r in rows] == [last_text(s.messages[-1]) for s in samples]
    assert [r["prompt"] for r in rows] == [
        last_text([m for m in s.messages if m["role"] == "user"][-1]) for s in samples
    ]


# -- every adapter ----------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "name"), [("llava", name) for name in ADAPTERS] + [("qwen2_vl", "mixlora")])
def test_every_adapter_predicts_what_uncached_generation_gives_and_not_the_base_models_answers(
    tmp_path, tiny_model_dirs, adapter_dirs, shards, family, name
):
    model = module(tiny_model_dirs, adapter_dirs, family, name)
    dm = data(tiny_model_dirs, shards, family)
    rows = predict(model, dm, tmp_path)
    assert len(rows) == 6 and not model.model.training
    assert not any(p.requires_grad for p in model.parameters())

    # The KV cache with routing computed once per prompt gives what recomputing everything at every token gives.
    processor = dm.encoder.processor
    uncached, base_answers = [], []
    base = load_backbone(Backbone(pretrained=tiny_model_dirs[family]), CPU).eval()
    for batch in dm.predict_dataloader():
        inputs, prompt_len = batch["inputs"], batch["inputs"]["input_ids"].shape[1]
        tokens = model.routing_context.generate(
            model.model,
            **inputs,
            routing_mask=batch["routing_mask"],  # what predict routes on: the tokens before the first answer
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            use_cache=False,
        )
        uncached += decode(processor, tokens, prompt_len)
        base_answers += decode(
            processor, base.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False), prompt_len
        )
    answers = [r["answer"] for r in rows]
    assert answers == uncached
    assert sum(a != b for a, b in zip(answers, base_answers)) >= 3, (answers, base_answers)


def test_beam_search_routes_every_beam_as_its_own_prompt(tmp_path, tiny_model_dirs, adapter_dirs, shards):
    """Instance routing (here per-sequence AsymLoRA) pools over each prompt's own tokens, left padding excluded,
    whatever the number of beams."""
    model = module(tiny_model_dirs, adapter_dirs, name="asymlora", num_beams=2)
    dm = data(tiny_model_dirs, shards)
    assert len(predict(model, dm, tmp_path)) == 6
    batch = next(iter(dm.predict_dataloader()))
    inputs = batch["inputs"]
    assert not inputs["attention_mask"].all()  # prompts of different lengths, padded on the left
    routed = {}
    for beams in (1, 2):
        snapshots = RoutingSnapshots(model.routing_context)
        model.routing_context.generate(
            model.model,
            **inputs,
            max_new_tokens=3,
            num_beams=beams,
            stopping_criteria=StoppingCriteriaList([snapshots]),
        )
        assert snapshots.reused()
        routed[beams] = snapshots.steps[0]
    assert (
        len(routed[1]) == sum(isinstance(m, Router) for m in model.model.modules()) > 0
    )  # one instance router per adapted layer
    for router, gate in routed[1].items():  # (batch, 1, heads)
        torch.testing.assert_close(routed[2][router], gate.repeat_interleave(2, dim=0))


# -- JSONL input, errors, sampling, the file ---------------------------------------------------


def write_png(path: Path, color: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (30, 24), color).save(path)
    return path


def test_jsonl_prompts_with_image_paths(tmp_path, tiny_model_dirs, adapter_dirs):
    folder = tmp_path / "in"
    write_png(folder / "img" / "red.png", (220, 20, 20))
    blue = write_png(tmp_path / "elsewhere" / "blue.png", (20, 20, 220))
    records = [
        {
            "id": "q1",
            "task": "color",
            "images": ["img/red.png"],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]},
                {"role": "assistant", "content": "red"},
            ],
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": str(blue)}, {"type": "text", "text": "Où est le carré ?"}],
                }
            ]
        },
        {
            "id": "q3",
            "images": ["img/red.png", str(blue)],
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "<image><image>Same colour?"},
            ],
        },
    ]
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")

    # One record a batch, two dataloader workers taking turns: the file's order all the same.
    dm = data(tiny_model_dirs, str(prompts), batch_size=1, num_workers=2)
    rows = predict(module(tiny_model_dirs, adapter_dirs), dm, tmp_path)  # to the default output
    assert [r["key"] for r in rows] == ["q1", "line 2", "q3"]
    assert [r["task"] for r in rows] == [
        "color",
        "prompts",
        "prompts",
    ]  # no task: the file's stem, as the chat recipe does
    assert [r["prompt"] for r in rows] == ["What color is it?", "Où est le carré ?", "Same colour?"]
    assert [r.get("reference") for r in rows] == ["red", None, None]
    assert all(r["answer"] for r in rows)
    assert "Où est le carré ?" in (tmp_path / "predictions.jsonl").read_text(encoding="utf-8")  # UTF-8, not \u escapes


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            {"id": "q2", "images": ["img/missing.png"], "messages": [{"role": "user", "content": "<image>Hi?"}]},
            "line 2 (id 'q2'): missing_image: {folder}/img/missing.png",
        ),
        (
            {"id": "q2", "images": [], "messages": [{"role": "user", "content": "<image>Hi?"}]},
            "line 2 (id 'q2'): image_count_mismatch",
        ),
        ('{"id": "q2", "messages": [', "line 2: bad_json"),
    ],
    ids=["missing-image", "image-count", "malformed-json"],
)
def test_a_bad_jsonl_line_stops_the_cli_naming_file_line_and_id(
    tmp_path, tiny_model_dirs, adapter_dirs, capsys, line, message
):
    folder = tmp_path / "in"
    write_png(folder / "img" / "red.png", (220, 20, 20))
    good = {"id": "q1", "images": ["img/red.png"], "messages": [{"role": "user", "content": "<image>What?"}]}
    prompts = folder / "prompts.jsonl"
    prompts.write_text(
        json.dumps(good) + "\n" + (line if isinstance(line, str) else json.dumps(line)) + "\n", encoding="utf-8"
    )
    config = demo_config(tmp_path, tiny_model_dirs["llava"], "llava", steps=2)
    code, stderr = run_main(
        capsys,
        "predict",
        "--config",
        str(config),
        "--model.init_adapter",
        adapter_dirs["llava", "lora"],
        "--data.prepare",
        "[]",
        "--data.predict",
        str(prompts),
        "--predictions.output",
        str(tmp_path / "out.jsonl"),
    )
    assert code == 2, stderr[-2000:]
    assert f"error: {prompts}, " + message.format(folder=folder) in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.partial").exists()


def test_sampling_repeats_with_the_same_seed(tmp_path, tiny_model_dirs, adapter_dirs, shards):
    """As the CLI runs it: seed_everything, then the model is built and loaded, then sampled from."""
    answers = {}
    for run, seed in enumerate([3, 3, 4]):
        L.seed_everything(seed)
        model = module(tiny_model_dirs, adapter_dirs, do_sample=True, temperature=1.5, top_p=0.95)
        answers[run] = [r["answer"] for r in predict(model, data(tiny_model_dirs, shards), tmp_path / str(run))]
    model.generation = Generation(max_new_tokens=NEW_TOKENS)  # the same model, decoded greedily
    greedy = [r["answer"] for r in predict(model, data(tiny_model_dirs, shards), tmp_path / "greedy")]
    assert answers[0] == answers[1]
    assert answers[0] != answers[2] and answers[0] != greedy


class FailAfterFirstBatch(L.Callback):
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        raise RuntimeError("crash after the first batch")


def test_a_crash_leaves_the_partial_file_and_no_final_one(tmp_path, tiny_model_dirs, adapter_dirs, shards):
    output = tmp_path / "answers.jsonl"
    with pytest.raises(RuntimeError, match="crash after the first batch"):
        predict(
            module(tiny_model_dirs, adapter_dirs),
            data(tiny_model_dirs, shards),
            tmp_path,
            FailAfterFirstBatch(),
            output=output,
        )
    assert not output.exists()
    partial = [json.loads(line) for line in Path(f"{output}.partial").read_text(encoding="utf-8").splitlines()]
    assert len(partial) == BATCH and all(r["answer"] for r in partial)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_new_tokens": 0}, "model.generation.max_new_tokens must be >= 1, got 0"),
        ({"temperature": 0.0}, "model.generation.temperature must be > 0"),
        ({"top_p": 1.5}, "model.generation.top_p must be in (0, 1], got 1.5"),
        ({"num_beams": 0}, "model.generation.num_beams must be >= 1"),
    ],
)
def test_bad_generation_settings_are_named(tiny_model_dirs, settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("]", r"\]")):
        MMPeftModule(Backbone(pretrained=tiny_model_dirs["llava"]), generation=Generation(**settings))


def test_predict_needs_data_predict(tiny_model_dirs, shards):
    dm = ShardDataModule(test=shards, processor=tiny_model_dirs["llava"])
    with pytest.raises(ConfigError, match=r"data\.predict is not set; `predict` needs it"):
        dm.setup("predict")
