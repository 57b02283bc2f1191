"""generate refuses every bad option with one ``error:`` line and exit status 2, before the model loads.

Bad numbers are refused before the checkpoint is even read; values the model cannot take (a size its codec
strides and patch size do not divide, ``--shift`` on an EDM model) and an ``--out`` that cannot be written
are refused before the weights load (a trip wire on ``load_for_inference`` proves it), and nothing is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import cli
from support.mounts import tmpfs

from dfm.app import generate as generate_cli
from dfm.app.cli import run_main
from dfm.app.config import resolve_config
from dfm.app.services import generation
from dfm.app.services.training import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A one-step run of the flow-matching WAN tiny recipe and of the EDM DiT tiny recipe."""
    root = tmp_path_factory.mktemp("gen_validation")
    for recipe in ("wan_tiny_t2v", "dit_tiny_edm"):
        train(resolve_config(recipe, None, [f"run.dir={root / recipe}", "train.max_steps=1", "logging.level=WARNING"]))
    return {"flow": root / "wan_tiny_t2v", "edm": root / "dit_tiny_edm"}


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if generation gets as far as loading the weights."""

    def trip_wire(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the request was refused")

    monkeypatch.setattr(generation, "load_for_inference", trip_wire)


def generate(*argv: str) -> int:
    return run_main(generate_cli.main, ["--prompt", "a red circle moving left slowly", *argv])


def errors(capsys: pytest.CaptureFixture) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--steps", "0", "--steps must be an integer >= 1, got 0"),
        ("--steps", "-2", "--steps must be an integer >= 1, got -2"),
        ("--frames", "0", "--frames must be an integer >= 1, got 0"),
        ("--height", "0", "--height must be an integer >= 1, got 0"),
        ("--width", "0", "--width must be an integer >= 1, got 0"),
        ("--fps", "0", "--fps must be a finite number > 0, got 0"),
        ("--fps", "inf", "--fps must be a finite number > 0, got inf"),
        ("--guidance", "nan", "--guidance must be a finite number >= 0 (1 = no guidance), got nan"),
        ("--shift", "-1", "--shift must be a finite number > 0, got -1"),
        ("--seed", "-1", "--seed must be an integer from 0 to 9223372036854775807, got -1"),
    ],
)
def test_a_bad_number_is_refused_before_the_checkpoint_is_read(
    option: str, value: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = tmp_path / "no_such_run"  # the number is refused first, so the missing checkpoint goes unnoticed
    assert generate("--checkpoint", str(missing), option, value, "--out", str(tmp_path / "o.mp4")) == 2
    assert errors(capsys) == [f"error: {message}"]
    assert list(tmp_path.iterdir()) == []


def test_the_cli_exits_2_with_one_error_line_for_zero_steps(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "zero.mp4"
    result = cli("generate", "--checkpoint", str(runs["flow"]), "--prompt", "x", "--steps", "0", "--out", str(out))
    assert result.returncode == 2
    assert (result.stderr, result.stdout) == ("error: --steps must be an integer >= 1, got 0\n", "")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kind", "argv", "message"),
    [
        (
            "flow",
            ["--height", "17"],
            "--height 17 does not fit this model: height must be one of 2, 4, 6, ... "
            "(VAE spatial stride 1 x model patch 2); nearest: 16 or 18",
        ),
        (
            "flow",
            ["--sampler", "edm_heun"],
            "--sampler edm_heun does not fit a flow-matching model (diffusion.kind=flow); use unipc or flow_euler",
        ),
        (
            "edm",
            ["--shift", "3"],
            "--shift applies to flow-matching models only (diffusion.kind=flow); {run} holds an EDM model "
            "(diffusion.kind=edm), whose Karras noise schedule has no shift: drop --shift",
        ),
    ],
)
def test_a_value_the_model_cannot_take_is_refused_before_it_loads(
    kind: str,
    argv: list[str],
    message: str,
    runs: dict[str, Path],
    no_loading: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    run = runs[kind]
    assert generate("--checkpoint", str(run), *argv, "--out", str(tmp_path / "o.mp4")) == 2
    assert errors(capsys) == [f"error: {message.format(run=run)}"]
    assert list(tmp_path.iterdir()) == []


def test_an_out_below_a_file_is_refused_before_the_model_loads(
    runs: dict[str, Path], no_loading: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    blocker = tmp_path / "samples"
    blocker.write_text("a file where the output directory should be")
    out = blocker / "nested" / "x.mp4"
    assert generate("--checkpoint", str(runs["flow"]), "--steps", "1", "--out", str(out)) == 2
    assert errors(capsys) == [f"error: --out {out}: {blocker} is a file, not a directory; choose another --out"]
    assert blocker.read_text() == "a file where the output directory should be"


def test_an_out_that_is_a_directory_is_refused(
    runs: dict[str, Path], no_loading: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "video.mp4"
    out.mkdir()
    assert generate("--checkpoint", str(runs["flow"]), "--out", str(out)) == 2
    assert errors(capsys) == [f"error: --out {out} is a directory; name a file to write"]


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A real read-only tmpfs (root ignores permission bits, not a read-only mount); skips where mounting is
    not permitted."""
    with tmpfs(tmp_path / "read_only", "ro,size=1m") as mount_point:
        yield mount_point


def test_an_out_on_a_read_only_file_system_is_refused_before_the_model_loads(
    runs: dict[str, Path], no_loading: None, read_only_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    out = read_only_dir / "samples" / "x.mp4"
    assert generate("--checkpoint", str(runs["flow"]), "--out", str(out)) == 2
    assert errors(capsys) == [
        f"error: --out {out}: cannot write in {read_only_dir} (Read-only file system); choose another --out"
    ]
