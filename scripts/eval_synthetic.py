"""Does a model trained on the synthetic videos follow its captions? Colour, shape and motion accuracy.

Generates one video per caption from a checkpoint and reads back, from the pixels alone, what the video
shows; a video scores on an attribute when what it shows is what its caption says::

    .venv/bin/python scripts/eval_synthetic.py --checkpoint runs/demo            # 40 captions, seed 0
    .venv/bin/python scripts/eval_synthetic.py --checkpoint runs/demo --reference  # the scorer on true clips

How a video is read (it must be on the plain black background of the ``default`` recipe's data):

- coverage: the brightest channel of each pixel (in ``[0, 1]``); every shape colour has a channel at 1,
  so on black this is the fraction of the pixel the shape covers. Pixels below :data:`FOREGROUND` are
  background.
- colour: the foreground's chromaticity (RGB over coverage, coverage-weighted mean) against
  :data:`~dfm.adapters.synthetic.videos.COLOURS`, nearest in RGB (chance 1/8).
- direction: the coverage centroid's displacement from the first to the last frame; the direction of
  :data:`~dfm.adapters.synthetic.videos.DIRECTIONS` it points most along (chance 1/4). Speed: the
  travelled fraction of the frame against the midpoint of :data:`~dfm.adapters.synthetic.videos.TRAVEL`
  (chance 1/2, scored only when the direction is right).
- shape: every frame's coverage against each shape drawn at that frame's centroid over a range of radii
  (soft IoU, the best radius per shape), summed over frames; the best shape (chance 1/5).

``--reference`` scores the true clips of the same captions (rendered by the data source) instead of
generated ones: the scorer's own accuracy, which should be 1.0 for every attribute.

The functions are importable (``tests/e2e/test_default_recipe_learns.py`` loads this file by path).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from dfm.adapters.synthetic.videos import _SDFS, COLOURS, DIRECTIONS, SHAPES, TRAVEL, VideoSpec, render_batch

FOREGROUND = 0.3
"""Coverage below which a pixel counts as background (generated videos are not exactly black)."""
RADII = tuple(0.10 + 0.01 * i for i in range(21))
"""Radii (fractions of ``min(H, W)``) the shape templates are tried at, 0.10 - 0.30 (the data draws
0.14 - 0.19 by default, 0.20 - 0.24 in the ``default`` recipe)."""
ATTRIBUTES = ("colour", "shape", "direction", "speed")
"""What is scored, in report order."""
CHANCE = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "direction": 1 / len(DIRECTIONS), "speed": 0.5}
"""Accuracy of guessing."""


# --- captions -----------------------------------------------------------------------------------------


def eval_specs(n: int, seed: int = 0) -> list[VideoSpec]:
    """``n`` clip descriptions with balanced attributes: each value of each attribute about equally often.

    Each attribute's values are repeated to length ``n`` and shuffled on their own (fixed ``seed``), so
    the attributes are not tied to one another.
    """
    g = torch.Generator().manual_seed(seed)
    columns = {}
    for name, values in (("colour", tuple(COLOURS)), ("shape", SHAPES), ("direction", tuple(DIRECTIONS))):
        column = [values[i % len(values)] for i in range(n)]
        columns[name] = [column[j] for j in torch.randperm(n, generator=g).tolist()]
    speeds = [tuple(TRAVEL)[i % len(TRAVEL)] for i in range(n)]
    columns["speed"] = [speeds[j] for j in torch.randperm(n, generator=g).tolist()]
    return [VideoSpec(**{k: columns[k][i] for k in columns}) for i in range(n)]


# --- generation ---------------------------------------------------------------------------------------


@torch.no_grad()
def generate_videos(
    checkpoint: Path | str,
    captions: Sequence[str],
    *,
    seed: int = 0,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    shift: float | None = None,
    batch_size: int = 20,
    use_ema: bool = True,
) -> torch.Tensor:
    """One video per caption from a checkpoint (a run directory or a checkpoint directory).

    Sampler, steps, guidance, shift and size come from the checkpoint's ``sample`` config unless given.

    Returns:
        Pixels ``[N, 3, T, H, W]`` in ``[0, 1]``, float32 on the CPU.
    """
    from dfm.app import bootstrap
    from dfm.app.services.checkpoints import load_for_inference
    from dfm.domain.sampling import sample_latents

    cfg, model = load_for_inference(Path(checkpoint), use_ema=use_ema)
    codec, text_encoder = bootstrap.build_codecs(cfg)
    device = next(model.parameters()).device
    s = cfg.sample
    shape = codec.latent_spec.latent_shape(s.frames, s.height, s.width)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(captions), *shape), generator=generator)
    out = []
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start : start + batch_size])
        text, mask = text_encoder.encode(chunk, cfg.data.text_len)
        latents = sample_latents(
            model,
            cfg.diffusion,
            noise[start : start + len(chunk)].to(device),
            sampler=sampler or s.sampler,
            steps=steps or s.steps,
            guidance=s.guidance if guidance is None else guidance,
            text=text.to(device),
            text_mask=mask.to(device),
            shift=s.shift if shift is None else shift,
            generator=generator,
        )
        out.append(codec.decode(latents.float().cpu()))
    return ((torch.cat(out) + 1) / 2).clamp(0, 1)


def reference_videos(specs: Sequence[VideoSpec], frames: int, height: int, width: int) -> torch.Tensor:
    """The true clips of ``specs`` (what the data source renders): ``[N, 3, T, H, W]`` in ``[0, 1]``."""
    return (render_batch(specs, frames, height, width) + 1) / 2


# --- reading a video ----------------------------------------------------------------------------------


def coverage_of(video: torch.Tensor) -> torch.Tensor:
    """Shape coverage ``[T, H, W]`` of a video ``[3, T, H, W]`` in ``[0, 1]`` on black: the brightest channel."""
    return video.amax(dim=0)


def read_colour(video: torch.Tensor) -> str | None:
    """The :data:`COLOURS` name nearest to the foreground's chromaticity; ``None`` without foreground."""
    cov = coverage_of(video)
    weight = torch.where(cov >= FOREGROUND, cov, torch.zeros_like(cov))
    if weight.sum() <= 0:
        return None
    chroma = video / cov.clamp(min=1e-6)  # [3, T, H, W]: the colour with its coverage divided out
    mean = (chroma * weight).flatten(1).sum(1) / weight.sum()
    table = torch.tensor(list(COLOURS.values()))
    return list(COLOURS)[int((table - mean).square().sum(1).argmin())]


