"""pipeline.io: the one atomic write (temp file beside the target, fsync policy, rename)."""

from __future__ import annotations

import os

import pytest

from pipeline import io


def test_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.json"
    io.write_text(target, "old")
    io.write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def _write_then_fail(target):
    with io.atomic_path(target) as tmp:
        tmp.write_bytes(b"half a fi")
        raise RuntimeError("disk full")


def test_failed_block_keeps_old_file_and_removes_temp(tmp_path):
    target = tmp_path / "manifest.parquet"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="disk full"):
        _write_then_fail(target)
    assert target.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [target]


def test_temp_names_are_recognised(tmp_path):
    with io.atomic_path(tmp_path / "x.nii") as tmp:
        assert io.is_temp(tmp)
        assert tmp.parent == tmp_path
        tmp.write_bytes(b"1")
    assert not io.is_temp(tmp_path / "x.nii")
    assert not io.is_temp(tmp_path / "img-1.tmp-notes.nii")  # not hidden: a user's file


@pytest.mark.parametrize(("durable", "expected"), [(True, 1), (False, 0)])
def test_fsync_policy(tmp_path, monkeypatch, durable, expected):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    io.write_bytes(tmp_path / "a.bin", b"x", durable=durable)
    assert len(calls) == expected
