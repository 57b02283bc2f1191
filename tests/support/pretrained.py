"""Tiny, seeded pretrained models written offline in their standard diffusers/transformers layout.

Tests use these as stand-ins for the real WAN 2.1 VAE and UMT5 text encoder: each builder writes a
directory that ``from_pretrained`` loads without network access. The names are stable API for other
tests: :func:`write_tiny_wan_vae`, :func:`write_tiny_umt5`, :func:`write_tiny_wan_model_root`,
:func:`write_tiny_clip_image_encoder`, and :func:`export_tiny_wan_i2v` (a random image-to-video network exported
with a config naming such codecs).
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_VAE_Z_DIM = 4
"""Latent channels of the tiny VAE (matches ``WAN_TINY.in_channels``)."""
TINY_VAE_LATENTS_MEAN = [0.25, -0.5, 0.125, 1.0]
"""Per-channel latent mean recorded in the tiny VAE's config (non-trivial on purpose)."""
TINY_VAE_LATENTS_STD = [1.5, 0.75, 2.0, 1.25]
"""Per-channel latent std recorded in the tiny VAE's config (non-trivial on purpose)."""
TINY_UMT5_DIM = 32
"""Hidden size of the tiny UMT5 encoder (matches ``WAN_TINY.text_dim``)."""

_WORDS = tuple(
    " ".join(
        (
            "a an the of and in on with to is are at by for from into over under cat dog bird fish car",
            "boat tree house sky sea river mountain city street man woman child red green blue white black",
            "small big fast slow running walking flying swimming sunset night day video scene camera",
        )
    ).split(" ")
)
_SPECIALS = ("<pad>", "</s>", "<unk>")


def _seeded_init(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Overwrite every parameter with seeded normal values so different seeds give different weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(module.named_parameters()):
            values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * scale
            param.copy_(values.to(param.dtype))


def write_tiny_wan_vae(directory: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny seeded ``AutoencoderKLWan`` (z_dim 4, stride 4x8x8) with ``save_pretrained``.

    Args:
        directory: Where to write ``config.json`` and the safetensors weights (created if missing).
        seed: Seed of the weights; different seeds give different weights (and identities).

    Returns:
        The directory, as a ``Path``.
    """
    from diffusers import AutoencoderKLWan

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=TINY_VAE_Z_DIM,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=list(TINY_VAE_LATENTS_MEAN),
        latents_std=list(TINY_VAE_LATENTS_STD),
    )
    _seeded_init(vae, seed, scale=0.1)
    vae.save_pretrained(path, safe_serialization=True)
    return path


def _build_tokenizer(directory: Path) -> None:
    """Save a word-level fast tokenizer (T5 conventions: pad 0, eos 1, unk 2, eos appended)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*_SPECIALS, *_WORDS))}
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
        padding_side="right",
    )
    fast.save_pretrained(directory)


def write_tiny_umt5(directory: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny seeded ``UMT5EncoderModel`` into ``directory`` and its tokenizer into ``directory/tokenizer``.

    Args:
        directory: Where to write the encoder's ``config.json`` and weights (created if missing).
        seed: Seed of the weights; different seeds give different weights (and identities).

    Returns:
        The encoder directory, as a ``Path`` (the tokenizer lives in its ``tokenizer/`` subfolder).
    """
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    config = UMT5Config(
        vocab_size=len(_SPECIALS) + len(_WORDS),
        d_model=TINY_UMT5_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(seed)
    model = UMT5EncoderModel(config).eval()
    _seeded_init(model, seed, scale=0.2)
    model.save_pretrained(path, safe_serialization=True)
    _build_tokenizer(path / "tokenizer")
    return path


def write_tiny_wan_model_root(directory: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny WAN model root like a diffusers WAN repo: ``vae/``, ``text_encoder/``, ``tokenizer/``.

    Args:
        directory: The model root (created if missing).
        seed: Seed of the VAE and text-encoder weights.

    Returns:
        The model root, as a ``Path``.
    """
    import shutil

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    write_tiny_wan_vae(root / "vae", seed=seed)
    encoder = write_tiny_umt5(root / "text_encoder", seed=seed + 1)
    target = root / "tokenizer"
    if target.exists():
        shutil.rmtree(target)
    shutil.move(str(encoder / "tokenizer"), str(target))
    return root


TINY_CLIP_DIM = 16
"""Hidden size of the tiny CLIP vision encoder (an image-to-video network's ``image_dim``)."""


def write_tiny_clip_image_encoder(directory: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny seeded CLIP vision model root like WAN 2.1 I2V's: ``image_encoder/`` and ``image_processor/``.

    The tower is ViT-?/14 at 224 px (257 tokens, as ViT-H/14), width :data:`TINY_CLIP_DIM`, 2 layers; the
    processor is ``CLIPImageProcessor``'s defaults (resize to 224, centre crop, CLIP normalisation).
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    root = Path(directory)
    config = CLIPVisionConfig(
        hidden_size=TINY_CLIP_DIM,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=224,
        patch_size=14,
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModel(config)
    _seeded_init(model, seed, scale=0.1)
    model.save_pretrained(root / "image_encoder", safe_serialization=True)
    CLIPImageProcessor().save_pretrained(root / "image_processor")
    return root


def export_tiny_wan_i2v(root: str | Path, out: str | Path, *overrides: str) -> Path:
    """Export a tiny random WAN image-to-video network to ``out`` (diffusers layout + the exported config).

    Its config (recipe ``wan_tiny_t2v`` made image-to-video: 4 noisy + 4 mask + 4 condition channels, image
    features of :data:`TINY_CLIP_DIM`) names ``root``'s codecs: a model root holding a tiny VAE and UMT5
    (:func:`write_tiny_wan_model_root`) and CLIP (:func:`write_tiny_clip_image_encoder`). It samples 9 x 32 x 48
    videos (latent 3 x 4 x 6: 18 tokens). ``overrides``: more ``key=value`` settings (e.g.
    ``model.pos_embed_seq_len=514`` for first-last-frame).
    """
    from dfm.adapters.diffusers import save_wan_diffusers
    from dfm.app.config import config_to_yaml, resolve_config
    from dfm.app.services.checkpoints import EXPORTED_CONFIG
    from dfm.domain.networks.wan import WanTransformer

    out = Path(out)
    settings = [
        "model.in_channels=12",
        "model.out_channels=4",
        f"model.image_dim={TINY_CLIP_DIM}",
        "model.added_kv_proj_dim=24",
        f"codecs.vae={root}",
        f"codecs.text_encoder={root}",
        f"codecs.image_encoder={root}",
        "sample.frames=9",
        "sample.height=32",
        "sample.width=48",
        "data.text_len=16",
        *overrides,
    ]
    cfg = resolve_config("wan_tiny_t2v", None, settings)
    network = WanTransformer(cfg.model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        network.proj_out.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    save_wan_diffusers(network.state_dict(), cfg.model, out)
    (out / EXPORTED_CONFIG).write_text(config_to_yaml(cfg))
    return out
