"""Write an adapter in PEFT's LoRA format: ``python -m mmpeft export --format peft``.

The output loads with ``peft.PeftModel.from_pretrained(base, out)`` on the base model of
transformers: ``adapter_config.json`` is a ``peft.LoraConfig`` (saved by PEFT itself) and
``adapter_model.safetensors`` holds ``lora_A``/``lora_B`` under PEFT's key names.

- ``target_modules`` lists the exact paths of the adapted layers, sorted, in the language model
  and, for groups with ``part: vision`` or ``part: projector``, the vision tower and projector, so
  no layer of the same name elsewhere (the vision tower's ``q_proj``, ...) is targeted by mistake;
- ``r`` and ``lora_alpha`` are those of most layers, with ``lora_alpha / r`` equal to mmpeft's
  scaling; layers that differ (another group, a LoRA-MoE collapsed to rank ``N * r``) get
  ``rank_pattern``/``alpha_pattern`` entries;
- a trained projector goes to ``modules_to_save``;
- DoRA (an adapter declaring ``as_dora``) is written with ``use_dora=True`` and each layer's
  magnitude ``m`` under PEFT's ``lora_magnitude_vector`` key; PEFT then computes the row norm from
  the base it is loaded on (a base trained in 4-bit differs from it as for LoRA). One adapter is
  DoRA on every layer or on none: ``use_dora`` is one setting of a ``LoraConfig``.

AsymLoRA and LoRA-MoE are collapsed for one task first (see :mod:`mmpeft.merge`); MixLoRA
cannot be exported.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mmpeft.errors import ConfigError, MergeError
from mmpeft.files import read_json, staged_dir, write_json
from mmpeft.merge import (
    Factors,
    Options,
    _stderr,
    batch_summary,
    dora_magnitude,
    is_dora,
    load_and_measure,
    lora_factors,
    plan,
)

PEFT_PREFIX = "base_model.model."
"""What PEFT puts before a module's path in its saved keys (``get_peft_model_state_dict`` of a ``PeftModel``)."""
WEIGHTS_NAME = "adapter_model.safetensors"
REPORT_NAME = "export_report.json"


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def peft_config(
    factors: dict[str, Factors], base_model: str, modules_to_save: list[str] | None, use_dora: bool = False
) -> Any:
    """The ``peft.LoraConfig`` whose layers have exactly these ranks and ``lora_alpha / r`` scalings
    (DoRA: ``use_dora``)."""
    try:
        from peft import LoraConfig
    except ImportError as exc:
        raise ConfigError("export --format peft needs the peft package (pip install 'peft>=0.21')") from exc
    ranks = {name: a.shape[0] for name, (a, _, _) in factors.items()}
    alphas = {name: _number(scaling * ranks[name]) for name, (_, _, scaling) in factors.items()}
    (r, alpha), _ = Counter(zip(ranks.values(), alphas.values())).most_common(1)[0]
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=sorted(factors),
        rank_pattern={re.escape(name): v for name, v in ranks.items() if v != r},
        alpha_pattern={re.escape(name): v for name, v in alphas.items() if v != alpha},
        lora_dropout=0.0,
        use_dora=use_dora,
        bias="none",
        modules_to_save=modules_to_save,
        base_model_name_or_path=base_model,
        task_type=None,
    )


