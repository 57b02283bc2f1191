"""The prepare service: videos and images + captions -> encoded samples in Energon webdataset shards.

```python
from dfm.app.services.prepare import PrepareRequest, prepare
report = prepare(PrepareRequest(input=Path("videos"), out=Path("data"), clip=ClipOptions(buckets=((480, 832),))),
                 vae=vae, text_encoder=text_encoder)
```

Each input becomes one sample in the format of :mod:`dfm.ports.samples`. The codecs are injected
(ports), so the service runs with the real WAN VAE / UMT5 as well as with the toy codecs. With
``image_condition`` (image-to-video data) a sample also holds the VAE latents of its condition video (the
clip's first frame then zeros, and with ``first_last`` its last frame, as ``WanImageToVideoPipeline`` builds
it) and the image encoder's features of those frames (CLIP ViT-H's penultimate hidden states). Under
``torchrun`` rank ``r`` takes inputs ``r, r + world, ...`` and writes its own shards; rank 0 then indexes
every shard for Energon. A rerun skips the inputs of finished shards. A file that cannot be prepared is
logged, counted and listed in ``prepare_report.json``; with ``strict`` it stops the run instead.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import attrs
import torch
from attrs import validators as v
from tqdm import tqdm

from dfm.app.bootstrap import (
    ClipError,
    ClipOptions,
    encode_sample,
    energon_writer,
    is_media_file,
    load_clip,
    to_uint8_frames,
)
from dfm.app.logging import get_logger
from dfm.app.services.paths import check_output_dir
from dfm.domain.diffusion.image_condition import condition_pixels
from dfm.ports.codecs import ImageEncoder, LatentCodec, TextEncoder
from dfm.ports.samples import CONDITION_IMAGES, FORMAT_VERSION, ConditionKind, SampleMeta

log = get_logger("dfm.prepare")

CaptionMode = Literal["sidecar", "jsonl", "csv"]
REPORT = "prepare_report.json"
"""The report rank 0 writes into the output directory."""
REPORT_DIR = "reports"
"""Per-rank partial reports (``reports/r000.json``), merged into :data:`REPORT`."""
CAPTION_FILES: dict[str, str] = {"jsonl": "captions.jsonl", "csv": "captions.csv"}
"""Default caption file (in the input directory) of each caption mode."""
SUBFLAVORS: dict[str, int] = {"dfm_format": FORMAT_VERSION}
"""Subflavors recorded in ``dataset.yaml``; every loaded sample carries them."""
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class PrepareError(ValueError):
    """A problem the user can fix: no inputs, a missing caption file, or (``strict``) one bad input."""


class SkipInputError(Exception):
    """One input cannot be prepared; ``kind`` groups the counts, ``reason`` says why."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@attrs.frozen(kw_only=True)
class PrepareRequest:
    """What to prepare and where."""

    input: Path = attrs.field(converter=Path)
    """A directory (searched recursively for videos and images) or a text file listing one path per line
    (relative paths are relative to the list's directory; blank lines and ``#`` comments are ignored)."""
    out: Path = attrs.field(converter=Path)
    """Output directory: shards, ``manifests/``, ``.nv-meta/``, :data:`REPORT`."""
    clip: ClipOptions
    """Decoding, frame rate, frame count, buckets, crop or pad."""
    captions: CaptionMode = attrs.field(default="sidecar", validator=v.in_(("sidecar", "jsonl", "csv")))
    """``sidecar``: ``NAME.txt`` beside each file; ``jsonl``/``csv``: one file mapping paths to captions."""
    captions_file: Path | None = attrs.field(default=None, converter=attrs.converters.optional(Path))
    """The ``jsonl``/``csv`` file (default: ``captions.jsonl``/``captions.csv`` in the input directory)."""
    samples_per_shard: int = attrs.field(default=100, validator=v.ge(1))
    """Samples per shard (the last shard of a rank may hold fewer)."""
    dtype: str = attrs.field(default="bfloat16", validator=v.in_(tuple(_DTYPES)))
    """Dtype the latents and text embeddings are stored in."""
    device: str = "cpu"
    """Device the pixels and captions are moved to before encoding (the codecs' device)."""
    text_max_length: int = attrs.field(default=512, validator=v.ge(1))
    """Most caption tokens embedded (UMT5 in WAN 2.1: 512)."""
    strict: bool = False
    """Stop at the first input that cannot be prepared instead of skipping it."""
    progress: bool = True
    """Show a tqdm bar (rank 0)."""
    image_condition: ConditionKind | None = attrs.field(
        default=None, validator=v.optional(v.in_(tuple(CONDITION_IMAGES)))
    )
    """Image-to-video data: ``first`` stores the condition latents and image features of each clip's first frame,
    ``first_last`` of its first and last frames (first-last-frame models); ``None``: text-to-video samples."""


