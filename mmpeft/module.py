"""The LightningModule: a quantized multimodal backbone with adapters in its language model (and, where the
adapter groups say so, in its vision tower and projector).

The loss is the LM loss on assistant tokens plus the adapters' auxiliary losses.
The model is loaded in ``configure_model`` (on the strategy's device, after the data
is prepared) so that the tiny demo model can be built in ``prepare_data`` first and
distributed strategies place weights themselves.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from transformers import get_cosine_schedule_with_warmup

from mmpeft.activations import step_losses
from mmpeft.adapters import AdaptedLinear, AdapterGroup
from mmpeft.adapters.inject import TowerContext, group_of, tower_contexts
from mmpeft.adapters.routing import Router, RoutingContext, RoutingLosses
from mmpeft.checkpoint import ADAPTER_KEY, RNG_KEY, AtomicCheckpointIO, rng_states, set_rng_states
from mmpeft.data.contract import TaskData
from mmpeft.errors import ConfigError
from mmpeft.generation import Generation
from mmpeft.metrics import Evaluation, TaskMetrics, print_table
from mmpeft.models.backbone import (
    PROJECTOR_PATHS,
    Backbone,
    get_path,
    inject_model_adapters,
    load_backbone,
    load_processor,
)
from mmpeft.objective import kept_logits, next_token_targets, routed
from mmpeft.packing import Layout, packed_inputs
from mmpeft.planner import Preflight, preflight
from mmpeft.saving import AdapterSpec, apply_adapter, base_summary, read_spec, save_adapter, trainable_tensors
from mmpeft.speed import Speed, apply_to_adapters

log = logging.getLogger("mmpeft")


@dataclass
class Optim:
    """Optimizer and learning-rate schedule."""

    lr: float = 2e-4
    """Peak learning rate (QLoRA and the AsymLoRA reference script use 2e-4)."""

    weight_decay: float = 0.0
    """AdamW weight decay on the trainable tensors."""

    warmup: float = 0.03
    """Linear warmup: a fraction of all steps when < 1, else a number of steps. Cosine decay to 0 follows."""

    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    """``adamw`` is torch's; the 8-bit ones are bitsandbytes' (paged needs CUDA) and save optimizer memory."""

    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moment decay rates."""

    projector_lr: float | None = None
    """Peak learning rate of the projector when ``model.backbone.train_projector`` trains it in full (its own AdamW
    parameter group, scaled by the same schedule); ``None``: ``lr``. Adapter groups set theirs in
    ``model.adapters[i].lr``."""

    projector_weight_decay: float | None = None
    """AdamW weight decay of the projector trained in full; ``None``: ``weight_decay``."""


