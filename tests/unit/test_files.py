"""Artefacts written beside, then renamed: a reader sees the old version or the new one."""

from __future__ import annotations

import pytest

from serve_app.files import new_folder, plain_mode, readable, write_text


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


def test_saved_weights_are_as_readable_as_any_file_written_here(tmp_path):
    # safetensors writes 0600: a replica running as another user could not load them.
    import torch
    from safetensors.torch import save_file

    from serve_app.router import HeadConfig, RouterHead, save_head

    with new_folder(tmp_path / "router") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "reference.safetensors"))
    head = (
        save_head(RouterHead(HeadConfig(experts=["a", "b"])), tmp_path / "smoke")
        / "head.safetensors"
    )
    (tmp_path / "plain.txt").write_text("x")
    modes = {
        p.name: p.stat().st_mode & 0o777
        for p in (tmp_path / "router" / "reference.safetensors", head, tmp_path / "plain.txt")
    }
    assert set(modes.values()) == {plain_mode()}, modes
    assert plain_mode() & 0o044, "this test needs a umask that lets others read"


def test_readable_leaves_a_linked_file_alone(tmp_path):
    outside = tmp_path / "elsewhere.bin"
    outside.write_text("not ours to open up")
    outside.chmod(0o600)
    folder = tmp_path / "lib"
    folder.mkdir()
    (folder / "link.bin").symlink_to(outside)
    (folder / "own.bin").write_text("x")
    (folder / "own.bin").chmod(0o600)
    readable(folder)
    assert outside.stat().st_mode & 0o777 == 0o600
    assert (folder / "own.bin").stat().st_mode & 0o777 == plain_mode()
