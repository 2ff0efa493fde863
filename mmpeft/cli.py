"""``python -m mmpeft``: LightningCLI's fit/validate/test/predict plus a few tools beside them.

    python -m mmpeft fit --config configs/demo.yaml
    python -m mmpeft adapters                     # registered adapter plugins
    python -m mmpeft tiny-model --family llava --out DIR
    python -m mmpeft data build RECIPE --out DIR ...  # make shards; `data inspect DIR` looks inside
    python -m mmpeft merge --adapter DIR --out DIR    # fold the adapter into the base: a transformers checkpoint
    python -m mmpeft export --format peft --adapter DIR --out DIR  # the adapter as a PEFT LoRA
    python -m mmpeft report RUN_DIR                 # one HTML page of a run's logs (docs/monitoring.md)

A problem a user can act on (a bad setting, a missing or unreadable checkpoint, a full disk, a
folder it may not write in) is one line, ``error: ...``, and exit status 2; ``MMPEFT_DEBUG=1``
or ``--debug`` prints the traceback above it. Known-harmless messages of the libraries are not
shown (:func:`quiet_known_noise`).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmpeft.errors import ConfigError, MMPeftError
from mmpeft.flags import readable_parse_error

DEBUG_ENV = "MMPEFT_DEBUG"
"""``MMPEFT_DEBUG=1`` (or ``--debug`` anywhere on the command line): an error prints its traceback before its one
line."""

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
EVALUATION_COMMANDS = ("validate", "test", "predict")
"""Commands that train nothing, and so get no training run folder (``runs/<name>/version_N``): ``validate`` and
``test`` log to ``runs/<name>/validate_N`` and ``test_N`` beside them, ``predict`` (which logs nothing) to none."""

# -- known-harmless noise -------------------------------------------------------------------------

_QUIET_LOGS: dict[str, tuple[str, ...]] = {
    # bitsandbytes' CPU backend tries, at import, to fetch a fused kernel from the Hub for bf16 on
    # AVX512-BF16 CPUs; offline or without `kernels` it falls back to its own kernels and says so.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community: ",),
    "kernels._internals.hf_hub": (
        "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
        "because Hugging Face Hub is in offline mode.",
    ),
    # Reading a resumed run's events: TensorBoard drops what the interrupted run logged after its
    # checkpoint, as the resumed run's writer asked it to (purge_step), and says so each time.
    "tensorboard": (
        "Detected out of order event.step likely caused by a TensorFlow restart. "
        "Purging expired events from Tensorboard display",
    ),
    # Lightning's advertisements for its cloud services, on every Trainer (rank_zero_info's logger
    # is whichever of these modules was imported last).
    **{
        name: (
            "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
            "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels]",
        )
        for name in (
            "lightning.pytorch.utilities.rank_zero",
            "lightning.fabric.utilities.rank_zero",
            "pytorch_lightning.utilities.rank_zero",
            "lightning_fabric.utilities.rank_zero",
        )
    },
}
"""Exact loggers and the starts of their known-harmless messages that the commands do not show."""

_QUIET_BARS = ("Loading weights",)
"""transformers' progress bars the commands do not show (one per checkpoint load; a tiny model's load takes
milliseconds)."""


class _DropKnown(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__("mmpeft.known-noise")
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def _quiet_transformers_bars() -> None:
    from transformers.utils import logging as hf_logging

    def hook(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if kwargs.get("desc") in _QUIET_BARS:
            factory = hf_logging.EmptyTqdm
        return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)

    hook.mmpeft = True  # type: ignore[attr-defined]
    previous = hf_logging.set_tqdm_hook(hook)
    if getattr(previous, "mmpeft", False):  # installed already
        hf_logging.set_tqdm_hook(previous)


def quiet_known_noise(transformers: bool = True) -> None:
    """Silence the known-harmless messages every command used to print, each at its source; nothing else.

    - the logging records in ``_QUIET_LOGS``: a filter on each exact logger drops the messages
      that start with the known text (other messages of those loggers still show);
    - Lightning's use of a torch API deprecated in torch 2.13 (``LeafSpec``): a warning filter on
      its exact message, category and module;
    - with ``transformers``, transformers' "Loading weights" bars, through its own ``set_tqdm_hook``
      (its other bars, downloads included, stay).
    """
    for name, starts in _QUIET_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnown) for f in logger.filters):
            logger.addFilter(_DropKnown(starts))
    warnings.filterwarnings(
        "ignore",
        message=re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),
        category=FutureWarning,
        module=r"(lightning\.pytorch|pytorch_lightning)\.utilities\._pytree",
    )
    if transformers:
        _quiet_transformers_bars()


# -- checkpoints and log folders ------------------------------------------------------------------


def read_checkpoint(path: str) -> dict[str, Any]:
    """The Lightning checkpoint at ``path`` (loaded as Lightning does: tensors and plain types only), or a
    :class:`ConfigError` naming it when it is missing or cannot be read."""
    import torch

    file = Path(path)
    if not file.is_file():
        hint = " (a folder; an adapter folder goes to --model.init_adapter)" if file.is_dir() else ""
        raise ConfigError(f"ckpt_path: no checkpoint file at '{path}'{hint}")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated zip, garbage, a pickle of arbitrary objects
        reason = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:160]
        raise ConfigError(
            f"ckpt_path: '{path}' is not a checkpoint mmpeft can read ({type(exc).__name__}: {reason})"
        ) from exc
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"ckpt_path: '{path}' is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


def _local(path: Any) -> bool:
    return "://" not in str(path)


def run_lightning_cli(args: list[str] | None) -> None:
    """LightningCLI's fit/validate/test/predict on the mmpeft module and data module.

    Imported here, not at module level: Lightning takes seconds to import and the tools
    beside it (``adapters``, ``tiny-model``) do not need it.

    Beyond LightningCLI: a resumed ``fit`` logs into its checkpoint's run folder; ``validate`` and
    ``test`` log into ``validate_N`` and ``test_N`` folders, not into a new ``version_N``, and
    ``predict`` into none; ``--ckpt_path`` that is missing, unreadable or ``last`` without a last
    checkpoint is an error; a command that fails before its first batch removes the log folder it
    had just made.
    """
    from jsonargparse import Namespace, set_parsing_settings
    from lightning.fabric.utilities.cloud_io import get_filesystem
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
    from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

    from mmpeft.compat import last_checkpoints
    from mmpeft.data import ShardDataModule
    from mmpeft.module import MMPeftModule

    numbered = (TensorBoardLogger, CSVLogger)  # loggers that make runs/<name>/version_N

    class NewRunFolder(Callback):
        """The log folder this command makes; removed again (with the config, hparams and event files
        written at setup, and any parent made for it) if the command fails before its first batch."""

        LEFTOVERS = ("config.yaml", "hparams.yaml")

        def __init__(self, log_dir: Path) -> None:
            self.log_dir = log_dir
            self.top = log_dir  # the outermost folder that does not exist yet
            while not self.top.parent.exists() and self.top.parent != self.top:
                self.top = self.top.parent
            self.used = False
            self.rank_zero = True

        def setup(self, trainer, pl_module, stage: str) -> None:
            self.rank_zero = trainer.is_global_zero

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.used = True

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self.used = self.used or not trainer.sanity_checking

        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self.used = True

        def remove_if_unused(self) -> None:
            if self.used or not self.rank_zero or not self.log_dir.is_dir():
                return
            entries = list(self.log_dir.iterdir())
            if not all(
                e.is_file() and (e.name in self.LEFTOVERS or e.name.startswith("events.out.tfevents.")) for e in entries
            ):
                return  # something else is there: leave it all
            for entry in entries:
                entry.unlink()
            folder = self.log_dir
            while True:
                try:
                    folder.rmdir()  # only when empty
                except OSError:
                    return
                if folder == self.top:
                    return
                folder = folder.parent

    new_folders: list[NewRunFolder] = []

    class MMPeftArgumentParser(LightningArgumentParser):
        subcommand_parsers: dict[str, LightningArgumentParser] = {}
        """The parser of each subcommand (``fit``, ...), once LightningCLI has added them."""

        def error(self, message: str, ex: Exception | None = None):
            return super().error(readable_parse_error(message), ex)

        def add_subcommands(self, *args: Any, **kwargs: Any):
            action = super().add_subcommands(*args, **kwargs)
            self.subcommand_parsers = action.choices  # argparse's map of subcommand -> parser, filled as they are added
            return action

    class MMPeftCLI(LightningCLI):
        checkpoint: tuple[str, dict[str, Any]] | None = None
        """The ``ckpt_path`` checkpoint once read: (path, contents)."""
        logger_args: dict[int, dict[str, Any]] = {}
        """The constructor arguments the config gives each logger, by the id of the logger built from them."""

        def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
            super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
            if not add_subcommands:
                return
            from mmpeft.generation import JsonlWriter

            parsers = self.parser.subcommand_parsers
            # The answers go to a JSONL file (--predictions.output) as they come, not into memory.
            parsers["predict"].add_lightning_class_args(JsonlWriter, "predictions")
            parsers["predict"].set_defaults({"return_predictions": False})
            for subcommand in ("validate", "test"):
                # The module prints its own table, a row per task (mmpeft/metrics.py).
                parsers[subcommand].set_defaults({"verbose": False})

        def add_arguments_to_parser(self, parser) -> None:
            # The data is encoded by the model's own processor unless the config says otherwise.
            parser.link_arguments("model.backbone.pretrained", "data.processor")
            parser.link_arguments("model.backbone.trust_remote_code", "data.trust_remote_code")

        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            # LightningCLI reads a checkpoint file's hyperparameters next: a missing or corrupt one is named here first.
            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if (
                ckpt_path
                and _local(ckpt_path)
                and ckpt_path not in ("last", "best", "hpc")
                and not str(ckpt_path).startswith("registry")
            ):
                self.checkpoint = (str(ckpt_path), read_checkpoint(str(ckpt_path)))

        def instantiate_trainer(self, **kwargs):
            from mmpeft.monitor import default_callbacks

            # The monitor, the end-of-fit summary and the rich progress bar (mmpeft/monitor.py), each
            # unless the config's trainer.callbacks has one of its kind.
            config = self.config_init[self.subcommand].get("trainer") or {}
            self.logger_args = self._configured_logger_args()
            callbacks = config.get("callbacks") or []
            callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
            progress_bar = config.get("enable_progress_bar") is not False
            kwargs.setdefault("callbacks", callbacks + default_callbacks(callbacks, progress_bar))
            if self.subcommand == "predict":
                # It logs nothing: no runs/<name>/version_N, and no config.yaml saved into trainer.default_root_dir
                # (where the user's own config may lie). A logger whose version the config sets is kept.
                loggers = config.get("logger")
                loggers = loggers if isinstance(loggers, list) else [loggers]
                kept = [
                    lg
                    for lg in loggers
                    if isinstance(lg, Logger) and not (isinstance(lg, numbered) and not self._version_given(lg))
                ]
                kwargs["logger"] = kept or False
                if not kept:
                    self.save_config_callback = None
            trainer = super().instantiate_trainer(**kwargs)
            if self.subcommand in ("validate", "test"):
                # Scores go to runs/<name>/validate_N (test_N): the next fit is still version_N+1 of the training runs.
                loggers = []
                for logger in trainer.loggers:
                    if isinstance(logger, numbered) and not self._version_given(logger):
                        fs, n = get_filesystem(logger.root_dir), 0
                        while fs.isdir(os.path.join(logger.root_dir, f"{self.subcommand}_{n}")):
                            n += 1
                        logger = self._rebuilt(logger, version=f"{self.subcommand}_{n}")
                    loggers.append(logger)
                trainer.loggers = loggers
            return trainer

        # -- loggers: their version is an argument of their constructor ---------------------------
        def _configured_logger_args(self) -> dict[int, dict[str, Any]]:
            parsed = self.config[self.subcommand].get("trainer", {}).get("logger")
            built = self.config_init[self.subcommand].get("trainer", {}).get("logger")
            parsed = parsed if isinstance(parsed, list) else [parsed]
            built = built if isinstance(built, list) else [built]
            return {
                id(logger): spec.init_args.as_dict()
                for spec, logger in zip(parsed, built)
                if isinstance(logger, Logger)
                and isinstance(spec, Namespace)
                and isinstance(spec.get("init_args"), Namespace)
            }

        def _version_given(self, logger: Logger) -> bool:
            """Whether the config sets the logger's version (Lightning's default logger: no)."""
            return self.logger_args.get(id(logger), {}).get("version") is not None

        def _rebuilt(self, logger: Logger, **changes: Any) -> Logger:
            """A logger like ``logger`` (the config's arguments, or those of Lightning's default logger) with
            ``changes``."""
            args = self.logger_args.get(id(logger)) or {"save_dir": logger.save_dir, "name": logger.name}
            return type(logger)(**{**args, **changes})

        # -- before the run: the checkpoint to start from, and the log folder --------------------
        def before_fit(self) -> None:
            ckpt_path = self._resolve_last()
            if ckpt_path is not None and _local(ckpt_path):
                self._continue_run_folder(ckpt_path)
            self._watch_new_folder()

        def before_validate(self) -> None:
            self._resolve_last()
            self._watch_new_folder()

        before_test = before_predict = before_validate

        def _watch_new_folder(self) -> None:
            logger = self.trainer.logger
            if isinstance(logger, numbered) and self.trainer.global_rank == 0 and _local(logger.log_dir):
                log_dir = Path(logger.log_dir)
                if not log_dir.exists():
                    folder = NewRunFolder(log_dir)
                    self.trainer.callbacks.append(folder)
                    new_folders.append(folder)

        def _resolve_last(self) -> str | None:
            """``ckpt_path``, with ``last`` replaced by the newest last checkpoint (Lightning's choice), or an error
            when there is none."""
            config = self.config_init[self.subcommand]
            ckpt_path = config.get("ckpt_path")
            if ckpt_path != "last":
                return ckpt_path
            callbacks = [cb for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
            if any(cb.dirpath is not None and not _local(cb.dirpath) for cb in callbacks):
                return None  # a remote folder: Lightning looks there itself
            found = {path: os.path.getmtime(path) for cb in callbacks for path in last_checkpoints(cb, self.trainer)}
            if not found:
                if not callbacks:
                    where = "any folder: there is no ModelCheckpoint (trainer.enable_checkpointing is off)"
                else:
                    where = ", ".join(f"'{cb.dirpath}'" for cb in callbacks if cb.dirpath) or (
                        "this run's new log folder (set ModelCheckpoint's dirpath, as configs/demo.yaml does, "
                        "for runs to find it)"
                    )
                raise ConfigError(
                    f"ckpt_path last: no last checkpoint in {where}; ModelCheckpoint(save_last=True) writes one. "
                    "Leave out --ckpt_path to train from scratch"
                )
            config["ckpt_path"] = max(found, key=found.get)
            return config["ckpt_path"]

        def _continue_run_folder(self, ckpt_path: str) -> None:
            """Log into the run folder the checkpoint was written from, unless the config names a version."""
            from mmpeft.monitor import RunSummary

            logger = self.trainer.logger
            if not isinstance(logger, numbered) or self._version_given(logger):
                return
            checkpoint = (
                self.checkpoint[1]
                if self.checkpoint and self.checkpoint[0] == ckpt_path
                else read_checkpoint(ckpt_path)
            )
            state = (checkpoint.get("callbacks") or {}).get(RunSummary.__qualname__) or {}
            if state.get("version") is None or not state.get("log_dir"):
                return  # a checkpoint from before mmpeft recorded its run folder: a new one
            changes: dict[str, Any] = {"version": state["version"]}
            if Path(self._rebuilt(logger, **changes).log_dir).resolve() != Path(state["log_dir"]):
                return  # the config now logs elsewhere (another save_dir or name): a new folder there
            if isinstance(logger, TensorBoardLogger) and self.logger_args.get(id(logger), {}).get("purge_step") is None:
                # TensorBoard drops what the interrupted run logged after the checkpoint: the curves continue once.
                # (The CLI fills the SummaryWriter's keyword arguments in, purge_step=None among them.)
                changes["purge_step"] = int(checkpoint.get("global_step", 0))
            continued = self._rebuilt(logger, **changes)
            self.trainer.loggers = [continued if lg is logger else lg for lg in self.trainer.loggers]

    # Dataclass fields carry their help as attribute docstrings (see mmpeft/models/backbone.py).
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        MMPeftCLI(
            MMPeftModule,
            ShardDataModule,
            args=args,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "python -m mmpeft"},
            parser_class=MMPeftArgumentParser,
            auto_configure_optimizers=False,  # the optimizer and schedule are model.optim
        )
    except BaseException:
        for folder in new_folders:
            folder.remove_if_unused()
        raise


def cmd_adapters(argv: list[str]) -> int:
    argparse.ArgumentParser(
        prog="mmpeft adapters",
        description="List the adapter plugins registered under the 'mmpeft.adapters' entry-point group.",
    ).parse_args(argv)
    from mmpeft.adapters.inject import describe_adapters  # torch only for the commands that need it

    rows = describe_adapters()  # loads each, checked against the adapter contract
    width = max([len(r.name) for r in rows] + [4])
    dist_width = max([len(r.distribution) for r in rows] + [12])
    print(f"{'name':<{width}}  {'distribution':<{dist_width}}  class")
    for r in rows:
        print(
            f"{r.name:<{width}}  {r.distribution:<{dist_width}}  {r.target}"
            + (f"  [BROKEN: {r.error}]" if r.error else "")
        )
    return 0


def cmd_tiny_model(argv: list[str]) -> int:
    from mmpeft.flags import ArgumentParser, parse
    from mmpeft.models.tiny import FAMILIES, build_tiny_model

    parser = ArgumentParser(
        prog="mmpeft tiny-model",
        description="Build a tiny random multimodal model of a real architecture, with its processor, "
        "for demos and tests.",
    )
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--out", required=True, help="output folder (reused when it already holds a build)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parse(parser, argv)
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


def cmd_estimate(argv: list[str]) -> int:
    from mmpeft.estimate import cmd_estimate

    return cmd_estimate(argv)


def cmd_report(argv: list[str]) -> int:
    from mmpeft.report import cmd_report

    return cmd_report(argv)


TOOLS: dict[str, Callable[[list[str]], int]] = {
    "adapters": cmd_adapters,
    "tiny-model": cmd_tiny_model,
    "data": cmd_data,
    "merge": cmd_merge,
    "export": cmd_export,
    "report": cmd_report,
    "estimate": cmd_estimate,
}


def user_message(exc: BaseException) -> str:
    """The error's own message, without the traceback a dataloader worker wraps around it."""
    text = str(exc)
    marker = f"{type(exc).__name__}: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1].strip()
    return text


def os_error_message(exc: OSError) -> str:
    """``No space left on device: '/runs/x/last.ckpt'``: the OS's words and the file, as Python says them, without
    the errno."""
    if "Original Traceback" in str(exc):  # raised in a dataloader worker: its last line is the error
        return re.sub(r"^\[Errno \d+\] ", "", user_message(exc))
    text = exc.strerror or str(exc) or type(exc).__name__
    files = [f"'{os.fsdecode(f)}'" for f in (exc.filename, exc.filename2) if f is not None]
    if files:
        return f"{text}: {' -> '.join(files)}"
    return f"{text} (set {DEBUG_ENV}=1 to see where)"


def _lightning_error(exc: BaseException) -> bool:
    """Lightning's own configuration errors (``MisconfigurationException``), whose message is all a user needs."""
    module = sys.modules.get("lightning.fabric.utilities.exceptions")
    return module is not None and isinstance(exc, module.MisconfigurationException)


def unknown_command(command: str | None) -> str:
    """What to say of a command that is not one (or of none), listing them all: LightningCLI's and the tools."""
    commands = [*LIGHTNING_COMMANDS, *TOOLS]
    close = difflib.get_close_matches(command, commands, n=1) if command else []
    guess = f" (did you mean '{close[0]}'?)" if close else ""
    what = f"unknown command '{command}'{guess}" if command else "no command given"
    return f"{what}; commands: {', '.join(commands)} (python -m mmpeft COMMAND --help)"


def _fail(message: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    from_sys_argv = argv is None  # LightningCLI then reads sys.argv itself
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv
    if "--debug" in argv:
        argv = [arg for arg in argv if arg != "--debug"]
        if from_sys_argv:
            sys.argv[1:] = argv
    command = argv[0] if argv else None
    quiet_known_noise(transformers=command not in ("adapters", "report"))
    try:
        if command in TOOLS:
            return TOOLS[command](argv[1:])
        if command == "fit" and "--dry-run" in argv:  # the memory plan instead of training (mmpeft/estimate.py)
            return cmd_estimate([arg for arg in argv[1:] if arg != "--dry-run"])
        if command is None or (not command.startswith("-") and command not in LIGHTNING_COMMANDS):
            raise ConfigError(unknown_command(command))
        if command in ("-h", "--help"):
            print("tools: " + ", ".join(TOOLS) + "  (python -m mmpeft TOOL --help)\n")
        run_lightning_cli(None if from_sys_argv else argv)
    except MMPeftError as exc:
        return _fail(user_message(exc), debug)
    except OSError as exc:  # a full disk, a folder it may not write in, a file that vanished
        return _fail(os_error_message(exc), debug)
    except Exception as exc:
        if not _lightning_error(exc):
            raise  # a bug: its traceback is what to report
        return _fail(user_message(exc), debug)
    return 0
