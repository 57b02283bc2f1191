"""Round trips: config -> dict/YAML -> config, and YAML text -> config -> identical YAML text."""

from __future__ import annotations

import attrs
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dfm.app.config import TrainConfig, config_from_dict, config_from_yaml, config_to_dict, config_to_yaml
from dfm.app.recipes import get_recipe, recipe_names


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_round_trips(name: str) -> None:
    config = get_recipe(name)
    text = config_to_yaml(config)
    assert config_from_yaml(text) == config
    assert config_to_yaml(config_from_yaml(text)) == text
    assert config_from_dict(config_to_dict(config)) == config


def _yaml_safe(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _yaml_safe(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_yaml_safe(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def test_unstructured_dict_is_yaml_safe() -> None:
    data = config_to_dict(TrainConfig())
    assert _yaml_safe(data)
    assert data["model"]["patch_size"] == [1, 2, 2]
    assert data["optim"]["betas"] == [0.9, 0.999]
    assert yaml.safe_load(yaml.safe_dump(data)) == data


def test_defaults_build_from_an_empty_mapping() -> None:
    assert config_from_dict({}) == TrainConfig()


@settings(max_examples=60, deadline=None)
@given(
    lr=st.floats(min_value=1e-12, max_value=10.0, allow_nan=False),
    max_steps=st.integers(min_value=1, max_value=10**9),
    name=st.one_of(st.none(), st.text(min_size=1).filter(lambda s: s.strip())),
    shift=st.floats(min_value=1e-6, max_value=1e6, allow_nan=False),
    betas=st.tuples(*[st.floats(min_value=0.0, max_value=0.999999, allow_nan=False)] * 2),
)
def test_yaml_text_round_trips_exactly(lr: float, max_steps: int, name: str | None, shift: float, betas: tuple) -> None:
    base = TrainConfig()
    config = attrs.evolve(
        base,
        run=attrs.evolve(base.run, name=name),
        optim=attrs.evolve(base.optim, lr=lr, betas=betas),
        train=attrs.evolve(base.train, max_steps=max_steps),
        diffusion=attrs.evolve(base.diffusion, shift=shift),
    )
    text = config_to_yaml(config)
    assert config_from_yaml(text) == config
    assert config_to_yaml(config_from_yaml(text)) == text
