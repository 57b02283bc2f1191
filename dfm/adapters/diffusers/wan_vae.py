"""The WAN 2.1 VAE (diffusers ``AutoencoderKLWan``) as a :class:`~dfm.ports.codecs.LatentCodec`.

Weights load from a local directory in diffusers' layout, either the ``vae/`` folder itself or a model
root holding it (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` as downloaded). Latents are normalised per
channel with the config's ``latents_mean`` / ``latents_std``, the inverse of what diffusers'
``WanPipeline`` does before decoding (``latents / (1 / std) + mean``), so dfm's training latents and
the pipeline's agree.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from dfm.domain.specs import LatentSpec

VAE_CLASS = "AutoencoderKLWan"
CONFIG_FILE = "config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SAMPLE_BYTES = 1 << 20
_STANDARD_SUBFOLDERS = ("vae", "text_encoder", "tokenizer")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a ``torch.device``.

    Raises:
        ValueError: For another device kind.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    """``"fp32"`` | ``"bf16"`` | ``"fp16"`` as a ``torch.dtype``.

    Raises:
        ValueError: For another name.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(map(repr, _DTYPES))}")
    return _DTYPES[dtype]


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a diffusers/transformers directory (safetensors, pickled ``.bin``, shard indexes)."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))


def directory_identity(directory: Path) -> str:
    """``NAME@HASH``: the directory's name and a short sha256 of its ``config.json`` and weight fingerprints.

    ``NAME`` is ``ROOT/SUB`` for a standard subfolder (``vae``, ``text_encoder``, ``tokenizer``) of a model
    root, so the same weights have the same identity however the directory was named on the command line.
    The hash covers ``config.json`` and, per weight file, its name, size, first and last MiB: cheap to
    compute for multi-GB weights, and different for differently trained weights of one architecture.
    """
    digest = hashlib.sha256((directory / CONFIG_FILE).read_bytes())
    for path in weight_files(directory):
        size = path.stat().st_size
        digest.update(f"\0{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            digest.update(f.read(_SAMPLE_BYTES))
            if size > 2 * _SAMPLE_BYTES:
                f.seek(size - _SAMPLE_BYTES)
                digest.update(f.read(_SAMPLE_BYTES))
    name = directory.name
    if name in _STANDARD_SUBFOLDERS and directory.parent.name:
        name = f"{directory.parent.name}/{name}"
    return f"{name}@{digest.hexdigest()[:12]}"


def read_config(path: Path) -> dict[str, Any] | None:
    """``path/config.json`` as a dict; ``None`` when it is missing, unreadable or not a JSON object."""
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _vae_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of a VAE directory with ``AutoencoderKLWan``'s defaults for the keys it leaves out."""
    import inspect

    from diffusers import AutoencoderKLWan

    defaults = {
        name: p.default
        for name, p in inspect.signature(AutoencoderKLWan.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    return {**defaults, **(read_config(directory) or {})}


def resolve_vae_dir(path: str | Path) -> Path:
    """The ``AutoencoderKLWan`` directory at ``path``: ``path`` itself or its ``vae/`` subfolder.

    Raises:
        ValueError: Naming ``path`` and the expected layout, when neither holds a WAN VAE.
    """
    root = Path(path).expanduser()
    for candidate in (root, root / "vae"):
        config = read_config(candidate)
        if config is not None and config.get("_class_name") == VAE_CLASS and weight_files(candidate):
            return candidate
    raise ValueError(
        f"{root} is not a WAN VAE directory: expected a diffusers {VAE_CLASS} directory (config.json + "
        "diffusion_pytorch_model.safetensors), or a model root holding one in vae/"
    )


class WanVAECodec:
    """diffusers' ``AutoencoderKLWan`` from a local directory, with dfm's latent normalisation.

    ``encode`` maps videos ``[B, 3, T, H, W]`` in ``[-1, 1]`` (``T = 4n + 1``, ``H``, ``W`` multiples
    of 8) to the posterior mode normalised per channel, ``(mu - latents_mean) / latents_std``, shaped
    ``[B, C, 1 + (T - 1) / 4, H / 8, W / 8]``; ``decode`` un-normalises and decodes, clamped to
    ``[-1, 1]``. Both return float32 tensors on the input's device and need no gradients.
    Constructing one reads only ``config.json`` (and hashes the identity); the weights load on first use,
    so building the codecs to learn the latent shape is cheap.

    Example:
        >>> codec = WanVAECodec("models/Wan2.1-T2V-1.3B-Diffusers", device="cuda", dtype="bf16")
        >>> latents = codec.encode(video)  # [1, 16, 21, 60, 104] for 81 x 480 x 832
    """

    def __init__(self, path: str | Path, *, device: str = "cpu", dtype: str = "fp32", tiling: bool = False) -> None:
        """Read the VAE's config (its weights load on first ``encode``/``decode``).

        Args:
            path: An ``AutoencoderKLWan`` directory (``config.json`` + safetensors) or a model root
                holding one in ``vae/``.
            device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
            dtype: Weights and compute dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
            tiling: Encode/decode large frames in overlapping spatial tiles (less memory).

        Raises:
            ValueError: A missing or invalid directory, an unknown device or dtype.
        """
        self.path = resolve_vae_dir(path)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.tiling = tiling
        config = _vae_config(self.path)
        channels = int(config["z_dim"])
        self.latents_mean: tuple[float, ...] = tuple(float(x) for x in config["latents_mean"])
        """Per-channel mean subtracted from the posterior mode."""
        self.latents_std: tuple[float, ...] = tuple(float(x) for x in config["latents_std"])
        """Per-channel standard deviation the centred mode is divided by."""
        if len(self.latents_mean) != channels or len(self.latents_std) != channels:
            raise ValueError(f"{self.path}: latents_mean/latents_std in config.json must have z_dim={channels} values")
        self.latent_spec = LatentSpec(
            channels=channels,
            temporal_stride=int(config.get("scale_factor_temporal") or 4),
            spatial_stride=int(config.get("scale_factor_spatial") or 8),
        )
        self.identity = directory_identity(self.path)
        """``NAME@HASH`` of the VAE directory, recorded with prepared samples."""
        self._vae: Any = None

    @property
    def vae(self) -> Any:
        """The diffusers ``AutoencoderKLWan`` (weights load on first use, on ``device`` in ``dtype``).

        Raises:
            ValueError: The weights cannot be loaded.
        """
        if self._vae is None:
            from diffusers import AutoencoderKLWan  # heavy import, only when a VAE is used

            try:
                vae = AutoencoderKLWan.from_pretrained(self.path, torch_dtype=self.dtype, local_files_only=True)
            except (OSError, ValueError, RuntimeError) as exc:
                raise ValueError(f"{self.path}: cannot load the WAN VAE ({exc})") from None
            self._vae = vae.to(self.device).eval().requires_grad_(False)
            if self.tiling:
                self._vae.enable_tiling()
        return self._vae

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.latent_spec.channels, 1, 1, 1)
        mean = torch.tensor(self.latents_mean, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(self.latents_std, dtype=torch.float32, device=device).view(shape)
        return mean, std

    def _check(self, x: object, name: str, channels: int) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[1] != channels or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"WanVAECodec: {name} must be a float tensor [B, {channels}, T, H, W], got {shape}")
        return x

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Videos ``[B, 3, T, H, W]`` in ``[-1, 1]`` -> normalised latents ``[B, C, F, H', W']`` (float32).

        Raises:
            ValueError: A tensor of another shape, ``T`` not ``4n + 1`` or ``H``/``W`` not multiples of 8.
        """
        self._check(pixels, "pixels", 3)
        spec = self.latent_spec
        frames, height, width = pixels.shape[2:]
        if (frames - 1) % spec.temporal_stride:
            raise ValueError(
                f"WanVAECodec: videos must have {spec.temporal_stride}n+1 frames (1, {1 + spec.temporal_stride}, "
                f"{1 + 2 * spec.temporal_stride}, ...), got {frames}"
            )
        if height % spec.spatial_stride or width % spec.spatial_stride:
            raise ValueError(
                f"WanVAECodec: height and width must be multiples of {spec.spatial_stride}, got {height}x{width}"
            )
        mode = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mode().float()
        mean, std = self._stats(mode.device)
        return ((mode - mean) / std).to(pixels.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B, C, F, H', W']`` -> float32 videos ``[B, 3, 1 + 4(F-1), 8H', 8W']`` in [-1, 1]."""
        self._check(latents, "latents", self.latent_spec.channels)
        z = latents.to(self.device, torch.float32)
        mean, std = self._stats(z.device)
        pixels = self.vae.decode((z * std + mean).to(self.dtype)).sample
        return pixels.float().to(latents.device)

    def __repr__(self) -> str:
        return f"WanVAECodec({str(self.path)!r}, device={str(self.device)!r}, dtype={self.dtype}, id={self.identity!r})"


def save_random_wan_vae(directory: Path, *, seed: int = 0) -> Path:
    """Write a WAN 2.1 VAE (diffusers ``AutoencoderKLWan``'s default configuration) with random weights drawn
    from ``seed`` to ``directory`` (``save_pretrained``) and return it: a decoder to time, not to look at.

    The global RNG is left as it was.
    """
    from diffusers import AutoencoderKLWan  # heavy import, only when a VAE is made

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan()
    vae.save_pretrained(directory)
    return Path(directory)