@attrs.frozen(kw_only=True)
class Ranks:
    """This process among the processes preparing together (world of one without torchrun)."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None
    """Waits for every rank (``torch.distributed.barrier`` under torchrun)."""


def list_inputs(source: Path) -> list[Path]:
    """The media files of a directory (recursive, sorted) or of a list file, as absolute paths.

    Raises:
        PrepareError: When ``source`` does not exist.
    """
    if source.is_dir():
        return sorted(p.resolve() for p in source.rglob("*") if p.is_file() and is_media_file(p))
    if source.is_file():
        lines = [line.strip() for line in source.read_text().splitlines()]
        return [(source.parent / line).resolve() for line in lines if line and not line.startswith("#")]
    raise PrepareError(f"--input {source} is neither a directory nor a list file")


def _base_dir(source: Path) -> Path:
    return (source if source.is_dir() else source.parent).resolve()


class Captions:
    """Looks up the caption of an input file (see :attr:`PrepareRequest.captions`)."""

    def __init__(self, mode: CaptionMode, base: Path, table: Mapping[str, str] | None = None, where: str = "") -> None:
        self.mode, self.base, self.table, self.where = mode, base, table, where

    @classmethod
    def load(cls, request: PrepareRequest) -> Captions:
        """Read the caption file of a ``jsonl``/``csv`` request (nothing to read for ``sidecar``).

        Raises:
            PrepareError: A missing or malformed caption file (naming the file and line).
        """
        base = _base_dir(request.input)
        if request.captions == "sidecar":
            return cls("sidecar", base)
        path = request.captions_file or base / CAPTION_FILES[request.captions]
        if not path.is_file():
            raise PrepareError(
                f"--captions {request.captions}: caption file {path} not found (or pass --captions-file)"
            )
        rows = _read_jsonl(path) if request.captions == "jsonl" else _read_csv(path)
        return cls(request.captions, path.parent.resolve(), {_normalise(path.parent, f): c for f, c in rows}, path.name)

    def caption_for(self, file: Path) -> str:
        """The caption of ``file``.

        Raises:
            SkipInputError: ``missing_caption`` when there is none.
        """
        if self.table is None:
            sidecar = file.with_suffix(".txt")
            if not sidecar.is_file():
                raise SkipInputError("missing_caption", f"missing caption: no sidecar file {sidecar.name}")
            return sidecar.read_text(encoding="utf-8").strip()
        caption = self.table.get(str(file.resolve()))
        if caption is None:
            raise SkipInputError("missing_caption", f"missing caption: not listed in {self.where}")
        return caption


def _normalise(base: Path, file: str) -> str:
    return str((base / file).resolve())


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            rows.append((str(record["file"]), str(record["caption"])))
        except (ValueError, KeyError, TypeError) as err:
            raise PrepareError(f'{path}:{number}: expected {{"file": ..., "caption": ...}} ({err})') from None
    return rows


def _read_csv(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"file", "caption"} <= set(reader.fieldnames or ()):
            raise PrepareError(f"{path}: needs a header with the columns file,caption; got {reader.fieldnames}")
        return [(row["file"], row["caption"] or "") for row in reader]


def check_request(request: PrepareRequest, vae: LatentCodec, image_encoder: ImageEncoder | None = None) -> None:
    """Refuse buckets and frame counts the VAE cannot encode, and image conditioning without an image encoder,
    before any work.

    Raises:
        PrepareError: Naming the bucket or frame count and the VAE's strides, or ``--image-encoder``.
    """
    if request.image_condition is not None and image_encoder is None:
        raise PrepareError(
            f"--image-condition {request.image_condition} needs --image-encoder DIR (the CLIP vision model, e.g. the "
            "image_encoder/ of Wan2.1-I2V-14B-480P-Diffusers)"
        )
    spec = vae.latent_spec
    for height, width in request.clip.buckets:
        if height % spec.spatial_stride or width % spec.spatial_stride:
            raise PrepareError(
                f"bucket {height}x{width} is not a multiple of the VAE's spatial stride {spec.spatial_stride}; "
                "pick --height/--width divisible by it (16 suits WAN)"
            )
    if (request.clip.frame_limit - 1) % spec.temporal_stride:
        raise PrepareError(f"frames must be 1 + a multiple of the VAE's temporal stride {spec.temporal_stride}")


def _identity(codec: object) -> str:
    return str(getattr(codec, "identity", None) or type(codec).__name__)


def _normalisation(vae: LatentCodec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    channels = vae.latent_spec.channels
    mean = getattr(vae, "latents_mean", None)
    std = getattr(vae, "latents_std", None)
    mean = tuple(float(x) for x in mean) if mean is not None else (0.0,) * channels
    std = tuple(float(x) for x in std) if std is not None else (1.0,) * channels
    return mean, std


class SampleEncoder:
    """Turns one input file into the members of one sample (see :mod:`dfm.ports.samples`)."""

    def __init__(
        self,
        request: PrepareRequest,
        vae: LatentCodec,
        text_encoder: TextEncoder,
        captions: Captions,
        image_encoder: ImageEncoder | None = None,
    ) -> None:
        self.request, self.vae, self.text_encoder, self.captions = request, vae, text_encoder, captions
        self.image_encoder = image_encoder
        self.dtype = _DTYPES[request.dtype]
        self.mean, self.std = _normalisation(vae)
        self.vae_id, self.text_id = _identity(vae), _identity(text_encoder)
        self.image_id = _identity(image_encoder) if image_encoder is not None else None

    def __call__(self, path: Path) -> dict[str, bytes]:
        """The sample's members.

        Raises:
            SkipInputError: ``missing_caption``, ``unreadable``, ``too_short`` or ``encode_failed``.
        """
        caption = self.captions.caption_for(path)
        try:
            clip = load_clip(path, self.request.clip)
        except ClipError as err:
            raise SkipInputError(err.kind, err.reason) from None
        kind = self.request.image_condition
        if kind == "first_last" and clip.frames < 2:
            raise SkipInputError(
                "too_short", "--image-condition first_last needs clips of at least 2 frames (an image is one)"
            )
        try:
            latents, text = self._encode(clip.pixels, caption)
            condition, image = self._condition(clip.pixels) if kind is not None else (None, None)
        except (RuntimeError, ValueError, TypeError) as err:
            raise SkipInputError("encode_failed", f"encoding failed: {type(err).__name__}: {err}") from None
        meta = SampleMeta(
            caption=caption,
            source=str(path),
            fps=clip.fps,
            frames=clip.frames,
            height=clip.height,
            width=clip.width,
            latent_shape=tuple(latents.shape),
            text_len=int(text.shape[0]),
            vae=self.vae_id,
            text_encoder=self.text_id,
            latents_mean=self.mean,
            latents_std=self.std,
            condition=kind,
            image_encoder=self.image_id if kind is not None else None,
            image_shape=tuple(image.shape) if image is not None else None,
        )
        return encode_sample(latents, text, meta, condition=condition, image=image)

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        latents = self.vae.encode(pixels[None].to(self.request.device))[0]
        embeddings, mask = self.text_encoder.encode([caption], self.request.text_max_length)
        text = embeddings[0][mask[0].to(embeddings.device)]
        return _stored(latents, self.dtype), _stored(text, self.dtype)

    @torch.no_grad()
    def _condition(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The condition latents ``[C, F, H, W]`` (the VAE's encoding of ``[first, zeros..., (last)]``) and the image
        features ``[n, R, D]`` of the conditioning frames, of a clip's pixels ``[3, T, H, W]`` in ``[-1, 1]``."""
        assert self.image_encoder is not None
        frames = pixels.shape[1]
        given = [0, frames - 1] if self.request.image_condition == "first_last" else [0]
        first, last = pixels[None, :, 0], (pixels[None, :, -1] if len(given) == 2 else None)
        latents = self.vae.encode(condition_pixels(first, frames, last).to(self.request.device))[0]
        features = self.image_encoder.encode(list(to_uint8_frames(pixels[:, given], layout="cthw")))
        return _stored(latents, self.dtype), _stored(features, self.dtype)


