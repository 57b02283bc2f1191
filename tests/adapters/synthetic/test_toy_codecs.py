"""Toy codecs: the identity pixel codec and the deterministic hashed text encoder."""

from __future__ import annotations

import pytest
import torch

from dfm.adapters.synthetic.codecs import HashTextEncoder, IdentityPixelCodec, tokenize
from dfm.adapters.synthetic.videos import VOCABULARY
from dfm.domain.specs import LatentSpec
from dfm.ports.codecs import LatentCodec, TextEncoder

# --- IdentityPixelCodec ---------------------------------------------------------------------------


def test_identity_codec_round_trip() -> None:
    codec = IdentityPixelCodec()
    assert isinstance(codec, LatentCodec)
    assert codec.latent_spec == LatentSpec(channels=3, temporal_stride=1, spatial_stride=1)
    assert codec.latent_spec.latent_shape(9, 32, 32) == (3, 9, 32, 32)
    pixels = torch.rand(2, 3, 9, 32, 32) * 2 - 1
    latents = codec.encode(pixels)
    assert torch.equal(latents, pixels)
    assert torch.equal(codec.decode(latents), pixels)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (torch.zeros(3, 9, 32, 32), r"\[B, 3, T, H, W\].*\(3, 9, 32, 32\)"),
        (torch.zeros(2, 4, 9, 32, 32), r"\(2, 4, 9, 32, 32\)"),
        (torch.zeros(2, 3, 9, 32, 32, dtype=torch.uint8), "floating"),
        ([[0.0]], "torch.Tensor"),
    ],
)
def test_identity_codec_rejects_bad_input(value: object, match: str) -> None:
    codec = IdentityPixelCodec()
    with pytest.raises(ValueError, match=match):
        codec.encode(value)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match.replace("pixels", "latents")):
        codec.decode(value)  # type: ignore[arg-type]


# --- HashTextEncoder ------------------------------------------------------------------------------


def test_shapes_mask_and_padding() -> None:
    enc = HashTextEncoder(dim=64)
    assert isinstance(enc, TextEncoder)
    emb, mask = enc.encode(["a red circle moving left slowly", "a cross"], max_length=8)
    assert emb.shape == (2, 8, 64) and emb.dtype == torch.float32
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[True] * 6 + [False] * 2, [True] * 2 + [False] * 6]
    assert not emb[~mask].any()  # padding is zeros
    assert (emb[mask].norm(dim=-1) > 0.5).all()


def test_deterministic_across_instances() -> None:
    captions = ["a red circle moving left slowly", "an orange ring moving up quickly on a navy background"]
    a = HashTextEncoder(dim=32).encode(captions, 12)
    b = HashTextEncoder(dim=32).encode(captions, 12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


GOLDEN_RED_DIM8 = [0.291136, -0.458286, 0.248174, -0.31976, 0.001747, -0.051856, 0.328096, -0.656535]
"""The word vector of "red" at ``dim=8`` (SHAKE-256 of ``dfm-hash-text/red``): the same on every machine."""


def test_golden_values() -> None:
    """Pins the algorithm: hashed word vector plus 0.5 x the unit sinusoidal position (position 0: [0, 1] * 4 / 2)."""
    word, _ = HashTextEncoder(dim=8, position_scale=0.0).encode(["red"], 1)
    # 6 decimals (+-5e-7, 4.5e-7 here) plus float32 rounding, which the CPU's kernels may do differently
    torch.testing.assert_close(word[0, 0], torch.tensor(GOLDEN_RED_DIM8), rtol=0, atol=2e-6)
    emb, _ = HashTextEncoder(dim=8).encode(["red"], 1)
    position0 = torch.tensor([0.0, 0.25] * 4)
    torch.testing.assert_close(emb[0, 0] - word[0, 0], position0, rtol=0, atol=1e-6)


def test_different_captions_embed_differently() -> None:
    enc = HashTextEncoder(dim=64)
    emb, _ = enc.encode(["a red circle moving left", "a blue circle moving left", "a red circle moving right"], 6)
    assert not torch.equal(emb[0], emb[1]) and not torch.equal(emb[0], emb[2])


def test_word_order_matters() -> None:
    enc = HashTextEncoder(dim=64)
    emb, mask = enc.encode(["circle moving left", "left moving circle"], 3)
    assert mask.all()
    assert not torch.allclose(emb[0], emb[1].flip(0))  # same words at other positions
    assert not torch.allclose(emb[0].sum(0), emb[1].sum(0), atol=1e-3)  # not a bag of words, even pooled
    same, _ = enc.encode(["left left"], 2)
    assert not torch.allclose(same[0, 0], same[0, 1])


@pytest.mark.parametrize("dim", [7, 64])
def test_rotation_keeps_word_vectors_unit(dim: int) -> None:
    emb, _ = HashTextEncoder(dim=dim, position_scale=0.0).encode(["red " * 20], 20)
    torch.testing.assert_close(emb[0].norm(dim=-1), torch.ones(20))
    assert not torch.allclose(emb[0, 0], emb[0, 5])


def test_tokenisation_ignores_case_and_punctuation() -> None:
    assert tokenize("A Red, circle!  moving\tleft.") == ["a", "red", "circle", "moving", "left"]
    enc = HashTextEncoder(dim=16)
    a, _ = enc.encode(["A Red, circle!"], 5)
    b, _ = enc.encode(["a red circle"], 5)
    assert torch.equal(a, b)


def test_truncation_keeps_the_first_tokens() -> None:
    enc = HashTextEncoder(dim=16)
    caption = "an orange ring moving up quickly on a navy background"
    full, _ = enc.encode([caption], 16)
    cut, mask = enc.encode([caption], 4)
    assert cut.shape == (1, 4, 16) and mask.all()
    assert torch.equal(cut, full[:, :4])


def test_empty_caption_is_all_padding() -> None:
    emb, mask = HashTextEncoder(dim=16).encode(["", " ,. "], 3)
    assert not mask.any() and not emb.any()


def test_vocabulary_words_are_far_apart() -> None:
    emb, _ = HashTextEncoder(dim=64, position_scale=0.0).encode(list(VOCABULARY), 1)
    vectors = emb[:, 0]
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(len(VOCABULARY)))
    cos = vectors @ vectors.T - torch.eye(len(VOCABULARY))
    assert cos.abs().max() < 0.6


@pytest.mark.parametrize("dim", [2, 7, 64, 4096])
def test_any_dim(dim: int) -> None:
    emb, mask = HashTextEncoder(dim=dim).encode(["a red circle"], 4)
    assert emb.shape == (1, 4, dim) and mask.sum() == 3


def test_bad_arguments() -> None:
    enc = HashTextEncoder(dim=8)
    with pytest.raises(ValueError, match="max_length"):
        enc.encode(["a"], 0)
    with pytest.raises(ValueError, match="sequence of captions"):
        enc.encode("a red circle", 4)
    with pytest.raises(ValueError, match=r"captions\[1\]"):
        enc.encode(["a", 3], 4)  # type: ignore[list-item]
    with pytest.raises(ValueError):
        HashTextEncoder(dim=1)
