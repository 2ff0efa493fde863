"""The family conformance table: one row per supported family, the same checks for every row.

Each family's tiny checkpoint (``python -m mmpeft tiny-model --family F``: the real model and
processor classes, the real checkpoint's chat template) goes through what a user's checkpoint goes
through:

1. ``load``: the processor keeps every setting it saved; the model loads in NF4.
2. ``encode``: the labelled tokens decode to exactly each assistant turn's text and its
   end-of-turn token, for one turn and several, with 0, 1 and 2 images; ``max_length``
   truncates, or skips a sample it would cut through image tokens.
3. ``batch``: a batch of samples with images of different sizes equals the processor's own batch.
4. ``inject``: LoRA on ``attention`` and AsymLoRA on ``mlp`` (the aliases) wrap the language model's
   layers and nothing outside it.
5. ``step``: one training step gives a finite loss and a non-zero gradient in every adapter tensor.
6. ``causal``: no trained token sees a later one (the batch's attention inputs, token types included).
7. ``generate``: greedy generation with the KV cache gives the tokens generation without it gives.
8. ``save/load``: the adapter directory reloads onto a fresh NF4 model with the same logits.
9. ``export``: the PEFT export gives PeftModel the same logits.

``test_fit_from_shards`` then builds tar shards with the chat recipe, checks them with
``data inspect --processor``, trains each family through ``python -m mmpeft fit`` (batch size 2,
mixed image sizes, a multi-turn and a two-image sample, none skipped), validates with generation
and exports. The table of results is printed at the end of the run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_encode import assistant, target_runs, user

from mmpeft.adapters import AdapterGroup, inject_adapters
from mmpeft.adapters.base import AdaptedLinear
from mmpeft.adapters.routing import RoutingContext, RoutingLosses, routing_losses, weighted_sum
from mmpeft.data.encode import ChatEncoder
from mmpeft.data.sample import Sample, SampleError
from mmpeft.export import export_peft
from mmpeft.models.backbone import Backbone, language_model, load_backbone, load_processor
from mmpeft.models.tiny import FAMILIES
from mmpeft.objective import IGNORE_INDEX, lm_losses, routed
from mmpeft.saving import AdapterSpec, apply_adapter, base_summary, save_adapter, trainable_tensors

CPU = torch.device("cpu")
REFUSED = {
    # Its image processor exists only as a torchvision class, and no torchvision build works beside
    # the CPU torch this project pins (docs/families.md).
    "phi4_multimodal": r"needs a package that is not installed: .*Phi4MultimodalImageProcessor.*torchvision",
}
SUPPORTED = [family for family in FAMILIES if family not in REFUSED]
TASKS = ["colour", "shape"]
CHECKS = ("load", "encode", "batch", "inject", "step", "causal", "generate", "save/load", "export", "fit")
RESULTS: dict[str, dict[str, str]] = {}
"""family -> check -> "ok" or the failure, printed as the table by conftest's terminal summary."""

# What each family's template writes right after an assistant's text: the end-of-turn token the
# model must learn to emit. It is trained; the role header before the text and the newline after are not.
END_OF_TURN = {
    "llava": "</s>",
    "qwen2_vl": "<|im_end|>",
    "llava_next": "</s>",
    "llava_onevision": "<|im_end|>",
    "qwen2_5_vl": "<|im_end|>",
    "qwen3_vl": "<|im_end|>",
    "mllama": "<|eot_id|>",
    "idefics3": "<end_of_utterance>",
    "smolvlm": "<end_of_utterance>",
    "gemma3": "<end_of_turn>",
    "paligemma": "<eos>",
    "internvl": "<|im_end|>",
    "mistral3": "</s>",
    "phi4_multimodal": "<|end|>",
}


# PaliGemma has no chat template: its processor takes the prompt and, for training, the answer as a
# ``suffix`` (a prefix-LM). Only a chat's last answer is trained, and every sample needs an image.
PREFIX_LM = {"paligemma"}


