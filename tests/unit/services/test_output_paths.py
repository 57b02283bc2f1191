"""Up-front output checks: they refuse what cannot be written and leave no trace where everything can."""

from __future__ import annotations

from pathlib import Path

import pytest

from dfm.app.services.paths import check_output_dir, check_output_file


def test_a_writable_place_passes_and_nothing_is_created(tmp_path: Path) -> None:
    (tmp_path / "old.mp4").write_bytes(b"replaced later")
    check_output_file(tmp_path / "old.mp4", option="--out")  # an existing file may be replaced
    check_output_file(tmp_path / "new" / "deeper" / "x.mp4", option="--out")  # missing directories are made later
    check_output_dir(tmp_path / "data" / "train", option="--out")
    check_output_dir(tmp_path, option="--out")
    assert [p.name for p in tmp_path.iterdir()] == ["old.mp4"]  # no directory made, no probe file left


def test_a_file_in_the_way_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "runs"
    blocker.write_text("x")
    target = blocker / "a" / "b"
    with pytest.raises(ValueError) as caught:
        check_output_dir(target, option="--out")
    assert str(caught.value) == f"--out {target}: {blocker} is a file, not a directory; choose another --out"
    with pytest.raises(ValueError) as caught:
        check_output_dir(blocker, option="--out")
    assert str(caught.value) == (
        f"--out {blocker} is an existing file, not a directory; name a directory (created if missing)"
    )
    with pytest.raises(ValueError) as caught:
        check_output_file(tmp_path, option="--out")
    assert str(caught.value) == f"--out {tmp_path} is a directory; name a file to write"