def _stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=dtype).contiguous()


@attrs.define
class RankReport:
    """What one rank did in this run."""

    assigned: int = 0
    """Inputs this rank was given."""
    resumed: int = 0
    """Of those, inputs already in finished shards (not prepared again)."""
    prepared: int = 0
    """Samples written in this run."""
    skipped: list[dict[str, str]] = attrs.Factory(list)
    """``{"path", "kind", "reason"}`` of each input skipped."""
    shards: list[str] = attrs.Factory(list)
    """Shards finished in this run."""


def _skip(report: RankReport, path: Path, err: SkipInputError, strict: bool) -> None:
    if strict:
        raise PrepareError(f"--strict: cannot prepare {path}: {err.reason}")
    log.warning("skipping input", path=str(path), kind=err.kind, reason=err.reason)
    report.skipped.append({"path": str(path), "kind": err.kind, "reason": err.reason})


def prepare_rank(request: PrepareRequest, encoder: SampleEncoder, files: list[Path], ranks: Ranks) -> RankReport:
    """Prepare this rank's share of ``files`` into its own shards, skipping inputs of finished shards."""
    report = RankReport()
    energon_writer().remove_unfinished(request.out, ranks.rank)
    done = {source for manifest in energon_writer().finished_shards(request.out) for source in manifest.inputs}
    mine = files[ranks.rank :: ranks.world_size]
    todo = [path for path in mine if str(path) not in done]
    report.assigned, report.resumed = len(mine), len(mine) - len(todo)
    if report.resumed:
        log.info("resuming: inputs already in finished shards are skipped", count=report.resumed)
    start = energon_writer().next_shard_index(request.out, ranks.rank)
    bar = tqdm(todo, desc="prepare", unit="file", disable=not request.progress or ranks.rank != 0)
    with energon_writer().ShardWriter(
        request.out, rank=ranks.rank, samples_per_shard=request.samples_per_shard, start_index=start
    ) as w:
        for path in bar:
            try:
                members = encoder(path)
            except SkipInputError as err:
                _skip(report, path, err, request.strict)
                continue
            w.write(str(path), members)
            report.prepared += 1
    report.shards = [m.shard for m in w.finished]
    return report


