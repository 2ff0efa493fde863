"""What every data recipe shares: numbered source records in, task-labelled WebDataset shards out.

A recipe (registered under the ``mmpeft.data_recipes`` entry-point group) subclasses
:class:`ShardRecipe` and says only how many source records it has and how to turn record
``i`` into a :class:`Record`; :meth:`ShardRecipe.build` does the rest:

- record ``i`` always lands in shard ``i // samples_per_shard``, so shards are the same
  whatever happened before and a build can resume shard by shard;
- each shard is written under a temporary name, fsynced, then renamed: an interrupted build never
  leaves a truncated shard under a final name. Finished shards are listed in
  ``dataset.json.partial`` (written before the first shard, replaced atomically after each one);
  re-running the same build keeps them and continues;
- a folder that holds anything else a build would replace (another recipe's or other arguments'
  ``dataset.json`` or unfinished build, or ``*.tar`` files this recipe and these arguments did not
  write) is refused with :class:`OutputInUse`, naming what is there, unless ``overwrite`` is given
  (which replaces the index and the shards named like this build's; other files stay);
- a bad source record (missing or corrupt image, malformed fields) raises :class:`BadRecord`:
  it is reported with its id, counted by reason in the index, and the build goes on; a build in
  which no record became a sample is an error (:class:`~mmpeft.errors.DataError`) naming the
  source and the reasons, and leaves no shard and no index behind;
- ``dataset.json`` (the index) is written last: shard list with samples, bytes and samples per
  task, the sorted task vocabulary (task id = position), the recipe and its arguments, and the
  generation metrics of each task when the recipe chooses them (:attr:`ShardRecipe.metrics`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import webdataset as wds
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mmpeft.errors import ConfigError, DataError
from mmpeft.files import atomic_file, read_json, write_json

FORMAT = "mmpeft-shards/1"
INDEX = "dataset.json"
"""Each shard directory's index."""
PARTIAL = INDEX + ".partial"
"""The shards finished so far by a build in progress (gone once ``dataset.json`` is written)."""
REPORT_FIRST = 20
"""Bad records reported one by one (all are counted, and the first 100 ids kept in the index)."""
KEEP_IN_INDEX = 100

log = logging.getLogger("mmpeft.data")

_KEY = re.compile(r"[A-Za-z0-9_\-]+")


class OutputInUse(ConfigError):
    """The output folder of a build holds another data set (or files the build would replace)."""

    def __init__(self, out: Path, found: str, hint: str = "pass --overwrite to replace them") -> None:
        super().__init__(f"{out} already holds {found}; use another output folder, or {hint}")
        self.out, self.found = out, found


class BadRecord(Exception):
    """A source record that cannot become a sample; ``reason`` names its counter in the index."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Record:
    """One sample as a recipe produces it (see docs/data.md for the shard format)."""

    key: str
    """Unique within the build; letters, digits, ``_`` and ``-`` only (webdataset splits keys on dots)."""
    task: str
    messages: list[dict[str, Any]]
    """The chat; the k-th ``{"type": "image"}`` part is ``images[k]``."""
    images: list[tuple[bytes, str]] = field(default_factory=list)
    """Encoded image files and their extensions (``jpg``, ``png``, ...), written unchanged."""
    id: str | None = None
    """The source's own id of the record, kept in the sample's JSON."""
    references: list[str] | None = None
    """Acceptable answers the evaluation scores generated answers against (default: the final assistant turn)."""

    def to_sample(self) -> dict[str, Any]:
        if not _KEY.fullmatch(self.key):
            raise ValueError(f"sample key {self.key!r} may only hold letters, digits, '_' and '-'")
        n_parts = sum(p.get("type") == "image" for m in self.messages for p in m["content"] if isinstance(p, dict))
        if n_parts != len(self.images):
            raise BadRecord("image_count_mismatch", f"{n_parts} image part(s) in the chat, {len(self.images)} image(s)")
        meta = {"task": self.task, "messages": self.messages, "id": self.id if self.id is not None else self.key}
        if self.references is not None:
            meta["references"] = self.references
        sample: dict[str, Any] = {"__key__": self.key, "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
        for k, (data, ext) in enumerate(self.images):
            sample[f"img{k}.{ext}"] = data
        return sample


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG, for a :class:`Record`'s ``images`` (``(png_bytes(im), "png")``)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def checked_image(data: bytes, what: str) -> tuple[bytes, str]:
    """``data`` and its file extension after decoding it completely (a truncated file fails here, not in training)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            fmt = (image.format or "").lower()
    except Exception as exc:  # PIL raises many types for corrupt files
        raise BadRecord("bad_image", f"{what}: {exc}") from exc
    ext = {"jpeg": "jpg", "mpo": "jpg"}.get(fmt, fmt)
    if ext not in ("jpg", "png", "webp", "bmp"):
        raise BadRecord("bad_image", f"{what}: unsupported image format {fmt or '?'}")
    return data, ext


