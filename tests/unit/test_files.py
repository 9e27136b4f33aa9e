"""Artefacts written beside, then renamed: a reader sees the old version or the new one."""

from __future__ import annotations

import pytest

from serve_app.files import new_folder, write_text


def test_write_text_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "library.yaml"
    path.write_text("old")
    write_text(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["library.yaml"]


def test_a_new_folder_replaces_the_old_one_whole(tmp_path):
    folder = tmp_path / "router"
    folder.mkdir()
    (folder / "router.json").write_text("old")
    (folder / "stale.bin").write_text("from an earlier run")
    with new_folder(folder) as tmp:
        assert tmp != folder and tmp.parent == folder.parent
        assert (folder / "router.json").read_text() == "old"  # still the old one meanwhile
        (tmp / "router.json").write_text("new")
    assert (folder / "router.json").read_text() == "new"
    assert not (folder / "stale.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router"]


def test_a_failed_write_leaves_the_old_folder_as_it_was(tmp_path):
    folder = tmp_path / "router"
    folder.mkdir()
    (folder / "router.json").write_text("old")
    with pytest.raises(RuntimeError), new_folder(folder) as tmp:
        (tmp / "router.json").write_text("half")
        raise RuntimeError("crash while writing")
    assert (folder / "router.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router"]
