"""The ``codecs`` section: the pretrained VAE and text encoder (local directories) that map pixels and captions.

Unset, the embedded toy codecs are used (``data.source: synthetic``: pixels as latents and hashed word
vectors). Set, ``codecs.vae`` decodes generated latents with the WAN 2.1 VAE and ``codecs.text_encoder``
embeds prompts with UMT5, as the data were prepared (``python -m dfm.app.prepare``). The paths are saved
with the resolved config in every checkpoint, so ``python -m dfm.app.generate`` finds them again.
"""

from __future__ import annotations

import attrs

from dfm.app.config.checks import non_empty, optional
from dfm.app.config.errors import FieldError


@attrs.frozen(kw_only=True)
class CodecsConfig:
    """Local directories of the pretrained codecs in their diffusers/transformers layout (no downloads)."""

    vae: str | None = attrs.field(default=None, validator=optional(non_empty))
    """WAN 2.1 VAE: a diffusers ``AutoencoderKLWan`` directory (``config.json`` + safetensors) or a model
    root holding ``vae/``; ``null``: the toy pixel codec of ``synthetic`` data (no decoding for ``mock``)."""
    text_encoder: str | None = attrs.field(default=None, validator=optional(non_empty))
    """UMT5 text encoder: a transformers ``UMT5EncoderModel`` directory or a model root holding
    ``text_encoder/``; ``null``: the toy hashed-word encoder (its width is ``model.text_dim``)."""
    image_encoder: str | None = attrs.field(default=None, validator=optional(non_empty))
    """Image-to-video models: the CLIP vision encoder (transformers ``CLIPVisionModel``) of the conditioning
    image, a directory or a model root holding ``image_encoder/`` (and ``image_processor/``), e.g.
    ``Wan2.1-I2V-14B-480P-Diffusers``; ``null`` for text-to-video."""
    tokenizer: str | None = attrs.field(default=None, validator=optional(non_empty))
    """Tokenizer directory of ``text_encoder``; ``null``: its ``tokenizer/`` subfolder, the model root's
    ``tokenizer/`` or the encoder directory itself, whichever holds tokenizer files."""

    def __attrs_post_init__(self) -> None:
        if self.tokenizer is not None and self.text_encoder is None:
            raise FieldError("tokenizer", "is set but codecs.text_encoder is not (a tokenizer needs its encoder)")