def picture(size: tuple[int, int], colour=(200, 30, 30)) -> Image.Image:
    image = Image.new("RGB", size, (255, 255, 255))
    image.paste(colour, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    return image


# (key, task, messages, image sizes): one turn and one image; several turns and two images of other
# sizes and aspect ratios; text only.
CHATS = [
    ("one", "colour", [user("What colour is the square?", 1), assistant("red")], [(40, 30)]),
    (
        "multi",
        "shape",
        [
            user("What shape is in the first picture?", 1),
            assistant("A square."),
            user("And in this one?", 1),
            assistant("It is a square too."),
        ],
        [(23, 61), (64, 64)],
    ),
    ("text", "colour", [user("Say yes."), assistant("yes")], []),
]


def sample(key: str, task: str, messages: list, sizes: list) -> Sample:
    return Sample(key, task, messages, [picture(size) for size in sizes])


def record(family: str, check: str, outcome: str = "ok") -> None:
    RESULTS.setdefault(family, {})[check] = outcome


def image_chats(family: str) -> list:
    return [chat for chat in CHATS if chat[3]]


def chats(family: str) -> list:
    """The CHATS the family takes: all of them, those with images for a prefix-LM."""
    return image_chats(family) if family in PREFIX_LM else CHATS


@pytest.fixture(scope="module")
def checked():
    """The families whose in-process checks passed, so the CLI run reports a clear prerequisite failure."""
    return set()


@pytest.mark.parametrize("family", SUPPORTED)
def test_family_conformance(family, tiny_model_dirs, tmp_path, checked):
    base = tiny_model_dirs[family]

    # 1. load: every setting the processor saved survives loading; the model loads in NF4.
    processor = load_processor(base)
    saved = (
        json.loads((Path(base) / "processor_config.json").read_text())
        if (Path(base) / "processor_config.json").is_file()
        else {}
    )
    for key, value in saved.items():
        if not isinstance(value, dict) and key not in ("processor_class", "auto_map"):
            assert getattr(processor, key) == value, f"processor setting {key} lost on load"
    record(family, "load")

    # 2. encode: labels are exactly each assistant turn (its text and end-of-turn token).
    encoder = ChatEncoder(processor, TASKS, max_length=4096)
    assert encoder.prefix_lm == (family in PREFIX_LM)
    items = {}
    for key, task, messages, sizes in chats(family):
        item = encoder.encode(sample(key, task, messages, sizes))
        labels, ids = item["labels"], item["tokens"]["input_ids"]
        trained = labels != IGNORE_INDEX
        assert torch.equal(labels[trained], ids[trained])
        decoded = [processor.tokenizer.decode(run) for run in target_runs(labels)]
        expected = [m["content"][0]["text"] + END_OF_TURN[family] for m in messages if m["role"] == "assistant"]
        expected = expected[-1:] if family in PREFIX_LM else expected
        assert [d.lstrip() for d in decoded] == expected, key
        assert all(d == d.lstrip() or d[: len(d) - len(d.lstrip())].isspace() for d in decoded)
        items[key] = item
    if family in PREFIX_LM:
        with pytest.raises(SampleError, match="processor_refused"):
            encoder.encode(sample(*CHATS[-1]))  # text only
    # max_length: a cut in the last answer truncates; a cut through image tokens skips the sample.
    multi = sample(*CHATS[1])
    full = items["multi"]["labels"].numel()
    short = ChatEncoder(processor, TASKS, max_length=full - 2).encode(multi)
    assert torch.equal(short["labels"], items["multi"]["labels"][: full - 2])
    assert all(value.shape[0] == full - 2 for value in short["tokens"].values())
    image_positions = torch.isin(items["multi"]["tokens"]["input_ids"], encoder.image_token_ids).nonzero()
    with pytest.raises(SampleError, match="cuts_image_tokens"):
        ChatEncoder(processor, TASKS, max_length=int(image_positions[len(image_positions) // 2])).encode(multi)
    record(family, "encode")

    # 3. batch: samples with images of other sizes batch as the processor batches them (per-token
    # inputs at the real tokens: Mllama's processor extends the last image's cross-attention over the padding).
    batch = encoder.collate(list(items.values()))
    texts = [item["text"] for item in items.values()]
    images = [[picture(size) for size in sizes] for *_, sizes in chats(family)]
    extra = (
        {"suffix": [messages[-1]["content"][0]["text"] for _, _, messages, _ in chats(family)]}
        if encoder.prefix_lm
        else {}
    )
    theirs = processor(
        text=texts,
        images=images,
        padding=True,
        return_tensors="pt",
        add_special_tokens=encoder.adds_special_tokens(texts[0]),
        **extra,
    )
    theirs.pop("labels", None)
    ours_real, theirs_real = batch["inputs"]["attention_mask"].bool(), theirs["attention_mask"].bool()
    for name, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert name in batch["inputs"], f"{name} missing from the batch"
            ours = batch["inputs"][name]
            if value.shape[:2] == theirs_real.shape:  # per token: the real tokens, whichever side the processor pads
                ours, value = ours[ours_real], value[theirs_real]
            torch.testing.assert_close(ours, value, msg=lambda m, name=name: f"{name}: {m}")
    assert batch["labels"].shape == batch["inputs"]["input_ids"].shape
    record(family, "batch")

    # 4. inject: LoRA on attention, AsymLoRA on the MLP, by alias, only in the language model.
    model = load_backbone(Backbone(base), CPU)
    lm = language_model(model)
    context = routing_context()
    groups = [AdapterGroup("lora", ["attention"], {"r": 4}), AdapterGroup("asymlora", ["mlp"], {"r": 4, "heads": 2})]
    wrapped = inject_adapters(lm, groups, context)
    names = {name.rsplit(".", 1)[-1] for name in wrapped}
    kinds = {layer.adapter_name for layer in wrapped.values()}
    assert kinds == {"lora", "asymlora"} and names, names
    adapted = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
    assert len(adapted) == len(wrapped)  # none outside the language model
    record(family, "inject")

    # 5. step: finite loss, every adapter tensor gets a gradient.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapted:
            for name, param in layer.adapter.named_parameters():
                if name.startswith("B"):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.train()
    inputs, labels = batch["inputs"], batch["labels"]
    with routed(context, batch):
        loss, _ = lm_losses(model, inputs, labels)
        extra = weighted_sum(routing_losses(context, RoutingLosses()), RoutingLosses())
    total = loss + extra if extra is not None else loss
    total.backward()
    assert torch.isfinite(loss)
    params = {f"{i}.{name}": p for i, layer in enumerate(adapted) for name, p in layer.adapter.named_parameters()}
    dead = [
        name
        for name, p in params.items()
        if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0
    ]
    assert not dead, f"no gradient in {dead[:5]}"
    record(family, "step")

    # 6. causal: no trained token sees a later one (PaliGemma's answer must not, as it would
    # with all-zero token types). Changing the last trained token leaves every earlier logit alone.
    model.eval()
    last = int((labels[0] != IGNORE_INDEX).nonzero().max())
    changed = {name: value.clone() for name, value in inputs.items()}
    words = [
        t
        for t in processor.tokenizer.encode(" dog cat", add_special_tokens=False)
        if t != changed["input_ids"][0, last]
    ]
    changed["input_ids"][0, last] = words[0]  # a text token, never an image placeholder
    with torch.no_grad():
        outputs = []
        for batch_inputs in (inputs, changed):
            with routed(context, batch):
                outputs.append(model(**batch_inputs, use_cache=False).logits[0, :last])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)
    record(family, "causal")

    # 7. generate: the KV cache changes nothing in greedy decoding.
    prompts = encoder._pad([encoder.encode_prompt(sample(*chat)) for chat in image_chats(family)], left=True)
    with torch.no_grad():
        cached = context.generate(model, **prompts, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = context.generate(model, **prompts, max_new_tokens=4, do_sample=False, use_cache=False)
    assert cached.shape[1] > prompts["input_ids"].shape[1]
    torch.testing.assert_close(cached, uncached)
    record(family, "generate")

    # 8. save/load: the adapter directory gives a fresh NF4 model the same logits.
    spec = AdapterSpec(groups, base, base_summary(model.config), TASKS, False).resolved()
    directory = save_adapter(tmp_path / "adapter", spec, trainable_tensors(model))
    with torch.no_grad(), routed(context, batch):
        before = model(**inputs, use_cache=False).logits
    fresh = load_backbone(Backbone(base, gradient_checkpointing=False), CPU).eval()
    fresh_context = routing_context()
    apply_adapter(fresh, directory, fresh_context)
    with torch.no_grad(), routed(fresh_context, batch):
        after = fresh(**inputs, use_cache=False).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    record(family, "save/load")

    # 9. export: PEFT's LoRA from mmpeft's gives the same logits on the unquantized base.
    from peft import PeftModel

    lora = write_lora(tmp_path / "lora", base)
    export_peft(lora, tmp_path / "peft", quantization="none", progress=lambda _: None)
    plain = load_backbone(Backbone(base, quantization="none", gradient_checkpointing=False), CPU).eval()
    apply_adapter(plain, lora, RoutingContext())
    auto = type(plain)
    peft_model = PeftModel.from_pretrained(
        auto.from_pretrained(base, dtype=torch.float32), str(tmp_path / "peft")
    ).eval()
    with torch.no_grad():
        ours, theirs = plain(**inputs, use_cache=False).logits, peft_model(**inputs, use_cache=False).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(theirs[real], ours[real], rtol=0, atol=1e-4)
    record(family, "export")
    checked.add(family)


def routing_context() -> RoutingContext:
    context = RoutingContext()
    context.num_tasks = len(TASKS)
    return context


def write_lora(out: Path, base: str) -> Path:
    """A LoRA on every linear layer of the language model with random B, saved as training saves it."""
    model = load_backbone(Backbone(base, quantization="none", gradient_checkpointing=False), CPU)
    groups = [AdapterGroup("lora", ["all-linear"], {"r": 4})]
    inject_adapters(language_model(model), groups, RoutingContext())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, AdaptedLinear):
                layer.adapter.B.copy_(torch.randn(layer.adapter.B.shape, generator=generator) * 0.1)
    spec = AdapterSpec(groups, base, base_summary(model.config), TASKS, False).resolved()
    return save_adapter(out, spec, trainable_tensors(model))


def write_chats(folder: Path, copies: int) -> Path:
    """A JSONL of chat records with PNG images of several sizes: the CHATS with images, ``copies`` times each."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for n in range(copies):
        for key, task, messages, sizes in CHATS:
            if not sizes:
                continue
            paths = []
            for k, size in enumerate(sizes):
                path = folder / f"{key}{n}-{k}.png"
                picture((size[0] + n, size[1] + 2 * n), colour=(40 * n % 255, 90, 200)).save(path)
                paths.append(path.name)
            lines.append(json.dumps({"id": f"{key}{n}", "task": task, "images": paths, "messages": messages}))
    src = folder / "chats.jsonl"
    src.write_text("\n".join(lines) + "\n")
    return src


FIT_CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  precision: 32-true
  max_steps: 2
  val_check_interval: 2
  check_val_every_n_epoch: null
  limit_val_batches: 1
  num_sanity_val_steps: 0
  log_every_n_steps: 1
  enable_progress_bar: false
  default_root_dir: {root}
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {root}/runs, name: fit}}
model:
  backbone: {{pretrained: {base}}}
  adapters:
    - {{name: lora, targets: [attention], config: {{r: 4}}}}
    - {{name: asymlora, targets: [mlp], config: {{r: 4, heads: 2}}}}
  optim: {{lr: 1.0e-3, warmup: 0}}
  evaluation: {{generate_in_fit: true, max_new_tokens: 3}}
data:
  train: {root}/shards
  val: {root}/shards
  batch_size: 2
  max_length: 4096
  max_skip_fraction: 0.0
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", SUPPORTED)
def test_fit_from_shards(family, tiny_model_dirs, tmp_path, capsys):
    """Shards built by the chat recipe, then ``fit`` (batch size 2, mixed image sizes), validation with generation,
    and the PEFT export."""
    from test_cli import run_main, scalars

    base = tiny_model_dirs[family]
    src = write_chats(tmp_path / "src", copies=2)
    code, err = run_main(
        capsys, "data", "build", "chat", "--src", str(src), "--out", str(tmp_path / "shards"), "--progress", "false"
    )
    assert code == 0, err
    code, err = run_main(
        capsys,
        "data",
        "inspect",
        str(tmp_path / "shards"),
        "--processor",
        base,
        "--json",
        str(tmp_path / "inspect.json"),
        "--no-progress",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "inspect.json").read_text())
    assert report["usable"] == report["samples_read"] == 4 and report["skipped"] == {}
    (tmp_path / "fit.yaml").write_text(FIT_CONFIG.format(root=tmp_path, base=base))
    code, err = run_main(capsys, "fit", "--config", str(tmp_path / "fit.yaml"))
    assert code == 0, err
    run = tmp_path / "runs" / "fit" / "version_0"
    losses = scalars(run, "train/loss")
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    logged = tags(run)
    assert not [tag for tag in logged if tag.startswith("data/skipped")]  # no sample skipped
    assert {"val/colour/exact_match", "val/shape/exact_match"} <= set(logged)  # both samples' generated answers scored
    assert (run / "adapter" / "adapter.safetensors").is_file()
    code, err = run_main(
        capsys,
        "export",
        "--format",
        "peft",
        "--adapter",
        str(run / "adapter"),
        "--out",
        str(tmp_path / "peft"),
        "--task",
        "colour",
        "--data",
        str(tmp_path / "shards"),
    )
    assert code == 0, err
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    record(family, "fit")


def tags(run: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = run.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return accumulator.Tags()["scalars"]


@pytest.mark.parametrize("family", list(REFUSED))
def test_a_family_that_cannot_run_here_is_refused_with_the_reason(family, tiny_model_dirs, tmp_path, capsys):
    """Through the CLI: exit 2 and one line that names what is missing, before any training."""
    import re

    from test_cli import run_main

    base = tiny_model_dirs[family]
    src = write_chats(tmp_path / "src", copies=1)
    assert (
        run_main(
            capsys, "data", "build", "chat", "--src", str(src), "--out", str(tmp_path / "shards"), "--progress", "false"
        )[0]
        == 0
    )
    (tmp_path / "fit.yaml").write_text(FIT_CONFIG.format(root=tmp_path, base=base))
    code, err = run_main(capsys, "fit", "--config", str(tmp_path / "fit.yaml"))
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert re.search(REFUSED[family], line), line
    assert not (tmp_path / "runs" / "fit" / "version_0" / "adapter").exists()
    record(family, "load", "refused")


GENERATION_PROMPT_NOT_A_PREFIX = {"llava_onevision"}
"""Templates whose finished assistant turn starts otherwise than their generation prompt (LLaVA-OneVision writes
``assistant \\n`` after a turn's header, ``assistant\\n`` as the generation prompt)."""


@pytest.mark.parametrize("family", [family for family in SUPPORTED if family not in PREFIX_LM])
def test_training_targets_start_where_generation_starts(family, tiny_model_dirs):
    """Generation continues the generation prompt, so training must target every token after it: the last answer's
    labels start exactly where the prompt's tokens end, and what the template writes between them (LLaVA's space
    after ``ASSISTANT:``) is a target too. The answer starts with a letter no tokenizer here merges with the space
    before it, so that space is a token of its own (it never was a target before, and generation then never wrote
    it: the conflict suite's ``jaune``). LLaVA-OneVision's template has its own difference (see above)."""
    processor = load_processor(tiny_model_dirs[family])
    encoder = ChatEncoder(processor, TASKS, max_length=4096)
    chat = Sample("k", TASKS[0], [user("Name it."), assistant("Zq 42")], [])
    item = encoder.encode(chat)
    ids, labels = item["tokens"]["input_ids"], item["labels"]
    prompt = encoder.encode_prompt(chat)["tokens"]["input_ids"]  # (P,): the generation prompt
    first = int((labels != IGNORE_INDEX).nonzero()[0])
    decode = processor.tokenizer.decode
    if family in GENERATION_PROMPT_NOT_A_PREFIX:
        assert not torch.equal(ids[: len(prompt)], prompt)
        assert decode(ids[first:]).startswith("Zq 42")
        return
    assert torch.equal(ids[: len(prompt)], prompt)
    assert first == len(prompt), decode(ids[len(prompt) : first])
    last = int((labels != IGNORE_INDEX).nonzero()[-1])
    assert (labels[first : last + 1] != IGNORE_INDEX).all()  # one run, to the end of the turn
    assert decode(ids[first:]).strip().startswith("Zq 42")
