"""attnlab.files: atomic writes that leave the old file on failure and give the new one the usual mode."""

import os
import stat

import pytest

from attnlab.files import write_json, write_text


def test_a_written_file_gets_the_mode_open_would_give_not_mkstemps_private_one(tmp_path):
    mask = os.umask(0o022)
    try:
        write_text(tmp_path / "report.md", "hello\n")
        write_json(tmp_path / "results.json", {"a": 1})
    finally:
        os.umask(mask)
    for name in ("report.md", "results.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_a_failed_write_leaves_the_old_file_as_it_was(tmp_path):
    path = tmp_path / "results.json"
    write_text(path, "old\n")
    with pytest.raises(TypeError):
        write_json(path, {"not json": object()})
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
