"""Atomic files and staged folders end up with the usual permissions, and leave nothing behind on failure."""

from __future__ import annotations

import os
import stat

import pytest

from mmpeft.files import atomic_file, staged_dir, write_json


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_folders_get_the_umask_modes_not_private_ones(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with staged_dir(tmp_path / "d") as staging:
            (staging / "f").write_text("f")
    finally:
        os.umask(old)
    assert mode(tmp_path / "a.json") == 0o644  # mkstemp alone would leave 0600: unreadable for a shared data folder
    assert mode(tmp_path / "d") == 0o755
    assert (tmp_path / "d" / "f").read_text() == "f"


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "t.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as stream:
            stream.write(b"new, half")
            raise RuntimeError("crash")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["t.bin"]
    with pytest.raises(RuntimeError):
        with staged_dir(tmp_path / "t") as staging:
            (staging / "x").write_text("x")
            raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin"]


def test_what_a_killed_writer_left_is_removed_by_the_next_write(tmp_path):
    for name in (".last.ckpt.abc123.tmp", ".last-adapter.writing-x1y2", ".last-adapter.old-z3", ".other.ckpt.q.tmp"):
        (tmp_path / name).mkdir() if "adapter" in name else (tmp_path / name).write_bytes(b"partial")
    with atomic_file(tmp_path / "last.ckpt") as stream:
        stream.write(b"ckpt")
    with staged_dir(tmp_path / "last-adapter") as staging:
        (staging / "adapter_config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.ckpt.q.tmp", "last-adapter", "last.ckpt"]
