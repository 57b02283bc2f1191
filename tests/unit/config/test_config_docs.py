"""Rule 6: every config class is a frozen keyword-only attrs class whose every attribute has a docstring."""

from __future__ import annotations

import attrs
import pytest

from dfm.app.config import TrainConfig, attribute_docs, config_classes
from dfm.domain.diffusion.edm import EDM
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.specs import DiTSpec, WanSpec

CLASSES = sorted(config_classes(TrainConfig), key=lambda c: c.__qualname__)


def test_tree_includes_every_union_variant() -> None:
    assert {WanSpec, DiTSpec, FlowMatching, EDM, TrainConfig} <= set(CLASSES)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__qualname__)
def test_every_attribute_has_a_docstring(cls: type) -> None:
    docs = attribute_docs(cls)
    missing = [a.name for a in attrs.fields(cls) if not docs.get(a.name, "").strip()]
    assert not missing, f"{cls.__qualname__}: attributes without a docstring: {missing}"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__qualname__)
def test_frozen_and_keyword_only(cls: type) -> None:
    assert all(a.kw_only for a in attrs.fields(cls)), cls
    instance = cls()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        instance.__setattr__(attrs.fields(cls)[0].name, None)


def test_attribute_docs_reads_the_string_after_the_field() -> None:
    assert attribute_docs(TrainConfig)["seed"].startswith("Seed of every random stream")
