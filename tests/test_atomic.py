"""Atomic writes: a file is either its old content or its new one, never half-written, and no
temporary file is left behind, whether the write succeeds or fails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pflbench.atomic import atomic_path, save_npz, write_text


def test_write_text_replaces_content_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    write_text(target, "first")
    write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_atomic_path_failure_keeps_original_and_cleans_up(tmp_path):
    target = tmp_path / "results.json"
    write_text(target, "original")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        with atomic_path(target) as tmp:
            assert Path(tmp).parent == tmp_path and Path(tmp) != target
            with open(tmp, "w") as f:
                f.write("half-writ")
            raise RuntimeError("killed mid-write")

    assert target.read_text() == "original"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_atomic_path_failure_before_first_write_creates_nothing(tmp_path):
    target = tmp_path / "new.txt"
    with pytest.raises(KeyError):
        with atomic_path(target):
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_save_npz_writes_exactly_the_target(tmp_path):
    arrays = {"x": np.arange(12, dtype=np.uint8).reshape(3, 4), "y": np.array([0, 1, 2], dtype=np.int64)}
    save_npz(tmp_path / "x.npz", arrays)
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]  # not x.npz.npz, no temp file
    got = np.load(tmp_path / "x.npz")
    for key in arrays:
        np.testing.assert_array_equal(got[key], arrays[key])
