"""Writing files and folders so that a crash never leaves a complete-looking partial one.

A file is written under a temporary name in its own folder, flushed to disk, then renamed
over the target (``os.replace`` is atomic within one file system); a folder is built as a
temporary sibling and renamed into place. Readers therefore see the old version or the new
one, never half of either. Used by the shard builder, the tiny-model builder, adapter
directories and training checkpoints. Everything written gets the mode the user's umask gives
(0644 under the usual 022), however its writer created it.

An output must never be, contain or lie inside one of the command's inputs
(:func:`refuse_output_over_inputs`): replacing a folder would otherwise delete the input.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from mmpeft.errors import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: str | os.PathLike, directory: bool = False) -> None:
    # mkstemp and mkdtemp create private (0600 / 0700) entries; what they become is a normal file
    # or folder, readable as the user's umask says, like one made with open() or mkdir().
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _usual_modes(folder: Path) -> None:
    # Writers that go through a temporary file of their own (safetensors' save_file, and so
    # transformers' save_pretrained) leave it 0600: everything in a finished folder gets the usual mode.
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            _usual_mode(Path(root) / name, directory=True)
        for name in files:
            path = Path(root) / name
            if not path.is_symlink():
                _usual_mode(path, directory=bool(path.stat().st_mode & 0o100))  # an executable keeps its x bits


def _fsync_dir(folder: Path) -> None:
    # The rename itself is only durable once the folder's entry is on disk (POSIX).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform / file system
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_leftovers(path: str | os.PathLike) -> None:
    """Delete the temporary siblings of ``path`` that a killed writer left (one writer per path at a time)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for pattern in (f".{path.name}.*.tmp", f".{path.name}.writing-*", f".{path.name}.old-*"):
        for leftover in path.parent.glob(pattern):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        _usual_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json(path: str | os.PathLike, value: Any) -> None:
    """``value`` as indented UTF-8 JSON at ``path``, atomically."""
    with atomic_file(path, "w", encoding="utf-8") as stream:
        stream.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON at ``path``, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def replace_dir(staging: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename the finished folder ``staging`` to ``out``, replacing what was there.

    A folder can only be renamed onto an empty one, so an old ``out`` is moved aside first and
    deleted only once the new one is in place.
    """
    staging, out = Path(staging), Path(out)
    retired = None
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, retired / "old")
    os.replace(staging, out)
    _fsync_dir(out.parent)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


@contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling folder of ``out`` to fill; on success it replaces ``out``, on error it is deleted."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.writing-", dir=out.parent))
    _usual_mode(staging, directory=True)
    try:
        yield staging
        _usual_modes(staging)
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


InputPaths = Mapping[str, "str | os.PathLike | Iterable[str | os.PathLike] | None"]


def refuse_output_over_inputs(out: str | os.PathLike, inputs: InputPaths, what: str = "--out") -> None:
    """Raise :class:`~mmpeft.errors.ConfigError` when the output ``out`` is, contains or lies inside one of ``inputs``.

    ``inputs`` maps how the user named each input (``"--adapter"``, ``"--base"``) to its path, a
    list of paths, or ``None`` (no such input). Paths are compared absolute, symbolic links
    followed; an input that does not exist on disk (a hub id, say) is skipped: there is nothing
    of it to lose. Call it before reading anything, so a refused command writes nothing::

        refuse_output_over_inputs(args.out, {"--src": args.src, "--images": args.images})
    """
    target = Path(os.path.abspath(Path(out).expanduser())).resolve()
    for name, value in inputs.items():
        paths = [value] if value is None or isinstance(value, (str, os.PathLike)) else list(value)
        for path in paths:
            if path is None or not Path(path).expanduser().exists():
                continue
            source = Path(path).expanduser().resolve()
            if source == target:
                relation = "is"
            elif source.is_relative_to(target):
                relation = "contains"
            elif target.is_relative_to(source):
                relation = "lies inside"
            else:
                continue
            raise ConfigError(
                f"{what} {str(out)!r} {relation} the input {name} {str(path)!r}: "
                "writing there would change or replace it; "
                "give a path outside the inputs"
            )
