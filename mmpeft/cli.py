"""``python -m mmpeft``: LightningCLI's fit/validate/test/predict plus a few tools beside them.

    python -m mmpeft fit --config configs/demo.yaml
    python -m mmpeft adapters                     # registered adapter plugins
    python -m mmpeft tiny-model --family llava --out DIR
    python -m mmpeft data build RECIPE --out DIR ...  # make shards; `data inspect DIR` looks inside
    python -m mmpeft merge --adapter DIR --out DIR    # fold the adapter into the base: a transformers checkpoint
    python -m mmpeft export --format peft --adapter DIR --out DIR  # the adapter as a PEFT LoRA
    python -m mmpeft report RUN_DIR                 # one HTML page of a run's logs (docs/monitoring.md)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from mmpeft import registry
from mmpeft.errors import MMPeftError


def run_lightning_cli(args: list[str] | None) -> None:
    """LightningCLI's fit/validate/test/predict on the mmpeft module and data module.

    Imported here, not at module level: Lightning takes seconds to import and the tools
    beside it (``adapters``, ``tiny-model``) do not need it.
    """
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    from mmpeft.data import ShardDataModule
    from mmpeft.module import MMPeftModule

    class MMPeftCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # The data is encoded by the model's own processor unless the config says otherwise.
            parser.link_arguments("model.backbone.pretrained", "data.processor")
            parser.link_arguments("model.backbone.trust_remote_code", "data.trust_remote_code")

        def instantiate_trainer(self, **kwargs):
            from mmpeft.monitor import default_callbacks

            # The monitor, the end-of-fit summary and the rich progress bar (mmpeft/monitor.py), each
            # unless the config's trainer.callbacks has one of its kind.
            config = self._get(self.config_init, "trainer", default={})
            callbacks = config.get("callbacks") or []
            callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
            progress_bar = config.get("enable_progress_bar") is not False
            kwargs.setdefault("callbacks", callbacks + default_callbacks(callbacks, progress_bar))
            return super().instantiate_trainer(**kwargs)

        def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs):
            parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
            if subcommand == "predict":
                from mmpeft.generation import JsonlWriter

                # The answers go to a JSONL file (--predictions.output) as they come, not into memory.
                parser.add_lightning_class_args(JsonlWriter, "predictions")
                parser.set_defaults({"return_predictions": False})
            if subcommand in ("validate", "test"):
                parser.set_defaults({"verbose": False})  # the module prints its own table, a row per task (mmpeft/metrics.py)
            return parser

    # Dataclass fields carry their help as attribute docstrings (see mmpeft/models/backbone.py).
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    MMPeftCLI(
        MMPeftModule,
        ShardDataModule,
        args=args,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "python -m mmpeft"},
        auto_configure_optimizers=False,  # the optimizer and schedule are model.optim
    )


def cmd_adapters(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="mmpeft adapters", description="List the adapter plugins registered under the 'mmpeft.adapters' entry-point group.").parse_args(argv)
    rows = registry.describe(registry.ADAPTERS)
    width = max([len(r.name) for r in rows] + [4])
    dist_width = max([len(r.distribution) for r in rows] + [12])
    print(f"{'name':<{width}}  {'distribution':<{dist_width}}  class")
    for r in rows:
        print(f"{r.name:<{width}}  {r.distribution:<{dist_width}}  {r.target}" + (f"  [BROKEN: {r.error}]" if r.error else ""))
    return 0


def cmd_tiny_model(argv: list[str]) -> int:
    from mmpeft.models.tiny import FAMILIES, build_tiny_model

    parser = argparse.ArgumentParser(prog="mmpeft tiny-model", description="Build a tiny random multimodal model of a real architecture, with its processor, for demos and tests.")
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--out", required=True, help="output folder (reused when it already holds a build)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    print(build_tiny_model(args.family, args.out, seed=args.seed, overwrite=args.overwrite))
    return 0


def cmd_data(argv: list[str]) -> int:
    from mmpeft.data.tools import cmd_data

    return cmd_data(argv)


def cmd_merge(argv: list[str]) -> int:
    from mmpeft.merge import cmd_merge

    return cmd_merge(argv)


def cmd_export(argv: list[str]) -> int:
    from mmpeft.export import cmd_export

    return cmd_export(argv)


def cmd_report(argv: list[str]) -> int:
    from mmpeft.report import cmd_report

    return cmd_report(argv)


TOOLS: dict[str, Callable[[list[str]], int]] = {
    "adapters": cmd_adapters, "tiny-model": cmd_tiny_model, "data": cmd_data, "merge": cmd_merge, "export": cmd_export,
    "report": cmd_report,
}  # fmt: skip


def user_message(exc: MMPeftError) -> str:
    """The error's own message, without the traceback a dataloader worker wraps around it."""
    text = str(exc)
    marker = f"{type(exc).__name__}: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1].strip()
    return text


def main(argv: list[str] | None = None) -> int:
    cli_args = argv  # None: LightningCLI reads sys.argv itself
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in TOOLS:
            return TOOLS[argv[0]](argv[1:])
        if not argv or argv[0] in ("-h", "--help"):
            print("tools: " + ", ".join(TOOLS) + "  (python -m mmpeft TOOL --help)\n")
        run_lightning_cli(cli_args)
    except MMPeftError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2
    return 0