def centroids(video: torch.Tensor) -> torch.Tensor:
    """Coverage centroid ``(x, y)`` per frame ``[T, 2]`` in pixels (NaN in a frame without foreground)."""
    cov = coverage_of(video)
    w = torch.where(cov >= FOREGROUND, cov, torch.zeros_like(cov))
    _, h, wd = w.shape
    ys, xs = torch.arange(h) + 0.5, torch.arange(wd) + 0.5
    mass = w.sum((1, 2))
    x = (w.sum(1) * xs).sum(1) / mass
    y = (w.sum(2) * ys).sum(1) / mass
    return torch.stack([x, y], dim=1)


def read_motion(video: torch.Tensor) -> tuple[str | None, str | None]:
    """``(direction, speed)`` of the centroid from the first to the last frame with foreground."""
    c = centroids(video)
    seen = ~c.isnan().any(dim=1)
    if seen.sum() < 2:
        return None, None
    first, last = c[seen][0], c[seen][-1]
    delta = last - first
    names = list(DIRECTIONS)
    units = torch.tensor([DIRECTIONS[k] for k in names], dtype=torch.float32)
    direction = names[int((units @ delta).argmax())]
    extent = video.shape[-1] if DIRECTIONS[direction][0] else video.shape[-2]
    # travelled between the first and last frames with foreground, scaled to the whole clip
    frames = torch.nonzero(seen).flatten()
    span = max(int(frames[-1] - frames[0]), 1) / max(video.shape[1] - 1, 1)
    travelled = float(units[names.index(direction)] @ delta) / extent / span
    slow, quick = TRAVEL["slowly"], TRAVEL["quickly"]
    return direction, "quickly" if travelled > (slow + quick) / 2 else "slowly"


def _template(shape: str, cx: float, cy: float, r: float, height: int, width: int) -> torch.Tensor:
    px = torch.arange(width)[None, :] + 0.5 - cx
    py = torch.arange(height)[:, None] + 0.5 - cy
    return (0.5 - _SDFS[shape](px, py, torch.tensor(r))).clamp(0.0, 1.0)


def shape_scores(video: torch.Tensor) -> dict[str, float]:
    """Per shape: the sum over frames of the best soft IoU of the frame's coverage with the shape drawn
    at the frame's centroid (best radius of :data:`RADII`)."""
    cov = coverage_of(video)
    t, h, w = cov.shape
    c = centroids(video)
    scores = dict.fromkeys(SHAPES, 0.0)
    for f in range(t):
        if c[f].isnan().any():
            continue
        cx, cy = float(c[f, 0]), float(c[f, 1])
        for shape in SHAPES:
            best = 0.0
            for r in RADII:
                tmpl = _template(shape, cx, cy, r * min(h, w), h, w)
                iou = float(torch.minimum(cov[f], tmpl).sum() / torch.maximum(cov[f], tmpl).sum().clamp(min=1e-6))
                best = max(best, iou)
            scores[shape] += best
    return scores