@dataclass(kw_only=True)
class ShardRecipe:
    """Base of the data recipes: subclasses implement :meth:`__len__` and :meth:`record`."""

    name: ClassVar[str] = "?"
    """The recipe's registered name, written into the index."""
    metrics: ClassVar[dict[str, list[str]]] = {}
    """Generation metrics per task that validation and test score (``mmpeft.metrics.METRICS``), written into the
    index."""

    samples_per_shard: int = 1000
    """Source records per tar shard (bad ones are left out, so a shard may hold fewer samples)."""
    prefix: str = "train"
    """Shard file names are ``{prefix}-000000.tar``, ``{prefix}-000001.tar``, ..."""

    def __post_init__(self) -> None:
        # Checked at construction, so a bad CLI or config value fails before any file is touched.
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if not _KEY.fullmatch(self.prefix):
            raise ValueError(f"prefix must be a file-name prefix of letters, digits, '_' and '-', got {self.prefix!r}")

    # -- what a recipe implements ------------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    def record(self, index: int) -> Record:
        """Source record ``index`` as a sample; raise :class:`BadRecord` when it cannot be one."""
        raise NotImplementedError

    def record_id(self, index: int) -> str:
        """How bad-record reports name record ``index``."""
        return str(index)

    # -- shared ------------------------------------------------------------------------------
    def args(self) -> dict[str, Any]:
        """The fields as JSON values (the index's ``args``)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def _identity(self) -> dict[str, Any]:
        return {"format": FORMAT, "recipe": self.name, "args": self.args()}

    def _write_shard(
        self, out: Path, shard: int, bad: list[dict[str, str]], bar: Progress, bar_task: Any
    ) -> dict[str, Any]:
        name = self.shard_name(shard)
        counts: Counter[str] = Counter()
        start = shard * self.samples_per_shard
        with atomic_file(out / name) as stream:
            # mtime=0 keeps tar headers free of the wall clock (same bytes on every build);
            # encoder=False makes the writer refuse anything that is not bytes already.
            with wds.TarWriter(stream, encoder=False, mtime=0) as writer:
                for i in range(start, min(start + self.samples_per_shard, len(self))):
                    try:
                        record = self.record(i)
                        writer.write(record.to_sample())
                        counts[record.task] += 1
                    except BadRecord as exc:
                        bad.append({"id": self.record_id(i), "reason": exc.reason, "detail": str(exc)})
                        if len(bad) <= REPORT_FIRST:
                            log.warning("bad record %s (%s): %s", self.record_id(i), self.name, exc)
                    bar.advance(bar_task)
        return {
            "name": name,
            "samples": sum(counts.values()),
            "bytes": (out / name).stat().st_size,
            "tasks": dict(sorted(counts.items())),
        }

    def describe_source(self) -> str:
        """How errors about the whole source name it (a source recipe: its file)."""
        return f"recipe {self.name}"

    def no_sample_hint(self) -> str:
        """Said after "none of its records became a sample" (a source recipe: what may be wrong with its file)."""
        return ""

    def _is_shard_name(self, name: str) -> bool:
        return re.fullmatch(rf"{re.escape(self.prefix)}-\d{{6}}\.tar", name) is not None

    def _check_out(self, out: Path, identity: dict[str, Any], replace_own_recipe: bool) -> None:
        """Raise :class:`OutputInUse` when ``out`` holds something this build would replace that it did not write.

        Its own earlier work is this recipe with these arguments (with ``replace_own_recipe``: with any
        arguments): a finished build (``dataset.json``) or an unfinished one (``dataset.json.partial``),
        the shards these list, and the shards named like its own. Anything else is another data set's:
        a ``dataset.json`` or unfinished build of another recipe (or other arguments), and every other
        ``*.tar`` file.
        """
        if out.exists() and not out.is_dir():
            raise ConfigError(f"{out} is not a folder")
        if not out.is_dir():
            return
        found: list[str] = []
        listed: set[str] = set()
        own = False
        for name, what in ((INDEX, "a data set"), (PARTIAL, "an unfinished build")):
            if not (out / name).exists():
                continue
            value = read_json(out / name)
            if not isinstance(value, dict) or value.get("format") != FORMAT:
                found.append(f"a {name} that is not an mmpeft shard index")
                continue
            shards = [s.get("name") for s in value.get("shards") or [] if isinstance(s, dict)]
            listed.update(shards)
            same_recipe = value.get("recipe") == self.name
            if {k: value.get(k) for k in identity} == identity or (same_recipe and replace_own_recipe):
                own = True
            else:
                other = " with other arguments" if same_recipe else ""
                found.append(f"{what} of the {value.get('recipe')!r} recipe{other} ({name}, {len(shards)} shard(s))")
        tars = sorted(
            p.name for p in out.glob("*.tar") if p.name not in listed and not (own and self._is_shard_name(p.name))
        )
        if tars:
            more = f" and {len(tars) - 5} more" if len(tars) > 5 else ""
            found.append(f"{len(tars)} tar file(s) this build did not write ({', '.join(tars[:5])}{more})")
        if found:
            raise OutputInUse(out, " and ".join(found))

    def _remove_own(self, out: Path, names: list[str], created: bool) -> None:
        """Delete the files this build wrote (and ``out`` itself when the build created it and it is empty)."""
        for name in names:
            (out / name).unlink(missing_ok=True)
        if created:
            try:
                out.rmdir()
            except OSError:  # not empty: something else was put there meanwhile
                pass

    def _no_sample_error(self, total: int, bad: list[dict[str, str]]) -> DataError:
        reasons = ", ".join(
            f"{r} {n}" for r, n in sorted(Counter(b["reason"] for b in bad).items(), key=lambda rn: (-rn[1], rn[0]))
        )
        example = f" (e.g. {bad[0]['id']}: {bad[0]['detail']:.300})" if bad else ""
        message = (
            f"{self.describe_source()}: none of its {total} record(s) became a sample: "
            f"{reasons or 'no reason recorded'}{example}"
        )
        return DataError(message + self.no_sample_hint())

    def build(
        self,
        out_dir: str | os.PathLike,
        progress: bool = True,
        overwrite: bool = False,
        replace_own_recipe: bool = False,
    ) -> dict[str, Any]:
        """Write the shards and ``dataset.json`` into ``out_dir`` (resuming an interrupted build); return the index.

        Raises :class:`OutputInUse` when ``out_dir`` holds another data set, unless ``overwrite``.
        ``replace_own_recipe``: a data set (or unfinished build) of this recipe with other arguments
        is not another's (``data.prepare``, whose config names the folder as this recipe's output).
        """
        out = Path(out_dir)
        identity = self._identity()
        if not overwrite:
            self._check_out(out, identity, replace_own_recipe)
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise ConfigError(f"{out} is not a folder") from exc
        # From here on the directory is not a finished build until the new index is written.
        (out / INDEX).unlink(missing_ok=True)
        partial = read_json(out / PARTIAL)
        done: list[dict[str, Any]] = []
        bad: list[dict[str, str]] = []
        if isinstance(partial, dict) and {k: partial.get(k) for k in identity} == identity:
            for shard in partial.get("shards", []):  # keep the finished shards that are intact, in order
                path = out / shard["name"]
                if (
                    shard["name"] != self.shard_name(len(done))
                    or not path.is_file()
                    or path.stat().st_size != shard["bytes"]
                ):
                    break
                done.append(shard)
            bad = [b for b in partial.get("bad", []) if int(b.get("shard", -1)) < len(done)]
            if done:
                log.info("resuming the build in %s: %d shard(s) already written", out, len(done))
        total = len(self)
        n_shards = max(1, -(-total // self.samples_per_shard))
        columns = (
            TextColumn(f"[bold]{self.name}[/bold] {{task.description}}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        # Listed before the first shard is written, so that a build killed at any moment finds its own files again.
        write_json(out / PARTIAL, {**identity, "shards": done, "bad": bad})
        with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            bar_task = bar.add_task(str(out), total=total, completed=min(total, len(done) * self.samples_per_shard))
            for shard in range(len(done), n_shards):
                new_bad: list[dict[str, str]] = []
                done.append(self._write_shard(out, shard, new_bad, bar, bar_task))
                bad += [dict(b, shard=shard) for b in new_bad]
                write_json(out / PARTIAL, {**identity, "shards": done, "bad": bad})
        if total and not any(s["samples"] for s in done):
            self._remove_own(out, [s["name"] for s in done] + [PARTIAL], created)
            raise self._no_sample_error(total, bad)

        written = {s["name"] for s in done}
        # Shards of an earlier, larger build (a glob must see only this one) and temporary files of an interrupted one.
        shard = rf"{re.escape(self.prefix)}-\d{{6}}\.tar"
        stale = re.compile(rf"{shard}(\.tmp)?|\.({shard}|{re.escape(INDEX)}|{re.escape(PARTIAL)})\.\w+\.tmp")
        for path in out.iterdir():
            if stale.fullmatch(path.name) and path.name not in written:
                path.unlink()
        tasks = sorted({t for s in done for t in s["tasks"]})
        index = {
            **identity,
            "tasks": tasks,
            "shards": done,
            "samples": sum(s["samples"] for s in done),
            "bytes": sum(s["bytes"] for s in done),
            "samples_per_task": {t: sum(s["tasks"].get(t, 0) for s in done) for t in tasks},
            **({"metrics": {t: self.metrics[t] for t in tasks if t in self.metrics}} if self.metrics else {}),
            "bad_records": {
                "count": len(bad),
                "by_reason": dict(sorted(Counter(b["reason"] for b in bad).items())),
                "first": [{k: b[k] for k in ("id", "reason", "detail")} for b in bad[:KEEP_IN_INDEX]],
            },
        }
        write_json(out / INDEX, index)
        (out / PARTIAL).unlink(missing_ok=True)
        if bad:
            log.warning("%d bad record(s) left out of %s: %s", len(bad), out, index["bad_records"]["by_reason"])
        return index


def is_built(out_dir: str | os.PathLike, recipe: ShardRecipe) -> bool:
    """True when ``out_dir`` holds a finished build of ``recipe`` (same recipe and arguments, shards intact).

    Every listed shard must exist with its recorded size, so a deleted or truncated shard
    means a rebuild rather than a failure in the middle of training.
    """
    index = read_json(Path(out_dir) / INDEX)
    if not isinstance(index, dict) or {k: index.get(k) for k in ("format", "recipe", "args")} != recipe._identity():
        return False
    try:
        return all((Path(out_dir) / s["name"]).stat().st_size == s["bytes"] for s in index["shards"])
    except (OSError, KeyError, TypeError):
        return False