class MMPeftModule(L.LightningModule):
    def __init__(
        self,
        backbone: Backbone,
        adapters: list[AdapterGroup] | None = None,
        optim: Optim = Optim(),
        routing: RoutingLosses = RoutingLosses(),
        init_adapter: str | None = None,
        generation: Generation = Generation(),
        evaluation: Evaluation = Evaluation(),
        speed: Speed = Speed(),
        preflight: Preflight = Preflight(),
    ) -> None:
        """Adapter fine-tuning of a (quantized) multimodal model.

        Args:
            backbone: The multimodal checkpoint and how to load it.
            adapters: Adapter groups: which adapter goes on which linear layers of the language model (or, with
                ``part``, of the vision tower or projector; docs/adapters.md), each with its own ``lr`` and
                ``weight_decay`` if given. Default: LoRA on every linear layer of the language model, or
                ``init_adapter``'s groups.
            optim: Optimizer and schedule.
            routing: Coefficients of the mixture adapters' auxiliary routing losses (ignored by adapters without a
                router).
            init_adapter: An adapter directory (``adapter_config.json`` + ``adapter.safetensors``) to start from: its
                adapters, weights and task vocabulary, for further training, evaluation or prediction.
            generation: How ``predict`` decodes (greedy, sampling or beam search, and how many new tokens).
            evaluation: What validation and test score besides loss and token accuracy: greedy answers, and each task's
                metrics (docs/evaluation.md).
            speed: Training-step speed and memory levers (chunked loss, in-place adapter add, where gradients and
                recomputation go; docs/speed.md). None changes the loss beyond floating-point noise.
            preflight: The memory check ``fit`` runs before loading any weight: on CUDA it plans the run's peak
                (docs/memory.md) and stops, with the breakdown and the settings that would fit, a run that exceeds
                the device's free memory.
        """
        super().__init__()
        self.save_hyperparameters()
        self.init_spec: AdapterSpec | None = None
        if init_adapter is not None:
            self.init_spec = read_spec(init_adapter)  # a missing or malformed directory fails here, before any loading
            if adapters is None:
                adapters = self.init_spec.groups
            elif _layout(AdapterSpec(adapters, "", {}).resolved().groups) != _layout(self.init_spec.resolved().groups):
                raise ConfigError(
                    f"model.adapters differs from the adapters of model.init_adapter={init_adapter!r}; "
                    "leave model.adapters unset to use the directory's"
                )
            if self.init_spec.train_projector and not backbone.train_projector:
                backbone = dataclasses.replace(
                    backbone, train_projector=True
                )  # its projector weights are in the directory
        adapters = adapters if adapters is not None else [AdapterGroup()]
        if backbone.train_projector and any(g.part == "projector" for g in adapters):
            raise ConfigError(
                "model.backbone.train_projector trains the projector in full and model.adapters has a group with "
                "part: projector; train the projector one way (set its learning rate with optim.projector_lr)"
            )
        self.backbone = backbone
        self.adapter_groups = adapters
        self.optim = optim
        self.routing = routing
        generation.check()
        self.generation = generation
        evaluation.check()
        self.evaluation = evaluation
        speed.check()
        self.speed = speed
        preflight.check()
        self.preflight = preflight
        self.metrics: TaskMetrics | None = None
        """Every task's validation or test scores, built when an evaluation pass starts (the task vocabulary is final
        then)."""
        self.tokenizer: Any = None
        """Decodes generated tokens; set up for ``predict``, and for validation and test unless ``evaluation.generate``
        is off."""
        # Shared by every router of the model: carries the batch's masks and task ids in, router records out.
        self.routing_context = RoutingContext()
        self.tower_contexts: list[TowerContext] = []
        """The routing contexts of the vision and projector groups' routers (found after injection)."""
        for i, group in enumerate(adapters):
            group.resolve(i)  # unknown adapter names and keys fail here, before any model is loaded
        backbone.check_exists()
        self.model: torch.nn.Module | None = None
        # Checkpoints hold only trainable tensors, so loading one must accept the frozen base's absence.
        self.strict_loading = False
        self.sample_losses: torch.Tensor | None = None
        """The last training batch's loss of each sample ``(batch,)``, detached: :class:`mmpeft.monitor.Monitor` logs it
        per task."""
        self._skipped: Counter[str] = Counter()
        self._rng_to_restore: dict[str, Any] | None = None

    # -- setup ------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.backbone.build_tiny is not None:
            from mmpeft.models.tiny import build_tiny_model

            build_tiny_model(self.backbone.build_tiny, self.backbone.pretrained)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        trainer = self.attached_trainer()
        predicting = trainer is not None and trainer.predicting
        # Gradient checkpointing only costs time when nothing is trained.
        backbone = dataclasses.replace(self.backbone, gradient_checkpointing=False) if predicting else self.backbone
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            # Before any weight is read: the run's peak planned on the meta device (mmpeft/planner.py).
            data = self.data()
            preflight(
                self.preflight,
                backbone,
                self.adapter_groups,
                self.optim.optimizer,
                trainer.strategy.root_device,
                batches=data.batches if data is not None else None,
                speed=self.speed,
                routing=self.routing,
                accumulating=trainer.accumulate_grad_batches > 1,
                precision=trainer.precision,
            )
        model = load_backbone(backbone, trainer.strategy.root_device, self.speed)
        if self.init_spec is not None:
            apply_adapter(model, self.hparams.init_adapter, self.routing_context, trainable=not predicting)
        else:
            inject_model_adapters(model, self.adapter_groups, self.routing_context)
        self.tower_contexts = tower_contexts(model)
        apply_to_adapters(model, self.speed)
        # from_pretrained returns eval mode; train like transformers' Trainer (Lightning keeps modes as found).
        self.model = model.eval() if predicting else model.train()

    def setup(self, stage: str) -> None:
        trainer = self.attached_trainer()
        data = self.data()
        saved = self.init_spec.tasks if self.init_spec is not None else []
        if stage == "fit" and saved and data is not None and saved != data.tasks:
            # Training on keeps the adapter's task ids (checked against the data); evaluation and
            # prediction take the data's tasks, whichever the adapter saw (docs/evaluation.md).
            data.keep_task_ids(saved, f"model.init_adapter {self.hparams.init_adapter!r}")
        tasks = self.task_names()
        if tasks:
            self.routing_context.num_tasks = len(tasks)
        generates = self.evaluation.generates(fitting=stage == "fit")
        if data is not None:
            data.carry_prompts(generates)  # validation batches carry prompts only to generate from
        if (stage == "predict" or generates) and self.tokenizer is None:
            self.tokenizer = data.tokenizer if data is not None else None
            if self.tokenizer is None:
                b = self.backbone
                self.tokenizer = load_processor(
                    b.pretrained, b.trust_remote_code, "model.backbone.pretrained"
                ).tokenizer
        strategy = trainer.strategy if trainer is not None else None
        if strategy is not None and type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = AtomicCheckpointIO()  # see mmpeft/checkpoint.py

    # -- what callbacks and the data module see of this module -------------------------------------
    def attached_trainer(self) -> L.Trainer | None:
        """The trainer running this module, or ``None`` when it runs outside one (tests, ``merge``)."""
        try:
            return self.trainer
        except RuntimeError:  # Lightning's documented answer for a module not attached to a Trainer
            return None

    def data(self) -> TaskData | None:
        """The trainer's data module when it keeps the contract of :class:`mmpeft.data.contract.TaskData`."""
        trainer = self.attached_trainer()
        datamodule = trainer.datamodule if trainer is not None else None
        return datamodule if isinstance(datamodule, TaskData) else None

    def task_names(self) -> list[str]:
        """The task vocabulary (task id = position): the data module's, else the one ``model.init_adapter`` was trained
        on."""
        data = self.data()
        return list((data.tasks if data is not None else None) or (self.init_spec.tasks if self.init_spec else []))

    def on_fit_start(self) -> None:
        low = sorted({str(p.dtype) for p in self.trainable_parameters() if p.dtype != torch.float32})
        if low:
            rank_zero_warn(
                f"trainable parameters are {', '.join(low)}, not float32 (trainer.precision="
                f"{self.trainer.precision!r} casts them); use a '-mixed' precision to keep adapters in float32"
            )

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # -- steps ------------------------------------------------------------------------------
    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**inputs, use_cache=False).logits  # (batch, seq, vocab)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # Recorded in every stage: the routing statistics of mmpeft/monitor.py; only training adds losses.
        step = step_losses(self.model, self.routing_context, batch, self.speed, self.routing, self.tower_contexts)
        self.sample_losses = step.samples
        size = batch["task_ids"].shape[0]  # samples, not a packed batch's rows
        self.log("train/loss", step.lm, batch_size=size, prog_bar=True)
        for name, value in step.aux.items():
            self.log(f"train/aux/{name}", value, batch_size=size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=size)
        self._count_skipped(batch)
        return step.total

    def _count_skipped(self, batch: dict[str, Any]) -> None:
        """Log how many samples were skipped so far, by reason (``data/skipped/<reason>``)."""
        for reason, count in batch.get("skipped", {}).items():
            self._skipped[reason] += count
            self.log(f"data/skipped/{reason}", float(self._skipped[reason]), batch_size=batch["task_ids"].shape[0])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The generators as they were when the checkpoint was taken, right before the step that followed it.
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    # -- validation and test: every task's scores (docs/evaluation.md) ------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch)

    def _evaluate(self, batch: dict[str, Any]) -> torch.Tensor:
        """Add a batch to every task's scores: teacher-forced loss and token accuracy, and greedy answers' scores."""
        inputs, labels, task_ids = batch["inputs"], batch["labels"], batch["task_ids"]
        metrics = self.metrics
        # Generation first: it resets the routing records, which the teacher-forced pass below leaves for the callbacks.
        if "prompt_inputs" in batch and metrics.wants_answers(task_ids):
            answers = self.generate_answers(
                batch["prompt_inputs"],
                routing_mask=batch.get("prompt_routing_mask"),
                max_new_tokens=self.evaluation.max_new_tokens,
                do_sample=False,
                num_beams=1,
            )
            metrics.update_answers(answers, batch["references"], task_ids)
        keep, targets = next_token_targets(labels)  # (batch, seq), (n_kept,)
        packed = Layout.of(batch)
        with routed(self.routing_context, batch), packed_inputs(self.model, inputs, packed) as model_in:
            logits = kept_logits(self.model, model_in, keep)  # (n_kept, vocab)
        samples = keep.nonzero(as_tuple=True)[0] if packed is None else packed.sample.to(keep.device)[keep]
        metrics.update_forced(logits, targets, task_ids[samples], task_ids)
        self._count_skipped(batch)
        return F.cross_entropy(logits.float(), targets)

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation()

    def on_test_epoch_start(self) -> None:
        self._start_evaluation()

    def _start_evaluation(self) -> None:
        tasks = self.task_names()
        if not tasks:
            raise ConfigError(
                "validation and test report per task and need the task vocabulary: "
                "the data module has no `tasks` (set data.tasks)"
            )
        if self.evaluation.generates(fitting=self.trainer.state.fn == TrainerFn.FITTING):
            data = self.data()
            chosen = self.evaluation.choose(tasks, data.index_metrics if data is not None else None)
        else:
            chosen = {task: [] for task in tasks}  # loss and token accuracy only
        if self.metrics is None or (self.metrics.tasks, self.metrics.chosen) != (tasks, chosen):
            unknown = sorted(set(self.evaluation.metrics or {}) - set(tasks))
            if unknown:
                rank_zero_warn(
                    f"model.evaluation.metrics names task(s) {', '.join(map(repr, unknown))} "
                    f"not in the task vocabulary {tasks}"
                )
            self.metrics = TaskMetrics(tasks, chosen).to(self.device)
        self.metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._end_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._end_evaluation("test")

    def _end_evaluation(self, stage: str) -> None:
        """Log ``<stage>/<metric>`` (mean over tasks) and ``<stage>/<task>/<metric>``; ``validate`` and ``test`` also
        print the table."""
        results = self.metrics.compute()  # a collective: every rank computes
        self.metrics.reset()
        for name, value in results.scalars(stage).items():
            # Equal on every rank already (the metrics gathered their states); sync_dist keeps Lightning from warning.
            self.log(name, value, sync_dist=True, prog_bar=name == f"{stage}/loss")
        if self.trainer.state.fn in (TrainerFn.VALIDATING, TrainerFn.TESTING) and self.trainer.is_global_zero:
            title = {"val": "validation", "test": "test"}[stage] + f": scores per task ({len(results.tasks)} tasks)"
            print_table(results.table(title))

    def generate_answers(
        self, inputs: dict[str, torch.Tensor], routing_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> list[str]:
        """The decoded new text of each left-padded prompt of ``inputs`` (leading whitespace stripped), generated with
        ``kwargs`` in the routing context.

        Instance routing (MixLoRA, AsymLoRA with ``routing: instance``) is computed once on each prompt, over the
        tokens of ``routing_mask`` (``(batch, prompt_len)``; the tokens before the first answer, as in training), and
        reused at every new token, through the KV cache.
        """
        prompt_len = inputs["input_ids"].shape[1]
        tokens = self.routing_context.generate(
            self.model, **inputs, routing_mask=routing_mask, **kwargs, use_cache=True
        )  # (batch, prompt_len + new)
        # The first new token usually starts a word, which BPE and SentencePiece tokenizers decode with its leading
        # space.
        return [text.lstrip() for text in self.tokenizer.batch_decode(tokens[:, prompt_len:], skip_special_tokens=True)]

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Answers to a batch of left-padded prompts (``ChatEncoder.collate_prompts``), one dict per sample
        (see :meth:`generate_answers`)."""
        answers = self.generate_answers(batch["inputs"], batch.get("routing_mask"), **self.generation.kwargs())
        rows = []
        for key, task, prompt, reference, answer in zip(
            batch["keys"], batch["tasks"], batch["prompts"], batch["reference"], answers
        ):
            row = {"key": key, "task": task, "prompt": prompt, "answer": answer}
            if reference is not None:
                row["reference"] = reference
            rows.append(row)
        return rows

    # -- optimisation -----------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """The trainable tensors as one optimizer parameter group per distinct ``(lr, weight_decay)``.

        An adapter group's tensors take its ``lr`` / ``weight_decay``, the projector trained in full
        ``optim.projector_lr`` / ``optim.projector_weight_decay``, each ``None`` falling back to ``optim.lr`` /
        ``optim.weight_decay``; the group of those defaults comes first (``train/lr`` logs it). An adapter group
        with a ``router_lr`` puts its routers' tensors (its :class:`Router` modules, a shared block router
        included) at that lr, with the group's weight decay (``adapters[i] routers``). Each group's ``name`` says
        whose tensors it holds.
        """
        o = self.optim
        owner: dict[int, tuple[float, float, str]] = {}
        # In the optimizer's order: the adapter groups, their routers with a router_lr of their own, the projector.
        sources: list[tuple[float, float, str]] = []
        for i, g in enumerate(self.adapter_groups):
            lr, decay = o.lr if g.lr is None else g.lr, o.weight_decay if g.weight_decay is None else g.weight_decay
            sources.append((lr, decay, f"adapters[{i}]"))
        routers = {
            i: (g.router_lr, sources[i][1], f"adapters[{i}] routers")
            for i, g in enumerate(self.adapter_groups)
            if g.router_lr is not None
        }
        sources += routers.values()
        for module in self.model.modules():
            if isinstance(module, AdaptedLinear) and group_of(module) is not None:
                i = group_of(module)
                # A block's shared router is a submodule of the block's first adapter only: counted once.
                routed_ids = {
                    id(p) for sub in module.adapter.modules() if isinstance(sub, Router) for p in sub.parameters()
                }
                for param in module.adapter.parameters():
                    owner[id(param)] = routers[i] if i in routers and id(param) in routed_ids else sources[i]
        if self.backbone.train_projector:
            lr = o.lr if o.projector_lr is None else o.projector_lr
            decay = o.weight_decay if o.projector_weight_decay is None else o.projector_weight_decay
            sources.append((lr, decay, "projector"))
            for param in get_path(self.model, PROJECTOR_PATHS, "projector")[1].parameters():
                owner.setdefault(id(param), sources[-1])
        groups: dict[tuple[float, float], dict[str, list]] = {(o.lr, o.weight_decay): {"params": [], "names": []}}
        for lr, decay, _ in sources:
            groups.setdefault((lr, decay), {"params": [], "names": []})
        for param in self.trainable_parameters():
            lr, decay, who = owner.get(id(param), (o.lr, o.weight_decay, "other"))
            group = groups[lr, decay]  # every setting has its group already
            group["params"].append(param)
            if who not in group["names"]:
                group["names"].append(who)
        order = [who for *_, who in sources] + ["other"]
        return [
            {
                "params": g["params"],
                "lr": lr,
                "weight_decay": decay,
                "name": ", ".join(sorted(g["names"], key=order.index)),
            }
            for (lr, decay), g in groups.items()
            if g["params"]
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim
        params = self.param_groups()
        if o.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
        else:
            import bitsandbytes as bnb

            cls = bnb.optim.PagedAdamW8bit if o.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
            optimizer = cls(params, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ConfigError(
                "trainer.max_steps is not set: streamed shards have no length, so the warmup and cosine "
                "schedule need the run's length in optimizer steps"
            )
        total = int(total)
        warmup = int(o.warmup * total) if o.warmup < 1 else int(o.warmup)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)  # scales each group's own lr
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The frozen base can be reloaded from `backbone.pretrained`; keep checkpoints adapter-sized.
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint[ADAPTER_KEY] = self.adapter_spec().to_json()
        checkpoint[RNG_KEY] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get(RNG_KEY)

    def adapter_spec(self) -> AdapterSpec:
        """What ``adapter_config.json`` says of this model's adapter."""
        tasks = self.task_names()
        base = base_summary(self.model.config)
        b = self.backbone
        spec = AdapterSpec(
            self.adapter_groups,
            b.pretrained,
            base,
            tasks,
            b.train_projector,
            quantization=b.quantization,
            double_quant=b.double_quant,
        )
        return spec.resolved()

    def save_adapter(self, out: str | Path) -> Path:
        """Write this model's adapter directory to ``out`` (replaced atomically)."""
        projector = get_path(self.model, PROJECTOR_PATHS, "projector")[0] if self.backbone.train_projector else None
        return save_adapter(out, self.adapter_spec(), trainable_tensors(self.model, projector))

    def on_fit_end(self) -> None:
        out = adapter_dir(self.trainer)
        if self.trainer.is_global_zero:
            self.save_adapter(out)
            log.info("adapter written to %s", out)


def _layout(groups: list[AdapterGroup]) -> list[AdapterGroup]:
    """The groups without their optimizer settings (``lr``, ``weight_decay``, ``router_lr``), which further training
    may change."""
    return [dataclasses.replace(g, lr=None, weight_decay=None, router_lr=None) for g in groups]


def adapter_dir(trainer: L.Trainer) -> Path:
    """Where ``fit`` writes the trained adapter: ``<log_dir>/adapter``. ``log_dir`` is a collective: every rank must
    ask."""
    return Path(trainer.log_dir or trainer.default_root_dir) / "adapter"
