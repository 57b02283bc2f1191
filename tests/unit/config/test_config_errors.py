"""User-facing error messages of config structuring: exact formats, all problems in one error."""

from __future__ import annotations

import re

import pytest

from dfm.app.config import ConfigError, config_from_dict, resolve_config


def problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_unknown_key_suggests_the_closest_key() -> None:
    assert problems({"model": {"num_layer": 3}}) == ["model.num_layer: unknown key; did you mean model.num_layers?"]


def test_unknown_key_without_a_close_match_has_no_suggestion() -> None:
    assert problems({"model": {"zzzz": 3}}) == ["model.zzzz: unknown key"]


def test_unknown_section_suggests_the_closest_section() -> None:
    assert problems({"trian": {"max_steps": 3}}) == ["trian: unknown key; did you mean train?"]


def test_unknown_key_of_the_selected_variant() -> None:
    # EDM has no ``shift``: the union tag selects the class whose keys are valid
    data = {"diffusion": {"kind": "edm", "shift": 2.0}, "sample": {"sampler": "edm_heun"}}
    assert problems(data) == ["diffusion.shift: unknown key"]


def test_wrong_type_names_key_value_and_type() -> None:
    assert problems({"train": {"max_steps": "ten"}}) == ["train.max_steps: expected int, got 'ten'"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"seed": True}, "seed: expected int, got True"),
        ({"train": {"max_steps": 1.5}}, "train.max_steps: expected int, got 1.5"),
        ({"optim": {"lr": "fast"}}, "optim.lr: expected float, got 'fast'"),
        ({"train": {"grad_clip": "x"}}, "train.grad_clip: expected float or null, got 'x'"),
        ({"logging": {"all_ranks": "maybe"}}, "logging.all_ranks: expected bool (true/false), got 'maybe'"),
        ({"run": {"dir": ["a"]}}, "run.dir: expected str, got ['a']"),
        ({"optim": {"betas": [0.9]}}, "optim.betas: expected a list of 2 floats, got [0.9]"),
        ({"model": {"patch_size": [1, "x", 2]}}, "model.patch_size: expected a list of 3 ints, got [1, 'x', 2]"),
        ({"train": 5}, "train: expected a mapping (TrainingConfig section), got 5"),
    ],
)
def test_wrong_types(data: dict, message: str) -> None:
    assert problems(data) == [message]


def test_choice_error_suggests_the_closest_choice() -> None:
    assert problems({"logging": {"level": "info"}}) == [
        "logging.level: expected one of 'DEBUG', 'INFO', 'WARNING', 'ERROR', got 'info'; did you mean 'INFO'?"
    ]


def test_unknown_union_tag() -> None:
    assert problems({"model": {"arch": "dti"}}) == [
        "model.arch: expected one of 'wan', 'dit', got 'dti'; did you mean 'dit'?"
    ]


def test_range_violation_of_a_config_field() -> None:
    assert problems({"train": {"max_steps": 0}}) == ["train.max_steps: must be > 0, got 0"]


def test_range_violation_of_a_domain_field() -> None:
    (line,) = problems({"diffusion": {"shift": -1.0}})
    assert re.fullmatch(r"diffusion\.shift: must be > 0(\.0)?, got -1\.0", line), line


def test_custom_validator_message_is_kept() -> None:
    (line,) = problems({"model": {"patch_size": [1, 2, 0]}})
    assert line.startswith("model.patch_size: must be three positive ints")


def test_nested_section_errors_name_the_full_key() -> None:
    assert problems({"data": {"synthetic": {"placement": 1.5, "radius": [0.3, 0.2]}}}) == [
        "data.synthetic.placement: must be <= 1.0, got 1.5",
        "data.synthetic.radius: must be [low, high] with 0 < low <= high <= 0.5, got [0.3, 0.2]",
    ]


def test_cross_field_checks_name_the_key() -> None:
    assert problems({"data": {"source": "energon"}}) == [
        "data.path: required when data.source is 'energon' (set data.path=DIR)"
    ]
    assert problems({"diffusion": {"kind": "edm"}}) == [
        "sample.sampler: 'unipc' does not sample diffusion.kind='edm' models; use one of 'edm_euler', 'edm_heun'"
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [(1.5, "must be <= 1.0, got 1.5"), (-0.1, "must be >= 0.0, got -0.1"), (float("nan"), "must be >= 0.0, got nan")],
)
def test_image_dropout_is_a_probability(value: float, message: str) -> None:
    assert problems({"diffusion": {"image_dropout": value}}) == [f"diffusion.image_dropout: {message}"]
    cfg = resolve_config("wan_tiny_i2v", None, ["diffusion.image_dropout=0.25"])
    assert cfg.diffusion.image_dropout == 0.25 and resolve_config("wan_tiny_i2v", None, []).diffusion.image_dropout == 0


def test_image_dropout_needs_an_image_to_video_model() -> None:
    assert problems({"diffusion": {"image_dropout": 0.1}}) == [
        "diffusion.image_dropout: 0.1 drops the image of image-to-video samples, but this model is text-to-video "
        "(model.image_dim is null); set diffusion.image_dropout=0, or train an image-to-video model"
    ]


def test_every_problem_is_reported_once_one_per_line() -> None:
    found = problems(
        {
            "model": {"num_layer": 3},
            "train": {"max_steps": "ten", "log_interval": 0},
            "optim": {"lr": -1.0, "betas": [0.9, 1.5]},
            "nope": 1,
        }
    )
    assert found == [
        "model.num_layer: unknown key; did you mean model.num_layers?",
        "train.max_steps: expected int, got 'ten'",
        "train.log_interval: must be > 0, got 0",  # validators of a section with a type error still run
        "optim.lr: must be > 0.0, got -1.0",
        "optim.betas: must be two floats in [0, 1), got [0.9, 1.5]",
        "nope: unknown key",
    ]


def test_several_validator_errors_of_one_section_are_all_reported() -> None:
    found = problems({"train": {"log_interval": 0, "max_consecutive_nonfinite": 0}})
    assert found == [
        "train.log_interval: must be > 0, got 0",
        "train.max_consecutive_nonfinite: must be > 0, got 0",
    ]


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="a config must be a mapping of sections"):
        config_from_dict([1, 2])  # type: ignore[arg-type]


def test_unknown_recipe_lists_known_names_with_a_suggestion() -> None:
    with pytest.raises(ValueError, match=r"unknown recipe 'wan_tiny'; did you mean 'wan_tiny_t2v'\? \(known recipes: "):
        resolve_config("wan_tiny", None, [])


def test_optimizer_floats_must_be_finite_and_in_range() -> None:
    """``optim.lr=inf`` used to pass ``> 0`` and reach the optimizer; every optim float is checked."""
    nan, inf = float("nan"), float("inf")
    data = {
        "optim": {"lr": inf, "betas": [nan, 0.5], "weight_decay": inf, "eps": 0.0, "min_lr_ratio": nan},
        "train": {"grad_clip": inf},
    }
    assert problems(data) == [
        "train.grad_clip: must be a finite number, got inf",
        "optim.lr: must be a finite number, got inf",
        "optim.betas: must be two floats in [0, 1), got [nan, 0.5]",
        "optim.weight_decay: must be a finite number, got inf",
        "optim.eps: must be > 0.0, got 0.0",
        "optim.min_lr_ratio: must be a finite number, got nan",
    ]
    assert problems({"optim": {"lr": -nan}}) == ["optim.lr: must be a finite number, got nan"]
