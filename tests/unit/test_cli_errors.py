"""What `tryage` says when it is given something it cannot use."""

from __future__ import annotations

from serve_app.cli import main


def test_serve_names_a_missing_library_and_offers_the_demo_only_for_the_default(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "library.yaml"
    assert main(["serve", "--library", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"no library at {missing}" in err and "demo" not in err
