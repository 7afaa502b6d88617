"""Atomic writers: the target holds the old or the new content, never a mix; folders swap at the end."""

import json

import pytest

from sparsebert.atomic import replace_dir, write_json_atomic, write_text_atomic


def test_write_json_atomic_replaces_and_leaves_no_tmp(tmp_path):
    p = tmp_path / "metrics.json"
    p.write_text("old", encoding="utf-8")
    write_json_atomic(p, {"f1": 1.5})
    assert json.loads(p.read_text()) == {"f1": 1.5}
    assert sorted(x.name for x in tmp_path.iterdir()) == ["metrics.json"]


def test_unserialisable_json_keeps_the_old_file(tmp_path):
    p = tmp_path / "metrics.json"
    p.write_text('{"ok": 1}', encoding="utf-8")
    with pytest.raises(TypeError):
        write_json_atomic(p, {"bad": object()})
    assert json.loads(p.read_text()) == {"ok": 1}


def test_write_text_atomic(tmp_path):
    p = write_text_atomic(tmp_path / "recipe.yaml", "a: 1\n")
    assert p.read_text() == "a: 1\n"


def test_replace_dir_swaps_in_the_new_folder(tmp_path):
    dst = tmp_path / "deploy"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    src = tmp_path / "deploy.tmp"
    src.mkdir()
    (src / "new.txt").write_text("new")
    replace_dir(src, dst)
    assert [x.name for x in dst.iterdir()] == ["new.txt"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["deploy"]


def test_replace_dir_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        replace_dir(tmp_path / "nope", tmp_path / "deploy")


def test_replace_dir_over_a_file_and_a_stale_old_file(tmp_path):
    dst = tmp_path / "deploy"
    dst.write_text("a file where the folder goes")
    (tmp_path / "deploy.old").write_text("stale")
    src = tmp_path / "deploy.tmp"
    src.mkdir()
    (src / "model.onnx").write_text("x")
    replace_dir(src, dst)
    assert dst.is_dir() and [x.name for x in dst.iterdir()] == ["model.onnx"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["deploy"]
