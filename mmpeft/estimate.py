"""``python -m mmpeft estimate --config X [--gpu 12GiB | --gpu rtx4070]``, and ``fit --dry-run``: will it fit?

Reads the same config as ``fit`` (and the same overrides, ``--data.batch_size 2``), builds nothing
but the model's skeleton on the meta device from the checkpoint's ``config.json`` and a worst-case
batch through the checkpoint's processor (no weight is read, nothing is written), and prints:

- the plan of the run's peak memory, line by line (:mod:`mmpeft.planner`);
- whether it fits each common card (8, 12, 16, 24, 48, 80 GB);
- for the card given with ``--gpu`` (or the free memory of this machine's CUDA device), the largest
  ``data.batch_size``, ``data.max_length`` and image resolution that fit, each with the others as
  configured.

The plan is for the device the config trains on (``trainer.accelerator``; CUDA when ``--gpu`` is
given). See docs/memory.md.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmpeft.errors import ConfigError
from mmpeft.files import write_json
from mmpeft.memory import Part, gib
from mmpeft.objective import IGNORE_INDEX
from mmpeft.planner import COMMON_SIZES, Plan, Suggestion, card, plan, suggest

OWN_OPTIONS = {
    "--gpu": True,
    "--images": True,
    "--image-size": True,
    "--json": True,
    "--no-search": False,
    "--overwrite": False,
}
"""The estimate's own options (``True``: takes a value); everything else is ``fit``'s."""


@dataclass
class Report:
    """What ``estimate`` found, as ``--json`` writes it."""

    device: str
    """The device type planned for (``cuda`` or ``cpu``)."""
    parts: list[dict[str, Any]]
    peak: int
    allowance: int
    needed: int
    batch: dict[str, Any]
    """The planned batch: samples, tokens per sample, image tokens, images per sample and their side."""
    cards: dict[str, bool] = field(default_factory=dict)
    """Common card size in GB -> whether the run fits."""
    card: str | None = None
    budget: int | None = None
    suggestions: dict[str, int | None] = field(default_factory=dict)
    not_searched: dict[str, str] = field(default_factory=dict)
    """Settings the search left alone, and why."""


def split_args(argv: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    """The estimate's own options, and the rest (``fit``'s config and overrides)."""
    own: dict[str, str | bool] = {}
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        name, _, value = arg.partition("=")
        if name in OWN_OPTIONS:
            if OWN_OPTIONS[name]:
                value = value or next(args, "")
                if not value:
                    raise ConfigError(f"{name} needs a value")
                own[name] = value
            else:
                own[name] = True
        else:
            rest.append(arg)
    return own, rest


def _positive(own: dict[str, Any], name: str) -> int | None:
    if name not in own:
        return None
    try:
        value = int(own[name])
    except ValueError:
        raise ConfigError(f"{name}: {own[name]!r} is not a whole number") from None
    if value < 0 or (value == 0 and name != "--images"):
        raise ConfigError(f"{name} must be positive, got {value}")
    return value


def parse_config(argv: list[str]):
    """``fit``'s parser on ``argv``: the module and data module as ``fit`` would build them (nothing loaded), and
    the trainer's settings (the trainer itself is not built: its accelerator may be a GPU this machine lacks)."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import LightningArgumentParser

    from mmpeft.data import ShardDataModule
    from mmpeft.flags import readable_parse_error
    from mmpeft.module import MMPeftModule

    class Parser(LightningArgumentParser):
        def error(self, message: str, ex: Exception | None = None):
            raise ConfigError(readable_parse_error(message))

    parser = Parser(prog="python -m mmpeft estimate")
    parser.add_argument("-c", "--config", action="config", help="a fit config (configs/*.yaml)")
    parser.add_argument("--seed_everything", type=bool | int, default=True)
    parser.add_argument("--ckpt_path", type=str | None, default=None)
    parser.add_lightning_class_args(MMPeftModule, "model")
    parser.add_lightning_class_args(ShardDataModule, "data")
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.link_arguments("model.backbone.pretrained", "data.processor")
    parser.link_arguments("model.backbone.trust_remote_code", "data.trust_remote_code")
    config = parser.parse_args(argv)
    trainer = config.pop("trainer")
    built = parser.instantiate(config)
    return built.model, built.data, trainer


