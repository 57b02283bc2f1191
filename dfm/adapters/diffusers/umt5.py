"""The UMT5 text encoder of WAN 2.1 (transformers ``UMT5EncoderModel``) as a :class:`~dfm.ports.codecs.TextEncoder`.

Captions are embedded as diffusers' ``WanPipeline._get_t5_prompt_embeds`` embeds prompts: cleaned
(HTML entities unescaped, whitespace collapsed), tokenized with padding to ``max_length`` and
truncation, encoded with the attention mask, and every position past a caption's real tokens set to
zero. Weights and tokenizer load from local directories in their transformers layout.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
import torch

from dfm.adapters.diffusers.wan_vae import (
    CONFIG_FILE,
    directory_identity,
    read_config,
    resolve_device,
    resolve_dtype,
    weight_files,
)

_log = structlog.get_logger(__name__)

MAX_TOKENS = 512
"""The most tokens WAN 2.1's UMT5 embeds per caption."""
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def clean_caption(text: str) -> str:
    """diffusers' ``prompt_clean`` without ``ftfy``: HTML entities unescaped twice, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def _is_encoder_dir(path: Path) -> bool:
    config = read_config(path)
    return config is not None and "d_model" in config and bool(weight_files(path))


def _is_tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in _TOKENIZER_FILES)


def resolve_text_encoder_dirs(path: str | Path, tokenizer: str | Path | None = None) -> tuple[Path, Path]:
    """The encoder and tokenizer directories for ``path`` (and an explicit ``tokenizer``).

    ``path`` is the encoder directory (``config.json`` + weights) or a model root holding ``text_encoder/``.
    Without ``tokenizer``, the first of ``ENCODER/tokenizer``, the sibling ``tokenizer/`` of a model
    root's encoder and ``ENCODER`` itself that holds tokenizer files is used.

    Raises:
        ValueError: Naming the path and the expected layout, when a directory is missing or invalid.
    """
    root = Path(path).expanduser()
    encoder = next((p for p in (root, root / "text_encoder") if _is_encoder_dir(p)), None)
    if encoder is None:
        raise ValueError(
            f"{root} is not a UMT5 text encoder directory: expected a transformers UMT5EncoderModel directory "
            f"({CONFIG_FILE} + model.safetensors), or a model root holding one in text_encoder/"
        )
    if tokenizer is not None:
        chosen = Path(tokenizer).expanduser()
        if not _is_tokenizer_dir(chosen):
            raise ValueError(
                f"{chosen} is not a tokenizer directory: expected tokenizer.json or spiece.model "
                "(+ tokenizer_config.json) as written by a transformers tokenizer's save_pretrained"
            )
        return encoder, chosen
    candidates = (encoder / "tokenizer", encoder.parent / "tokenizer", encoder)
    found = next((p for p in candidates if _is_tokenizer_dir(p)), None)
    if found is None:
        raise ValueError(
            f"no tokenizer found for {encoder}: looked in {', '.join(str(p) for p in candidates)}; "
            "pass the tokenizer directory explicitly"
        )
    return encoder, found


class UMT5TextEncoder:
    """transformers ``UMT5EncoderModel`` + ``AutoTokenizer`` from local directories.

    ``encode(captions, max_length)`` returns float32 embeddings ``[B, max_length, D]`` on the CPU,
    zero past each caption's real tokens (the end-of-sequence token counts as real), and the
    tokenizer's attention mask as a ``[B, max_length]`` bool tensor. Constructing one reads only
    ``config.json`` (``dim``) and hashes the identity; the weights load on first use.

    Example:
        >>> text = UMT5TextEncoder("models/Wan2.1-T2V-1.3B-Diffusers", device="cuda", dtype="bf16")
        >>> emb, mask = text.encode(["a cat on a boat"], 512)  # [1, 512, 4096], [1, 512]
    """

    def __init__(
        self,
        path: str | Path,
        *,
        tokenizer: str | Path | None = None,
        device: str = "cpu",
        dtype: str = "fp32",
    ) -> None:
        """Find the encoder and its tokenizer (the weights load on first ``encode``).

        Args:
            path: A ``UMT5EncoderModel`` directory or a model root holding ``text_encoder/``.
            tokenizer: The tokenizer directory; default: ``ENCODER/tokenizer``, the model root's
                ``tokenizer/`` or the encoder directory itself, whichever holds tokenizer files.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
            dtype: Weights and compute dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``.

        Raises:
            ValueError: A missing or invalid directory, an unknown device or dtype.
        """
        self.path, self.tokenizer_path = resolve_text_encoder_dirs(path, tokenizer)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        config = read_config(self.path) or {}
        self.dim = int(config["d_model"])
        self.identity = directory_identity(self.path)
        """``NAME@HASH`` of the encoder directory, recorded with prepared samples."""
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        from transformers import AutoTokenizer, UMT5EncoderModel  # heavy import, only when used

        try:
            model = UMT5EncoderModel.from_pretrained(self.path, dtype=self.dtype, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{self.path}: cannot load the UMT5 text encoder or its tokenizer ({exc})") from None
        tokenizer.padding_side = "right"  # the zeroing below keeps the first n positions, as diffusers does
        self._model, self._tokenizer = model.to(self.device).eval().requires_grad_(False), tokenizer

    @property
    def model(self) -> Any:
        """The transformers ``UMT5EncoderModel`` (loads on first use, on ``device`` in ``dtype``)."""
        if self._model is None:
            self._load()
        return self._model

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (loads with the model on first use; pads on the right)."""
        if self._tokenizer is None:
            self._load()
        return self._tokenizer

    @torch.no_grad()
    def encode(self, captions: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (embeddings ``[B, max_length, D]`` float32, mask ``[B, max_length]`` bool), on the CPU.

        Raises:
            ValueError: ``max_length`` outside ``[1, 512]`` or a caption that is not a string.
        """
        if not 1 <= max_length <= MAX_TOKENS:
            raise ValueError(f"UMT5TextEncoder: max_length must be in [1, {MAX_TOKENS}], got {max_length}")
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("UMT5TextEncoder: captions must be a sequence of strings")
        cleaned = [clean_caption(c) for c in captions]
        self._warn_truncated(cleaned, max_length)
        tokens = self.tokenizer(
            cleaned,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.model(ids, mask).last_hidden_state.float().cpu()
        lengths = mask.gt(0).sum(dim=1).tolist()
        embeddings = torch.zeros_like(hidden)
        for i, n in enumerate(lengths):  # as diffusers: keep the first n (real) tokens, zeros after
            embeddings[i, :n] = hidden[i, :n]
        return embeddings, mask.cpu().bool()

    def _warn_truncated(self, captions: list[str], max_length: int) -> None:
        """A warning per caption longer than ``max_length`` tokens: the rest is cut off, as diffusers does."""
        for i, ids in enumerate(self.tokenizer(captions, add_special_tokens=True).input_ids):
            if len(ids) > max_length:
                _log.warning(
                    "caption truncated",
                    caption=i,
                    tokens=len(ids),
                    kept=max_length,
                    start=captions[i][:60],
                    hint="the text encoder embeds at most data.text_len tokens; shorten the prompt to keep all of it",
                )

    def __repr__(self) -> str:
        return f"UMT5TextEncoder({str(self.path)!r}, device={str(self.device)!r}, id={self.identity!r})"
