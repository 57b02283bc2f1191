"""``python -m dfm.app.prepare``: videos/images + captions -> encoded samples in Energon webdataset shards.

See docs/data.md for the options, the sample format, resuming, the report and torchrun.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from dfm.app.cli import UserError, run_main
from dfm.ports.codecs import ImageEncoder, LatentCodec, TextEncoder

EXAMPLES = """\
  python -m dfm.app.prepare --input videos/ --out data/train --vae models/Wan2.1-T2V-1.3B-Diffusers \\
      --text-encoder models/Wan2.1-T2V-1.3B-Diffusers --bucket-preset 480p --frames 81 --fps 16
  python -m dfm.app.prepare --input clips.txt --captions jsonl --captions-file captions.jsonl --out data/train \\
      --vae models/wan/vae --text-encoder models/wan/text_encoder --height 256 --width 256 --resize pad
  torchrun --nproc-per-node 8 -m dfm.app.prepare --input videos/ --out data/train --vae W --text-encoder W
  python -m dfm.app.prepare --input videos/ --out data/i2v --vae models/Wan2.1-I2V-14B-480P-Diffusers \\
      --text-encoder models/Wan2.1-I2V-14B-480P-Diffusers --bucket-preset 480p --frames 81 \\
      --image-condition first --image-encoder models/Wan2.1-I2V-14B-480P-Diffusers
  python -m dfm.app.prepare --synthetic 8 --out data/try --vae toy --text-encoder toy --height 64 --width 64"""

TOY = "toy"
"""``--vae``/``--text-encoder``/``--image-encoder`` value selecting the embedded toy codecs (pixels as latents,
hashed words, 4 x 4 pixel blocks)."""
SYNTHETIC_DIR = "synthetic_videos"
"""Subdirectory of ``--out`` that ``--synthetic N`` writes its mp4 files and captions into."""
_DTYPE_NAMES = {"bfloat16": "bf16", "float32": "fp32"}


def build_parser() -> argparse.ArgumentParser:
    """The ``dfm.app.prepare`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m dfm.app.prepare",
        description="Encode videos and images with their captions into Energon webdataset shards for training.",
        epilog=f"examples:\n{EXAMPLES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", type=Path, help="directory of videos/images (recursive) or a text file listing them")
    p.add_argument("--out", type=Path, required=True, help="output directory of the shards and the report")
    p.add_argument("--vae", required=True, help=f"WAN VAE directory or model root; '{TOY}': pixels as latents")
    p.add_argument("--text-encoder", required=True, help=f"UMT5 directory or model root; '{TOY}': hashed words")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: found beside the encoder)")
    i2v = p.add_argument_group("image-to-video (default: text-to-video samples)")
    i2v.add_argument(
        "--image-condition",
        choices=("first", "first_last"),
        default=None,
        help="also store the VAE latents and image features of each clip's first (and last) frame",
    )
    i2v.add_argument(
        "--image-encoder",
        default=None,
        metavar="DIR",
        help=f"CLIP vision model directory or model root (with image_encoder/); '{TOY}': 4x4 pixel blocks",
    )
    size = p.add_argument_group("size (default: --bucket-preset 480p)")
    size.add_argument("--bucket-preset", choices=("480p", "720p"), default=None, help="aspect-ratio buckets")
    size.add_argument("--height", type=int, default=None, help="one bucket: height (with --width)")
    size.add_argument("--width", type=int, default=None, help="one bucket: width (with --height)")
    p.add_argument("--frames", type=int, default=None, help="exact frames 4n+1 (default: longest 4n+1 that fits)")
    p.add_argument("--max-frames", type=int, default=81, help="cap on frames without --frames (default: 81)")
    p.add_argument("--fps", type=float, default=16.0, help="target frame rate; 0 keeps the source's (default: 16)")
    p.add_argument("--resize", choices=("crop", "pad"), default="crop", help="fit to the bucket (default: crop)")
    p.add_argument("--captions", choices=("sidecar", "jsonl", "csv"), default="sidecar", help="caption source")
    p.add_argument("--captions-file", type=Path, default=None, help="the jsonl/csv file (default: in --input)")
    p.add_argument("--samples-per-shard", type=int, default=100)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="codecs and stored tensors")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--text-max-length", type=int, default=512, help="most caption tokens (default: 512)")
    p.add_argument("--strict", action="store_true", help="stop at the first input that cannot be prepared")
    p.add_argument(
        "--synthetic", type=int, default=None, metavar="N", help=f"first write N toy videos to OUT/{SYNTHETIC_DIR}"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_options(args: argparse.Namespace) -> None:
    """Refuse options that cannot work (counts below 1, frame counts not ``4n + 1``, a bad ``--fps``) before any work.

    Raises:
        UserError: Naming the option and what it accepts.
    """
    if args.input is None and args.synthetic is None:
        raise UserError("give --input (a directory or list file) or --synthetic N")
    if args.input is not None and args.synthetic is not None:
        raise UserError(
            f"give either --input or --synthetic N, not both (--synthetic prepares the clips it writes to "
            f"OUT/{SYNTHETIC_DIR})"
        )
    if args.synthetic is not None and args.synthetic < 1:
        raise UserError(f"--synthetic N must be at least 1 (the number of toy videos to write), got {args.synthetic}")
    for option, frames in (("--frames", args.frames), ("--max-frames", args.max_frames)):
        if frames is not None and (frames < 1 or frames % 4 != 1):
            raise UserError(f"{option} must be 4n + 1 (1, 5, 9, ..., 81), got {frames}")
    if not (math.isfinite(args.fps) and args.fps >= 0):
        raise UserError(f"--fps must be a finite frame rate > 0, or 0 to keep each source's rate; got {args.fps:g}")
    for option, count in (("--samples-per-shard", args.samples_per_shard), ("--text-max-length", args.text_max_length)):
        if count < 1:
            raise UserError(f"{option} must be at least 1, got {count}")
    if args.captions_file is not None and args.captions == "sidecar":
        raise UserError("--captions-file goes with --captions jsonl or csv (sidecar captions are NAME.txt files)")
    if args.image_encoder is not None and args.image_condition is None:
        raise UserError("--image-encoder goes with --image-condition first or first_last (image-to-video samples)")
    if args.image_condition is not None and args.image_encoder is None:
        raise UserError(
            f"--image-condition {args.image_condition} needs --image-encoder DIR (the CLIP vision model, e.g. the "
            f"image_encoder/ of Wan2.1-I2V-14B-480P-Diffusers; '{TOY}' for the toy encoder)"
        )
    if args.image_condition == "first_last" and args.frames == 1:
        raise UserError("--image-condition first_last needs clips of at least 2 frames; --frames is 1")


def _buckets(args: argparse.Namespace) -> tuple[tuple[int, int], ...]:
    from dfm.app.bootstrap import BUCKET_PRESETS

    if (args.height is None) != (args.width is None):
        raise UserError("--height and --width go together")
    if args.height is not None:
        if args.bucket_preset is not None:
            raise UserError("give either --height/--width or --bucket-preset, not both")
        if args.height < 16 or args.width < 16:
            raise UserError(f"--height/--width must be at least 16, got {args.height}x{args.width}")
        return ((args.height, args.width),)
    return BUCKET_PRESETS[args.bucket_preset or "480p"]


def _device(name: str, local_rank: int) -> str:
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA device is available")
    return f"cuda:{local_rank}"


def build_codecs(args: argparse.Namespace, device: str) -> tuple[LatentCodec, TextEncoder]:
    """The VAE and text encoder the arguments name (the toy codecs for ``toy``)."""
    from dfm.app import bootstrap

    return bootstrap.prepare_codecs(
        None if args.vae == TOY else args.vae,
        None if args.text_encoder == TOY else args.text_encoder,
        tokenizer=args.tokenizer,
        device=device,
        dtype=_DTYPE_NAMES[args.dtype],
    )


def build_image_encoder(args: argparse.Namespace, device: str) -> ImageEncoder | None:
    """The image encoder ``--image-encoder`` names (the toy one for ``toy``); ``None`` without ``--image-condition``."""
    from dfm.app import bootstrap

    if args.image_condition is None:
        return None
    path = None if args.image_encoder == TOY else args.image_encoder
    return bootstrap.prepare_image_encoder(path, device=device, dtype=_DTYPE_NAMES[args.dtype])


def write_synthetic_videos(directory: Path, count: int, *, frames: int, height: int, width: int, fps: float) -> Path:
    """Write ``count`` procedural clips (:mod:`dfm.adapters.synthetic.videos`) as mp4 + sidecar captions."""
    from dfm.app.bootstrap import Mp4Writer, describe_clip, render_clip, to_uint8_frames

    writer = Mp4Writer()
    for index in range(count):
        path = directory / f"clip_{index:05d}.mp4"
        if path.is_file() and path.with_suffix(".txt").is_file():
            continue  # written by an earlier run
        spec = describe_clip(index, seed=0, background=True)
        writer.write(to_uint8_frames(render_clip(spec, frames, height, width)), path, fps)
        path.with_suffix(".txt").write_text(spec.caption + "\n", encoding="utf-8")
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error)."""
    args = build_parser().parse_args(argv)
    from dfm.app.bootstrap import ClipOptions, DistEnv, init_process_group
    from dfm.app.logging import configure_logging
    from dfm.app.services.paths import check_output_dir
    from dfm.app.services.prepare import PrepareRequest, Ranks, check_request, prepare

    try:
        env = DistEnv.from_env()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    configure_logging(rank=env.rank)
    check_options(args)
    device = _device(args.device, env.local_rank)
    ranks = Ranks()
    if env.world_size > 1:
        import torch.distributed as dist

        init_process_group(device, env=env)
        ranks = Ranks(rank=env.rank, world_size=env.world_size, barrier=dist.barrier)
    try:
        buckets = _buckets(args)
        clip = ClipOptions(
            buckets=buckets,
            frames=args.frames,
            max_frames=args.max_frames,
            fps=args.fps or None,
            resize=args.resize,
        )
        source = args.input if args.synthetic is None else args.out / SYNTHETIC_DIR
        request = PrepareRequest(
            input=source,
            out=args.out,
            clip=clip,
            captions=args.captions,
            captions_file=args.captions_file,
            samples_per_shard=args.samples_per_shard,
            dtype=args.dtype,
            device=device,
            text_max_length=args.text_max_length,
            strict=args.strict,
            progress=not args.no_progress,
            image_condition=args.image_condition,
        )
        check_output_dir(request.out, option="--out")
        vae, text = build_codecs(args, device)
        image_encoder = build_image_encoder(args, device)
        check_request(request, vae, image_encoder)
        if args.synthetic is not None:
            if env.rank == 0:
                height, width = buckets[0]
                write_synthetic_videos(
                    source, args.synthetic, frames=args.frames or 33, height=height, width=width, fps=args.fps or 16.0
                )
            ranks.barrier()
        report = prepare(request, vae=vae, text_encoder=text, image_encoder=image_encoder, ranks=ranks)
    except ValueError as exc:  # bad options, inputs or (--strict) a bad file: the user's to fix
        raise UserError(str(exc)) from None
    if report is not None:
        print(
            f"prepared {report['prepared']} samples ({report['resumed']} resumed, {report['skipped']} skipped) "
            f"of {report['inputs']} inputs; {report['samples']} samples in {report['shards']} shards"
        )
        print(args.out / "prepare_report.json")
    if env.world_size > 1:
        from dfm.app.bootstrap import destroy_process_group

        destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
