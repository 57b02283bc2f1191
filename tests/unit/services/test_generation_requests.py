"""Generation requests: every bad value is refused with the option and its valid range; ``None`` takes the default.

No checkpoint is needed: the request's own checks and :func:`sampling_plan` against a resolved config.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dfm.app.config import resolve_config
from dfm.app.services.generation_request import GenerateRequest, SamplingPlan, sampling_plan
from dfm.domain.specs import LatentSpec

PIXELS = LatentSpec(channels=3, temporal_stride=1, spatial_stride=1)
"""The toy codec's latent space (the tiny recipes' data): pixels as latents."""
WAN_VAE = LatentSpec()
"""The WAN 2.1 VAE's latent space: stride 4 x 8 x 8."""


def request(**kw: object) -> GenerateRequest:
    return GenerateRequest(checkpoint="runs/x", prompts=["a red circle"], out="out/x.mp4", **kw)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", 0, "--steps must be an integer >= 1, got 0"),
        ("steps", -3, "--steps must be an integer >= 1, got -3"),
        ("steps", 2.5, "--steps must be an integer >= 1, got 2.5"),
        ("frames", 0, "--frames must be an integer >= 1, got 0"),
        ("height", 0, "--height must be an integer >= 1, got 0"),
        ("width", -16, "--width must be an integer >= 1, got -16"),
        ("fps", 0.0, "--fps must be a finite number > 0, got 0"),
        ("fps", float("inf"), "--fps must be a finite number > 0, got inf"),
        ("guidance", float("nan"), "--guidance must be a finite number >= 0 (1 = no guidance), got nan"),
        ("guidance", -1.0, "--guidance must be a finite number >= 0 (1 = no guidance), got -1"),
        ("shift", 0.0, "--shift must be a finite number > 0, got 0"),
        ("shift", float("nan"), "--shift must be a finite number > 0, got nan"),
        ("seed", -1, "--seed must be an integer from 0 to 9223372036854775807, got -1"),
    ],
)
def test_a_bad_value_is_refused_naming_the_option_and_its_range(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        request(**{field: value})
    assert str(caught.value) == message


def test_values_not_given_take_the_checkpoints_sample_defaults() -> None:
    cfg = resolve_config("wan_tiny_t2v", None, [])
    s = cfg.sample
    assert sampling_plan(request(), cfg, PIXELS) == SamplingPlan(
        sampler=s.sampler,
        steps=s.steps,
        guidance=s.guidance,
        shift=s.shift,
        frames=s.frames,
        height=s.height,
        width=s.width,
        fps=cfg.data.fps,
    )
    given = request(steps=2, guidance=0.0, shift=3.0, frames=3, height=8, width=12, fps=8.0, sampler="unipc")
    plan = sampling_plan(given, cfg, PIXELS)
    assert (plan.steps, plan.guidance, plan.shift, plan.frames, plan.height, plan.width, plan.fps) == (
        2,
        0.0,
        3.0,
        3,
        8,
        12,
        8.0,
    )
    assert plan.sampler == "unipc"


@pytest.mark.parametrize(
    ("overrides", "latent", "asked", "message"),
    [
        (
            [],
            PIXELS,
            {"height": 17},
            "--height 17 does not fit this model: height must be one of 2, 4, 6, ... "
            "(VAE spatial stride 1 x model patch 2); nearest: 16 or 18",
        ),
        (
            [],
            WAN_VAE,
            {"frames": 6},
            "--frames 6 does not fit this model: frames must be one of 1, 5, 9, ... "
            "(VAE temporal stride 4: 1 + a multiple of 4 frames); nearest: 5 or 9",
        ),
        (
            [],
            WAN_VAE,
            {"frames": 17, "width": 40},
            "--width 40 does not fit this model: width must be one of 16, 32, 48, ... "
            "(VAE spatial stride 8 x model patch 2); nearest: 32 or 48",
        ),
        (
            ["model.patch_size=2,2,2", "model.out_channels=3"],
            WAN_VAE,
            {"frames": 9, "height": 32, "width": 32},
            "--frames 9 does not fit this model: frames must be one of 5, 13, 21, ... (VAE temporal stride 4: "
            "1 + a multiple of 4 frames, in groups of 2 latent frames (model patch 2)); nearest: 5 or 13",
        ),
        (
            ["sample.height=17"],
            PIXELS,
            {},
            "sample.height=17 (the checkpoint's default) does not fit this model: height must be one of 2, 4, 6, "
            "... (VAE spatial stride 1 x model patch 2); pass --height 16 or 18",
        ),
    ],
)
def test_a_video_size_the_codec_and_patch_cannot_take_is_refused(
    overrides: list[str], latent: LatentSpec, asked: dict[str, int], message: str
) -> None:
    cfg = resolve_config("wan_tiny_t2v", None, overrides)
    with pytest.raises(ValueError) as caught:
        sampling_plan(request(**asked), cfg, latent)
    assert str(caught.value) == message


def test_sizes_that_fit_pass() -> None:
    cfg = resolve_config("wan_tiny_t2v", None, [])
    plan = sampling_plan(request(frames=9, height=48, width=16), cfg, WAN_VAE)
    assert (plan.frames, plan.height, plan.width) == (9, 48, 16)


def test_shift_is_refused_on_an_edm_model() -> None:
    cfg = resolve_config("dit_tiny_edm", None, [])
    with pytest.raises(ValueError) as caught:
        sampling_plan(request(shift=3.0), cfg, PIXELS)
    assert str(caught.value) == (
        f"--shift applies to flow-matching models only (diffusion.kind=flow); {Path('runs/x')} holds an EDM model "
        "(diffusion.kind=edm), whose Karras noise schedule has no shift: drop --shift"
    )


@pytest.mark.parametrize(
    ("recipe", "sampler", "message"),
    [
        (
            "wan_tiny_t2v",
            "edm_heun",
            "--sampler edm_heun does not fit a flow-matching model (diffusion.kind=flow); use unipc or flow_euler",
        ),
        (
            "dit_tiny_edm",
            "unipc",
            "--sampler unipc does not fit an EDM model (diffusion.kind=edm); use edm_euler or edm_heun",
        ),
    ],
)
def test_a_sampler_of_the_other_process_is_refused(recipe: str, sampler: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        sampling_plan(request(sampler=sampler), resolve_config(recipe, None, []), PIXELS)
    assert str(caught.value) == message