def read_shape(video: torch.Tensor) -> str | None:
    """The shape of :data:`SHAPES` whose templates fit the frames best; ``None`` without foreground."""
    scores = shape_scores(video)
    if max(scores.values()) <= 0:
        return None
    return max(scores, key=scores.__getitem__)


def read_video(video: torch.Tensor) -> dict[str, str | None]:
    """What a video ``[3, T, H, W]`` in ``[0, 1]`` shows: colour, shape, direction and speed."""
    direction, speed = read_motion(video)
    return {"colour": read_colour(video), "shape": read_shape(video), "direction": direction, "speed": speed}


# --- scoring ------------------------------------------------------------------------------------------


def score(videos: torch.Tensor, specs: Sequence[VideoSpec]) -> dict[str, float]:
    """Accuracy per attribute of ``videos`` ``[N, 3, T, H, W]`` in ``[0, 1]`` against their ``specs``.

    ``speed`` is scored over the videos whose direction is right only (a wrong direction has no speed).
    Keys: ``colour``, ``shape``, ``direction``, ``speed``, ``all`` (every attribute right) and ``n``.
    """
    reads = [read_video(v) for v in videos]
    n = len(specs)
    hits = {k: sum(r[k] == getattr(s, k) for r, s in zip(reads, specs, strict=True)) for k in ("colour", "shape")}
    moved = [(r, s) for r, s in zip(reads, specs, strict=True) if r["direction"] == s.direction]
    hits["direction"] = len(moved)
    out = {k: hits[k] / n for k in ("colour", "shape", "direction")}
    out["speed"] = sum(r["speed"] == s.speed for r, s in moved) / len(moved) if moved else 0.0
    every = [all(r[k] == getattr(s, k) for k in ATTRIBUTES) for r, s in zip(reads, specs, strict=True)]
    out["all"] = sum(every) / n
    out["n"] = n
    return out


def evaluate(
    checkpoint: Path | str,
    *,
    n: int = 40,
    seed: int = 0,
    reference: bool = False,
    sheet: Path | str | None = None,
    **sampling: float | int | None,
) -> dict[str, float]:
    """Generate (or, with ``reference``, render) ``n`` balanced captions' videos and :func:`score` them.

    ``sheet``: also save a PNG contact sheet of the videos with their captions there. ``sampling`` goes
    to :func:`generate_videos` (``sampler``, ``steps``, ``guidance``, ``shift``, ``batch_size``, ``use_ema``).
    """
    specs = eval_specs(n, seed)
    if reference:
        from dfm.app.services.checkpoints import load_for_inference

        s = load_for_inference(Path(checkpoint))[0].sample
        videos = reference_videos(specs, s.frames, s.height, s.width)
    else:
        videos = generate_videos(checkpoint, [s.caption for s in specs], seed=seed, **sampling)
    if sheet is not None:
        from dfm.adapters.video import contact_sheet, save_png, to_uint8_frames

        frames = [to_uint8_frames(v * 2 - 1) for v in videos]
        save_png(contact_sheet(frames, captions=[s.caption for s in specs]), sheet)
    return score(videos, specs)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="run directory or checkpoint directory")
    p.add_argument("-n", type=int, default=40, help="captions (balanced over colours, shapes, directions)")
    p.add_argument("--seed", type=int, default=0, help="seed of the caption draw and of the noise")
    p.add_argument("--sampler", default=None, help="unipc | flow_euler (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the checkpoint's)")
    p.add_argument("--shift", type=float, default=None, help="sampling shift (default: the checkpoint's)")
    p.add_argument("--reference", action="store_true", help="score the true clips (checks the scorer)")
    p.add_argument("--sheet", type=Path, default=None, help="save a PNG contact sheet of the videos here")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    result = evaluate(
        args.checkpoint,
        n=args.n,
        seed=args.seed,
        reference=args.reference,
        sheet=args.sheet,
        **(
            {}
            if args.reference
            else {"sampler": args.sampler, "steps": args.steps, "guidance": args.guidance, "shift": args.shift}
        ),
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{args.checkpoint}: {result['n']} videos ({'reference' if args.reference else 'generated'}), "
        f"{time.perf_counter() - t0:.0f} s"
    )
    for k in (*ATTRIBUTES, "all"):
        chance = CHANCE.get(k, math.prod(CHANCE.values()))
        print(f"  {k:<9} {result[k]:6.1%}   (chance {chance:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
