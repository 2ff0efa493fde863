"""How much of each task's answer vocabulary the suite's base model was ever trained to produce.

    python benchmarks/conflict_suite/vocabulary.py

For every task of both mixtures: the share of its answer tokens (300 samples, the suite's tokenizer)
that never occur in the answers of the base model's general training (its 16,000 samples), with a
few of those tokens; for each base vocabulary (``BaseSettings.vocabulary``: ``general``, the first
mixture's base, and ``format``, the second's). docs/benchmarks.md quotes it next to the second
mixture's results.
"""

from __future__ import annotations

import collections
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.conflict_suite.base import BaseSettings, base_dir  # noqa: E402
from benchmarks.conflict_suite.data import MIXTURES, VOCABULARIES, general_samples, task_sample  # noqa: E402
from benchmarks.conflict_suite.run import CACHE, base_settings  # noqa: E402


def answer(messages) -> str:
    return messages[-1]["content"][0]["text"]


def main() -> None:
    from transformers import AutoTokenizer

    settings = BaseSettings()
    folder = base_dir(CACHE, settings)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise SystemExit(f"no base model in {folder}: run benchmarks/conflict_suite/run.py --quick first")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    for vocabulary in VOCABULARIES:
        pool = base_settings(settings, vocabulary).pool  # the samples the suite's base of that vocabulary trains on
        trained = collections.Counter(
            t for s in general_samples(pool, settings.seed, vocabulary) for t in ids(answer(s.messages))
        )
        print(f"base vocabulary {vocabulary}: distinct answer tokens in the base's general training: {len(trained)}")
        for mixture, tasks in MIXTURES.items():
            for task in tasks:
                used = collections.Counter()
                for i in range(300):
                    used.update(ids(answer(task_sample(task, random.Random(f"x{i}"))[0])))
                unseen = [t for t in used if not trained[t]]
                share = sum(used[t] for t in unseen) / sum(used.values())
                examples = [tokenizer.decode([t]) for t in unseen][:6]
                print(f"  {mixture:9s} {task:15s} never a training target: {share:4.0%}  e.g. {examples}")


if __name__ == "__main__":
    main()
