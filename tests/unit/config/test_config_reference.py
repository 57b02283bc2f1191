"""docs/configuration.md moves with the config classes."""

from __future__ import annotations

from pathlib import Path

from dfm.app.config.reference import BEGIN, END, render_reference

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def test_committed_reference_is_current() -> None:
    text = DOC.read_text()
    committed = text[text.index(BEGIN) : text.index(END) + len(END)] + "\n"
    assert committed == render_reference(), "regenerate: python -m dfm.app.config.reference (docs/configuration.md)"


def test_reference_names_every_section_and_a_nested_key() -> None:
    ref = render_reference()
    for key in (
        "`model.num_layers`",
        "`diffusion.shift`",
        "`diffusion.p_mean`",
        "`train.max_steps`",
        "`parallel.tensor`",
    ):
        assert key in ref
