"""Layering: recipe < YAML file < CLI overrides; typed CLI values; union tag switching."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from dfm.app.config import ConfigError, resolve_config
from dfm.app.recipes import get_recipe
from dfm.domain.diffusion.edm import EDM
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.specs import DiTSpec, WanSpec


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_no_recipe_means_default() -> None:
    assert resolve_config(None, None, []) == get_recipe("default")


def test_precedence_recipe_then_yaml_then_cli(tmp_path: Path) -> None:
    recipe = get_recipe("wan_tiny_t2v")
    yaml_file = write(tmp_path, "train:\n  max_steps: 7\n  log_interval: 3\noptim:\n  lr: 2.0e-3\n")
    config = resolve_config("wan_tiny_t2v", yaml_file, ["train.max_steps=9"])
    assert config.train.max_steps == 9  # CLI over YAML
    assert config.train.log_interval == 3  # YAML over recipe
    assert config.optim.lr == 2.0e-3
    assert config.train.global_batch_size == recipe.train.global_batch_size  # recipe kept
    assert config.model == recipe.model


def test_a_config_file_names_its_recipe(tmp_path: Path) -> None:
    yaml_file = write(tmp_path, "recipe: wan_tiny_t2v\ntrain:\n  max_steps: 7\n")
    config = resolve_config(None, yaml_file, [])
    assert config == attrs.evolve(
        get_recipe("wan_tiny_t2v"), train=attrs.evolve(get_recipe("wan_tiny_t2v").train, max_steps=7)
    )
    assert resolve_config("wan_tiny_t2v", yaml_file, []) == config


def test_recipe_in_file_and_on_the_command_line_must_agree(tmp_path: Path) -> None:
    yaml_file = write(tmp_path, "recipe: wan_tiny_t2v\n")
    with pytest.raises(ConfigError, match=r"^--recipe default differs from recipe: wan_tiny_t2v in .*; give one"):
        resolve_config("default", yaml_file, [])
    with pytest.raises(ConfigError, match=r"recipe: expected a recipe name, got 3"):
        resolve_config(None, write(tmp_path, "recipe: 3\n"), [])


def test_later_cli_override_wins() -> None:
    assert resolve_config(None, None, ["seed=1", "seed=2"]).seed == 2


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("false", False), ("1", True), ("0", False), ("yes", True), ("no", False), ("True", True)],
)
def test_bool_values(text: str, value: bool) -> None:
    assert resolve_config(None, None, [f"logging.all_ranks={text}"]).logging.all_ranks is value


@pytest.mark.parametrize("text", ["[0.8, 0.9]", "0.8,0.9", "[0.8,0.9]", "(0.8, 0.9)"])
def test_list_values(text: str) -> None:
    assert resolve_config(None, None, [f"optim.betas={text}"]).optim.betas == (0.8, 0.9)


def test_int_tuple_value() -> None:
    assert resolve_config(None, None, ["model.patch_size=1,1,1"]).model.patch_size == (1, 1, 1)


@pytest.mark.parametrize("text", ["null", "none", "None", "~"])
def test_none_values(text: str) -> None:
    config = resolve_config(None, None, [f"train.grad_clip={text}", f"checkpoint.keep_last={text}"])
    assert config.train.grad_clip is None
    assert config.checkpoint.keep_last is None


def test_numbers_and_strings_are_typed_by_the_field() -> None:
    config = resolve_config(
        None, None, ["optim.lr=1e-5", "sample.guidance=4", "run.name=123", "run.dir=yes", "checkpoint.resume=a=b"]
    )
    assert config.optim.lr == 1e-5 and isinstance(config.optim.lr, float)
    assert config.sample.guidance == 4.0 and isinstance(config.sample.guidance, float)
    assert config.run.name == "123"
    assert config.run.dir == "yes"  # a str field takes the text as is
    assert config.checkpoint.resume == "a=b"  # only the first '=' splits


def test_optional_str_none_and_value() -> None:
    assert resolve_config(None, None, ["run.name=null"]).run.name is None
    assert resolve_config(None, None, ["run.name=exp1"]).run.name == "exp1"


@pytest.mark.parametrize("item", ["no_equals", "=1", "a..b=1", ".a=1"])
def test_malformed_override(item: str) -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        resolve_config(None, None, [item])


def test_unknown_key_same_message_from_yaml_and_cli(tmp_path: Path) -> None:
    expected = "model.num_layer: unknown key; did you mean model.num_layers?"
    with pytest.raises(ConfigError) as cli:
        resolve_config(None, None, ["model.num_layer=3"])
    with pytest.raises(ConfigError) as yml:
        resolve_config(None, write(tmp_path, "model:\n  num_layer: 3\n"), [])
    assert str(cli.value) == str(yml.value) == expected


def test_wrong_type_from_cli() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config(None, None, ["train.max_steps=ten"])
    assert str(info.value) == "train.max_steps: expected int, got 'ten'"


def test_switching_model_arch_starts_from_the_new_defaults() -> None:
    config = resolve_config(None, None, ["model.arch=dit", "model.num_layers=3"])
    assert config.model == DiTSpec(num_layers=3)
    # order does not matter: the tag is read first
    assert resolve_config(None, None, ["model.num_layers=3", "model.arch=dit"]).model == DiTSpec(num_layers=3)


def test_same_tag_merges_into_the_recipe() -> None:
    recipe = get_recipe("wan_tiny_t2v")
    config = resolve_config("wan_tiny_t2v", None, ["model.arch=wan", "model.num_layers=5"])
    assert config.model == attrs.evolve(recipe.model, num_layers=5)
    assert isinstance(config.model, WanSpec)


def test_switching_diffusion_kind_from_yaml(tmp_path: Path) -> None:
    yaml_file = write(tmp_path, "diffusion:\n  kind: edm\n  p_std: 1.0\nsample:\n  sampler: edm_euler\n")
    config = resolve_config("wan_tiny_t2v", yaml_file, [])
    assert config.diffusion == EDM(p_std=1.0)
    config = resolve_config("dit_tiny_edm", None, ["diffusion.kind=flow", "sample.sampler=flow_euler"])
    assert config.diffusion == FlowMatching()


def test_switching_to_an_unknown_tag_is_reported() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config(None, None, ["model.arch=dti", "model.num_layers=2"])
    assert str(info.value) == "model.arch: expected one of 'wan', 'dit', got 'dti'; did you mean 'dit'?"


def test_yaml_file_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(None, tmp_path / "missing.yaml", [])
    with pytest.raises(ConfigError, match="invalid YAML"):
        resolve_config(None, write(tmp_path, "train: [unclosed\n"), [])
    with pytest.raises(ConfigError, match="expected a mapping of config sections, got list"):
        resolve_config(None, write(tmp_path, "- 1\n- 2\n"), [])
    assert resolve_config(None, write(tmp_path, ""), []) == get_recipe("default")


def test_yaml_scientific_floats(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-4 (no dot) as a string; float fields accept it
    assert resolve_config(None, write(tmp_path, "optim:\n  lr: 1e-4\n"), []).optim.lr == 1e-4
