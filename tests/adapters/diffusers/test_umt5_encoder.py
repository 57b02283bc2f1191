"""UMT5TextEncoder against transformers' UMT5EncoderModel and tokenizer on the same tiny weights."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs
from support.pretrained import TINY_UMT5_DIM, write_tiny_umt5, write_tiny_wan_model_root
from transformers import AutoTokenizer, UMT5EncoderModel

from dfm.adapters.diffusers import UMT5TextEncoder
from dfm.ports.codecs import TextEncoder

CAPTIONS = ["a red cat running on the boat", "the dog", ""]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_wan_model_root(tmp_path_factory.mktemp("wan") / "Wan-Tiny")


@pytest.fixture(scope="module")
def encoder(root: Path) -> UMT5TextEncoder:
    return UMT5TextEncoder(root)


def test_it_is_a_text_encoder_with_the_models_width(encoder: UMT5TextEncoder, root: Path) -> None:
    assert isinstance(encoder, TextEncoder)
    assert encoder.dim == TINY_UMT5_DIM
    assert encoder.path == root / "text_encoder" and encoder.tokenizer_path == root / "tokenizer"


def test_embeddings_are_the_models_hidden_states_on_real_tokens_and_zero_on_padding(
    encoder: UMT5TextEncoder, root: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    model = UMT5EncoderModel.from_pretrained(root / "text_encoder").eval()
    tokens = tokenizer(CAPTIONS, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(tokens.input_ids, tokens.attention_mask).last_hidden_state

    emb, mask = encoder.encode(CAPTIONS, 12)
    assert emb.shape == (3, 12, TINY_UMT5_DIM) and emb.dtype == torch.float32
    assert mask.dtype == torch.bool and torch.equal(mask, tokens.attention_mask.bool())
    assert mask.sum(dim=1).tolist() == [8, 3, 1]  # words + </s>
    torch.testing.assert_close(emb[mask], hidden[mask], rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(emb[~mask]) == 0
    assert torch.count_nonzero(emb[mask].abs().sum(-1)) == int(mask.sum())


def test_captions_are_truncated_at_max_length(encoder: UMT5TextEncoder) -> None:
    with capture_logs() as logs:
        emb, mask = encoder.encode(CAPTIONS[:1], 4)
        encoder.encode(CAPTIONS[:1], 64)
    assert emb.shape == (1, 4, TINY_UMT5_DIM) and mask.all()
    truncated = [entry for entry in logs if entry["event"] == "caption truncated"]
    assert len(truncated) == 1 and truncated[0]["kept"] == 4 and truncated[0]["tokens"] > 4  # warned once, at 4
    full, _ = encoder.encode(CAPTIONS[:1], 12)
    assert not torch.allclose(emb[0], full[0, :4])  # truncation ends in </s> and changes attention context


def test_captions_are_cleaned_as_diffusers_cleans_prompts(encoder: UMT5TextEncoder) -> None:
    a, _ = encoder.encode(["  a  red\n cat &amp;amp; "], 8)
    b, _ = encoder.encode(["a red cat &"], 8)
    torch.testing.assert_close(a, b)


def test_max_length_is_checked(encoder: UMT5TextEncoder) -> None:
    with pytest.raises(ValueError, match=r"max_length must be in \[1, 512\], got 513"):
        encoder.encode(["x"], 513)


def test_identity_is_stable_across_loads_and_differs_for_other_weights(
    encoder: UMT5TextEncoder, root: Path, tmp_path: Path
) -> None:
    assert UMT5TextEncoder(root / "text_encoder").identity == encoder.identity
    assert encoder.identity.startswith("Wan-Tiny/text_encoder@")
    a = write_tiny_umt5(tmp_path / "a" / "umt5", seed=0)
    b = write_tiny_umt5(tmp_path / "b" / "umt5", seed=5)
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())
    ida, idb = UMT5TextEncoder(a).identity, UMT5TextEncoder(b).identity
    assert ida.startswith("umt5@") and ida != idb


def test_the_tokenizer_may_be_given_explicitly_or_live_in_the_encoder_directory(root: Path, tmp_path: Path) -> None:
    enc = tmp_path / "enc"
    shutil.copytree(root / "text_encoder", enc)
    assert UMT5TextEncoder(enc, tokenizer=root / "tokenizer").tokenizer_path == root / "tokenizer"
    for item in (root / "tokenizer").iterdir():
        shutil.copy(item, enc / item.name)
    assert UMT5TextEncoder(enc).tokenizer_path == enc


def test_missing_directories_are_value_errors_naming_them(root: Path, tmp_path: Path) -> None:
    where = tmp_path / "nope"
    with pytest.raises(ValueError) as info:
        UMT5TextEncoder(where)
    assert str(info.value) == (
        f"{where} is not a UMT5 text encoder directory: expected a transformers UMT5EncoderModel directory "
        "(config.json + model.safetensors), or a model root holding one in text_encoder/"
    )
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'tok'} is not a tokenizer directory")):
        UMT5TextEncoder(root, tokenizer=tmp_path / "tok")
    lone = tmp_path / "lone"
    shutil.copytree(root / "text_encoder", lone / "text_encoder")
    with pytest.raises(ValueError, match="no tokenizer found for"):
        UMT5TextEncoder(lone)
