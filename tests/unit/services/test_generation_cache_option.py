"""``--cache``: ``METHOD:THRESHOLD`` or ``off``, refused with the option and its forms otherwise (no checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dfm.app import generate as generate_cli
from dfm.app.cli import run_main
from dfm.app.services.generation_request import GenerateRequest, cache_option
from dfm.domain.networks.step_cache import StepCacheConfig

FORMS = "--cache must be METHOD:THRESHOLD with METHOD first_block or teacache (e.g. first_block:0.05), or off; got "


def request(**kw: object) -> GenerateRequest:
    return GenerateRequest(checkpoint="runs/x", prompts=["a red circle"], out="out/x.mp4", **kw)


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("first_block:0.05", StepCacheConfig(method="first_block", threshold=0.05)),
        ("teacache:0.08", StepCacheConfig(method="teacache", threshold=0.08)),
        (" teacache:0 ", StepCacheConfig(method="teacache", threshold=0.0)),
        ("off", None),
        (None, None),
    ],
)
def test_good_values_become_a_step_cache_config(value: str | None, want: StepCacheConfig | None) -> None:
    assert request(cache=value).cache == want
    assert request().cache is None  # off by default


def test_a_config_is_kept() -> None:
    config = StepCacheConfig(method="first_block", threshold=0.1, warmup=3)
    assert cache_option(config) is config


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("first_block", FORMS + "'first_block'"),
        ("fbc:0.05", FORMS + "'fbc:0.05'"),
        ("0.05", FORMS + "'0.05'"),
        ("", FORMS + "''"),
        (
            "teacache:fast",
            "--cache teacache:fast: the threshold must be a finite number >= 0 (0 = never reuse; "
            "larger = faster and further from the uncached result), got 'fast'",
        ),
        (
            "teacache:-0.1",
            "--cache teacache:-0.1: the threshold must be a finite number >= 0 (0 = never reuse; "
            "larger = faster and further from the uncached result), got '-0.1'",
        ),
        (
            "first_block:nan",
            "--cache first_block:nan: the threshold must be a finite number >= 0 (0 = never reuse; "
            "larger = faster and further from the uncached result), got 'nan'",
        ),
    ],
)
def test_a_bad_value_is_refused_naming_the_option_and_its_forms(value: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        request(cache=value)
    assert str(caught.value) == message


def test_the_cli_refuses_a_bad_cache_before_the_checkpoint_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--checkpoint", str(tmp_path / "none"), "--prompt", "x", "--out", str(tmp_path / "o.mp4")]
    assert run_main(generate_cli.main, [*argv, "--cache", "teacache"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {FORMS}'teacache'"]
    assert list(tmp_path.iterdir()) == []


def test_the_cli_passes_the_cache_through() -> None:
    args = generate_cli.build_parser().parse_args(["--checkpoint", "r", "--prompt", "x", "--out", "o.mp4"])
    assert args.cache is None
    args = generate_cli.build_parser().parse_args(
        ["--checkpoint", "r", "--prompt", "x", "--out", "o.mp4", "--cache", "first_block:0.05"]
    )
    assert args.cache == "first_block:0.05"
