"""``python -m dfm.app.generate``: videos from a trained checkpoint and text prompts."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dfm.app.cli import UserError, make_parser, run_main
from dfm.app.config.training import ATTENTION_BACKENDS

EXAMPLES = """\
  python -m dfm.app.generate --checkpoint runs/demo --prompt "a red circle moving left slowly" --out out/red.mp4
  python -m dfm.app.generate --checkpoint runs/demo/checkpoints/step_0000200 \\
      --prompt "a blue square moving up quickly" --prompt "a white ring moving right slowly" \\
      --steps 30 --guidance 4 --seed 7 --out out/two.mp4
  python -m dfm.app.generate --checkpoint exported/demo --prompt "a red circle moving left slowly" --out out/red.mp4
  python -m dfm.app.generate --checkpoint runs/wan --vae models/Wan2.1-T2V-1.3B-Diffusers \
      --text-encoder models/Wan2.1-T2V-1.3B-Diffusers --prompt "a cat surfing at sunset" --out out/cat.mp4
  torchrun --nproc-per-node 4 -m dfm.app.generate --checkpoint runs/wan --prompt "a cat surfing at sunset" \\
      --out out/cat.mp4    # 4 GPUs: CFG parallel 2 x context parallel 2
  python -m dfm.app.generate --checkpoint exported/wan_i2v --image first.png --prompt "the cat jumps" \\
      --image-encoder models/Wan2.1-I2V-14B-480P-Diffusers --out out/jump.mp4   # image-to-video"""


def build_parser() -> argparse.ArgumentParser:
    """The ``dfm.app.generate`` argument parser."""
    p = make_parser("python -m dfm.app.generate", "Generate videos from a trained dfm checkpoint.", examples=EXAMPLES)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run directory (newest checkpoint), checkpoint directory, or a diffusers directory exported by "
        "`python -m dfm.app.convert export --checkpoint` (config.json + weights + dfm_config.yaml)",
    )
    p.add_argument("--prompt", action="append", required=True, help="caption; repeat for several videos")
    p.add_argument("--negative-prompt", default=None, help="text of the unconditional pass (default: null text)")
    p.add_argument("--sampler", choices=("unipc", "flow_euler", "edm_euler", "edm_heun"), default=None)
    p.add_argument("--steps", type=int, default=None, help="sampling steps, >= 1 (default: the run's sample.steps)")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale >= 0, 1 = none (default: sample.guidance)",
    )
    p.add_argument(
        "--shift", type=float, default=None, help="flow shift at sampling time, > 0; flow-matching models only"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise, >= 0 (default: 0)")
    p.add_argument(
        "--frames",
        type=int,
        default=None,
        help="frames per video (default: sample.frames); 1 + a multiple of the VAE's temporal stride (4n+1 for WAN)",
    )
    p.add_argument(
        "--height",
        type=int,
        default=None,
        help="pixels; a multiple of VAE stride x patch, 16 for WAN (default: sample.height)",
    )
    p.add_argument("--width", type=int, default=None, help="pixels; like --height (default: sample.width)")
    p.add_argument("--fps", type=float, default=None, help="frame rate of the mp4, > 0 (default: the run's data.fps)")
    p.add_argument(
        "--vae",
        default=None,
        help="WAN VAE directory (diffusers AutoencoderKLWan, or a model root holding vae/) replacing the "
        "checkpoint's codecs.vae, e.g. when the recorded path moved",
    )
    p.add_argument(
        "--text-encoder",
        default=None,
        help="UMT5 directory (or a model root holding text_encoder/) replacing the checkpoint's codecs.text_encoder",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer directory replacing the checkpoint's codecs.tokenizer")
    p.add_argument(
        "--image",
        type=Path,
        default=None,
        metavar="FILE",
        help="image-to-video models: the first frame (scaled and centre-cropped to --height x --width)",
    )
    p.add_argument(
        "--last-image", type=Path, default=None, metavar="FILE", help="first-last-frame models: the last frame"
    )
    p.add_argument(
        "--image-encoder",
        default=None,
        metavar="DIR",
        help="CLIP vision model (or a model root holding image_encoder/) replacing codecs.image_encoder",
    )
    p.add_argument("--no-ema", action="store_true", help="sample with the raw weights even when EMA weights exist")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE",
        help="LoRA adapter file folded into the weights (diffusers/PEFT naming as convert export-lora writes, or "
        "WAN/kohya 'diffusion_model.' and musubi 'lora_unet_' naming); repeat for several",
    )
    p.add_argument(
        "--lora-scale",
        action="append",
        type=float,
        default=[],
        metavar="S",
        help="strength of each --lora in order (one value: all of them; default 1.0)",
    )
    p.add_argument("--out", required=True, help="output .mp4 (several prompts: OUT_00.mp4, OUT_01.mp4, ...)")
    p.add_argument(
        "--cache",
        default=None,
        metavar="METHOD:THRESHOLD",
        help="step caching: at steps whose input barely changed, reuse the transformer blocks' residual instead of "
        "running them; first_block:T (First-Block Cache) or teacache:T (TeaCache), larger T is faster and further "
        "from the uncached video, e.g. first_block:0.05 (default: off)",
    )
    speed = p.add_argument_group("speed and memory", "None of these changes the videos beyond float rounding.")
    speed.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="weights and compute: bf16 keeps the time embedding, modulation tables and norms in fp32 as diffusers "
        "does; auto = bf16 on CUDA, fp32 on the CPU (default: auto)",
    )
    speed.add_argument(
        "--attention",
        choices=ATTENTION_BACKENDS,
        default=None,
        help="SDPA backend (default: the run's train.attention_backend; auto: cuDNN first on CUDA; fa4: "
        "FlashAttention-4, needs the flash-attn-4 package)",
    )
    speed.add_argument(
        "--compile", action="store_true", help="torch.compile each block once (CUDA; the first step compiles)"
    )
    speed.add_argument(
        "--cfg",
        choices=("auto", "batched", "separate"),
        default="auto",
        help="guidance's two passes as one forward over the doubled batch, or two forwards (default: auto = "
        "separate in one process, batched under CFG parallelism)",
    )
    speed.add_argument(
        "--batch-size", type=int, default=1, help="prompts sampled together in one forward, >= 1 (default: 1)"
    )
    speed.add_argument(
        "--vae-tiling", action="store_true", help="decode in overlapping tiles: less memory, slower (WAN VAE)"
    )
    add_parallel_arguments(p)
    return p


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    """The multi-process options (``--cfg-parallel``, ``--context-parallel``) ``generate`` and ``bench generate``
    share."""
    parallel = p.add_argument_group(
        "multi-process generation (torchrun --nproc-per-node N)",
        "Every rank samples the same noise and shares each forward; rank 0 decodes and writes. Left out: CFG "
        "parallel when guidance runs both passes (--guidance not 0 or 1) and N is even, the rest context parallel.",
    )
    parallel.add_argument(
        "--cfg-parallel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the conditional and unconditional passes of guidance on two ranks (default: automatic)",
    )
    parallel.add_argument(
        "--context-parallel",
        type=int,
        default=None,
        metavar="C",
        help="ranks that split each video's tokens (Ulysses attention); must divide the attention heads and the "
        "video tokens (default: the processes CFG parallelism leaves)",
    )