def peft_tensors(
    factors: dict[str, Factors], extra: dict[str, torch.Tensor], magnitudes: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """PEFT's state dict: ``lora_A``/``lora_B`` weights of each layer, DoRA's ``magnitudes`` under PEFT's key
    (``lora_magnitude_vector``, no ``.weight``: what ``save_pretrained`` of a ``use_dora`` model writes), and
    ``extra`` (e.g. a projector) by its path."""
    tensors = {}
    for name, (a, b, _) in factors.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()  # (r, d_in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()  # (d_out, r)
    for name, m in (magnitudes or {}).items():
        tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = m.contiguous()  # (d_out,)
    for key, value in extra.items():
        tensors[f"{PEFT_PREFIX}{key}"] = value.detach().cpu().contiguous()
    return tensors


def write_sorted_targets(path: Path) -> None:
    """Rewrite PEFT's ``adapter_config.json`` with ``target_modules`` sorted: PEFT holds them in a set, which it
    saves in an order that changes from run to run; it reads any order back into a set."""
    config = read_json(path)
    if isinstance(config, dict) and isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        write_json(path, config)


def export_peft(
    adapter: str | os.PathLike, out: str | os.PathLike, *, progress: Callable[[str], None] = _stderr, **options: Any
) -> dict[str, Any]:
    """Write the adapter directory ``adapter`` as a PEFT LoRA to ``out`` (complete or not at all); returns the report.

    ``out`` must not be, contain or lie inside the adapter, the base or the data (ConfigError).

    ``options`` are the fields of :class:`~mmpeft.merge.Options`. A mixture is collapsed for
    ``task`` with the gates measured on ``data`` by the adapted model, its base loaded as in
    training (``quantization``); the report gives the collapse's largest logit error on a batch.
    """
    out = Path(out)
    p = plan(adapter, "lora", Options(**options), out)
    report: dict[str, Any] = {
        "adapter": p.adapter,
        "base_model": p.pretrained,
        "format": "peft",
        "task": p.options.task,
        "collapse": None,
    }
    gates: dict[str, torch.Tensor] = {}
    if p.routed:  # a mixture: measure the task's gates on the adapted model, as trained
        m = load_and_measure(p, progress)
        gates = m.gates
        report.update(quantization=p.options.quantization, batch=batch_summary(p, m), collapse=m.collapse.to_json())
        del m
    factors = {name: lora_factors(layer, gates.get(name)) for name, layer in p.adapted.items()}
    magnitudes = {name: dora_magnitude(layer) for name, layer in p.adapted.items() if is_dora(layer)}
    if magnitudes and len(magnitudes) != len(factors):
        dora = sorted({p.adapted[name].adapter_name for name in magnitudes})
        plain = sorted({layer.adapter_name for name, layer in p.adapted.items() if name not in magnitudes})
        raise MergeError(
            f"export --format peft: the adapter mixes DoRA layers ({', '.join(dora)}) with plain LoRA layers "
            f"({', '.join(plain)}); PEFT's LoraConfig applies use_dora to every layer, so it cannot hold both"
        )
    extra = {k: v for k, v in p.tensors.items() if ".adapter." not in k}  # the trained projector, if any
    config = peft_config(factors, p.pretrained, [p.projector] if p.projector else None, use_dora=bool(magnitudes))
    with staged_dir(out) as staging:
        config.save_pretrained(str(staging))
        write_sorted_targets(staging / "adapter_config.json")
        save_file(peft_tensors(factors, extra, magnitudes), str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(staging / REPORT_NAME, report)
    ranks = sorted({a.shape[0] for a, _, _ in factors.values()})
    kind = "DoRA" if magnitudes else "LoRA"
    progress(f"wrote {out}: PEFT {kind} on {len(factors)} layer(s), rank {'/'.join(map(str, ranks))}")
    return report


def cmd_export(argv: list[str]) -> int:
    from mmpeft.flags import parse
    from mmpeft.merge import options_of, tool_parser

    parser = tool_parser(
        "export",
        "Write an adapter in another library's format. --format peft: a LoRA (DoRA: a LoRA with use_dora) that "
        "peft.PeftModel.from_pretrained(base, OUT) loads (adapter_config.json + adapter_model.safetensors). "
        "AsymLoRA and LoRA-MoE are first collapsed for one --task (the collapse's logit error on a batch is "
        "printed and written to OUT/export_report.json); MixLoRA cannot be exported.",
    )
    parser.add_argument("--format", choices=["peft"], required=True, help="output format")
    args = parse(parser, argv)  # --batch-size or --batch_size
    report = export_peft(args.adapter, args.out, **options_of(args))
    print(json.dumps({"out": args.out, "collapse_max_logit_diff": (report["collapse"] or {}).get("max_logit_diff")}))
    return 0