def device_type(trainer: Any, gpu: str | None) -> str:
    if gpu is not None:
        return "cuda"
    accelerator = str(getattr(trainer, "accelerator", "auto"))
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def estimate(argv: list[str]) -> Report:
    """Plan the run ``argv`` (``fit``'s arguments plus the estimate's own options) configures."""
    own, rest = split_args(argv)
    module, data, trainer = parse_config(rest)
    gpu = own.get("--gpu")
    label, budget = card(gpu) if isinstance(gpu, str) else (None, None)
    kind = device_type(trainer, gpu if isinstance(gpu, str) else None)
    if budget is None and kind == "cuda" and torch.cuda.is_available():
        label, budget = "free on this CUDA device", torch.cuda.mem_get_info()[0]
    images = _positive(own, "--images")
    module.prepare_data()  # a tiny model the config builds (the demo's) is built first, as fit does
    try:
        batches = data.batches(images=1 if images is None else images, image_side=_positive(own, "--image-size"))
    except OSError as exc:
        raise ConfigError(f"cannot load the processor of data.processor={data.hparams.processor!r}: {exc}") from exc
    accumulating = int(getattr(trainer, "accumulate_grad_batches", 1) or 1) > 1

    def planner(batch: dict[str, Any]) -> Plan:
        try:
            return plan(
                module.backbone,
                module.adapter_groups,
                batch,
                device_type=kind,
                optimizer=module.optim.optimizer,
                speed=module.speed,
                routing=module.routing,
                accumulating=accumulating,
                precision=getattr(trainer, "precision", None),
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot read the config.json of model.backbone.pretrained={module.backbone.pretrained!r}: {exc}"
            ) from exc

    batch = batches(batches.batch_size, batches.max_length, batches.image_side)
    result = planner(batch)
    report = Report(
        device=kind,
        parts=[asdict(part) for part in result.parts],
        peak=result.peak,
        allowance=result.allowance,
        needed=result.needed,
        batch=describe_batch(batch, batches),
        cards={str(size): result.fits(size * 2**30) for size in COMMON_SIZES} if kind == "cuda" else {},
        card=label,
        budget=budget,
    )
    if budget is not None and "--no-search" not in own:
        found: list[Suggestion] = suggest(budget, batches, planner)
        report.suggestions = {s.key: s.value for s in found}
        report.not_searched = {s.key: s.reason for s in found if s.reason}
    return report


def describe_batch(batch: dict[str, Any], batches: Any) -> dict[str, Any]:
    """Samples, tokens, labelled tokens and image tokens of the planned batch."""
    labels = batch["labels"]  # (batch, seq)
    return {
        "samples": int(labels.shape[0]),
        "tokens_per_sample": int(labels.shape[1]),
        "trained_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()),
        "image_tokens_per_sample": batches.image_tokens_in(batch),
        "images_per_sample": batches.images,
        "image_side": batches.image_side,
        "shapes": {k: list(v.shape) for k, v in batch["inputs"].items() if isinstance(v, torch.Tensor)},
    }


def render(report: Report, config: str) -> str:
    """The report as the command prints it."""
    b = report.batch
    side = f" of {b['image_side']} px" if b["image_side"] else ""
    out = [
        f"memory plan of {config} on {report.device.upper() if report.device == 'cuda' else 'a CPU'}: "
        f"{b['samples']} samples x {b['tokens_per_sample']} tokens, {b['images_per_sample']} image(s){side} each "
        f"({b['image_tokens_per_sample']} image tokens per sample)",
        "",
    ]
    plan_ = Plan(
        [Part(**p) for p in report.parts],
        report.device,
        report.allowance,
    )
    out += plan_.lines()
    if report.cards:
        out += [
            "",
            "fits a card of:  " + "   ".join(f"{s} GB {'yes' if ok else 'no'}" for s, ok in report.cards.items()),
        ]
    if report.budget is not None:
        verdict = "fits" if report.needed <= report.budget else "does NOT fit"
        out += ["", f"{report.card} ({gib(report.budget)}): {verdict}"]
        if report.suggestions:
            out.append("largest settings that fit it (one at a time, the others as configured):")
            for key, value in report.suggestions.items():
                if key in report.not_searched:
                    out.append(f"  {key}: not searched ({report.not_searched[key]})")
                else:
                    out.append(f"  {key}: {value if value is not None else 'none fits'}")
    return "\n".join(out)


def cmd_estimate(argv: list[str]) -> int:
    """``python -m mmpeft estimate``: print the memory plan (and write it with ``--json FILE``)."""
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n", 1)[0].strip("`"))
        print(
            "\nusage: python -m mmpeft estimate --config FILE [fit overrides such as --data.batch_size 2]\n"
            "       [--gpu CARD|SIZE (rtx4070, 12GiB)] [--images N (per sample, default 1)]\n"
            "       [--image-size PX (square images; default data.image_resolution or 1024)]\n"
            "       [--no-search] [--json FILE [--overwrite]]\n"
            "python -m mmpeft fit --config FILE --dry-run [the same options]: the same, instead of training"
        )
        return 0
    own, _ = split_args(argv)
    out = own.get("--json")
    if isinstance(out, str) and Path(out).exists() and "--overwrite" not in own:
        raise ConfigError(f"--json: {out} exists; give another file or --overwrite")
    report = estimate(argv)
    configs = [a.partition("=")[2] or v for a, v in zip(argv, [*argv[1:], ""]) if a.startswith(("--config", "-c"))]
    print(render(report, ", ".join(configs) or "the configuration"))
    if isinstance(out, str):
        write_json(out, asdict(report))
    sys.stdout.flush()
    return 0