SAMPLING_ARGUMENTS = ("sampler", "steps", "guidance", "shift", "seed", "frames", "height", "width")
"""The sampling options ``generate`` and ``bench generate`` share, named as :class:`GenerateRequest`'s fields."""


def sampling_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """``{field: value}`` of :data:`SAMPLING_ARGUMENTS` from parsed command-line ``args``."""
    return {name: getattr(args, name) for name in SAMPLING_ARGUMENTS}


def lora_pairs(files: Sequence[str], scales: Sequence[float]) -> list[tuple[Path, float]]:
    """``--lora`` files paired with their ``--lora-scale`` (none: 1.0 each; one: for all; else one per file).

    Raises:
        ValueError: A count of scales that fits neither rule.
    """
    if (len(scales) > 1 and len(scales) != len(files)) or (scales and not files):
        raise ValueError(f"--lora-scale: {len(scales)} values for {len(files)} --lora files (give one, or one each)")
    values = list(scales) * len(files) if len(scales) == 1 else list(scales) or [1.0] * len(files)
    return [(Path(f), s) for f, s in zip(files, values, strict=True)]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error)."""
    args = build_parser().parse_args(argv)
    from dfm.app.logging import configure_logging
    from dfm.app.services.generation import GenerateRequest, generate

    configure_logging()
    try:
        request = GenerateRequest(
            checkpoint=args.checkpoint,
            prompts=args.prompt,
            out=args.out,
            negative_prompt=args.negative_prompt,
            **sampling_arguments(args),
            fps=args.fps,
            use_ema=not args.no_ema,
            vae=args.vae,
            text_encoder=args.text_encoder,
            tokenizer=args.tokenizer,
            cache=args.cache,
            precision=args.precision,
            attention=args.attention,
            compile=args.compile,
            cfg=args.cfg,
            batch_size=args.batch_size,
            vae_tiling=args.vae_tiling,
            cfg_parallel=args.cfg_parallel,
            context_parallel=args.context_parallel,
            loras=lora_pairs(args.lora, args.lora_scale),
            image=args.image,
            last_image=args.last_image,
            image_encoder=args.image_encoder,
        )
        paths = generate(request)
    except ValueError as exc:  # bad request values, a sampler that does not fit the model: the user's to fix
        raise UserError(str(exc)) from None
    if not paths:  # a torchrun rank other than 0: rank 0 wrote (and names) the files
        return 0
    for path in paths:
        print(path)
    print(request.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