def _merge_reports(out: Path, world_size: int, total: int) -> dict[str, object]:
    ranks = [json.loads((out / REPORT_DIR / f"r{r:03d}.json").read_text()) for r in range(world_size)]
    skipped = [item for rank in ranks for item in rank["skipped"]]
    manifests = energon_writer().finished_shards(out)
    by_kind: dict[str, int] = {}
    for item in skipped:
        by_kind[item["kind"]] = by_kind.get(item["kind"], 0) + 1
    return {
        "inputs": total,
        "prepared": sum(r["prepared"] for r in ranks),
        "resumed": sum(r["resumed"] for r in ranks),
        "skipped": len(skipped),
        "skipped_by_kind": dict(sorted(by_kind.items())),
        "skipped_files": sorted(skipped, key=lambda item: item["path"]),
        "shards": len(manifests),
        "samples": sum(m.samples for m in manifests),
        "world_size": world_size,
    }


def _write_json(path: Path, record: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def prepare(
    request: PrepareRequest,
    *,
    vae: LatentCodec,
    text_encoder: TextEncoder,
    image_encoder: ImageEncoder | None = None,
    ranks: Ranks | None = None,
) -> dict[str, object] | None:
    """Prepare every input of ``request`` (this rank's share), then (rank 0) index the shards for Energon.

    Args:
        request: What to prepare.
        vae: Encodes ``[1, 3, T, H, W]`` pixels in ``[-1, 1]`` to normalised latents.
        text_encoder: Embeds captions.
        image_encoder: Embeds the conditioning frames (``request.image_condition``; needed exactly then).
        ranks: This process among the preparing processes (default: a world of one).

    Returns:
        On rank 0 the report also written to ``out/prepare_report.json``; ``None`` on other ranks.

    Raises:
        PrepareError: No inputs, a missing caption file, a bucket the VAE cannot encode, image conditioning
            without an image encoder, or (``strict``) the first input that cannot be prepared.
        ValueError: ``out`` is an existing file or cannot be written.
    """
    ranks = ranks or Ranks()
    check_output_dir(request.out, option="--out")
    check_request(request, vae, image_encoder)
    files = list_inputs(request.input)
    if not files:
        raise PrepareError(f"no videos or images found in {request.input}")
    captions = Captions.load(request)
    request.out.mkdir(parents=True, exist_ok=True)
    encoder = SampleEncoder(request, vae, text_encoder, captions, image_encoder)
    report = prepare_rank(request, encoder, files, ranks)
    _write_json(request.out / REPORT_DIR / f"r{ranks.rank:03d}.json", attrs.asdict(report))
    ranks.barrier()
    summary = None
    if ranks.rank == 0:
        energon_writer().remove_unfinished(request.out)
        summary = _merge_reports(request.out, ranks.world_size, len(files))
        _write_json(request.out / REPORT, summary)
        log.info("prepared", **{k: summary[k] for k in ("inputs", "prepared", "resumed", "skipped", "shards")})
        shards = [m.shard for m in energon_writer().finished_shards(request.out)]
        if not shards:
            raise PrepareError(f"no input could be prepared (see {request.out / REPORT})")
        energon_writer().write_energon_metadata(request.out, shards, subflavors=SUBFLAVORS)
    ranks.barrier()
    return summary
