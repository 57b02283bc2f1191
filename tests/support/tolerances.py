"""Comparing weights that two runs trained with AdamW through different CPU kernels, on any x86-64 CPU.

Two runs that differ only in their kernels (AVX-512, AVX2 or scalar code; a parallel layout against one
process, with its other reduction order) compute the same gradients up to float32 rounding, some 4e-8 of
a tensor's largest gradient. Losses and gradient norms keep that accuracy through a few steps. Weights
after AdamW steps do not, element by element: AdamW moves an element by ``lr * m_hat / (sqrt(v_hat) + eps)``,
a quotient of about 1 whatever the gradient's size, so where a gradient is within rounding of zero another
kernel's rounding changes that element's step by up to ``lr`` itself, and, through that weight, the next
step's gradients of the weights it feeds. A per-element tolerance after AdamW steps therefore holds only on
the CPU it was tuned on (issue 11: 1.77e-5 against an atol of 1e-5 on an AVX2 machine, for a tolerance
that passed on AVX-512).

:func:`assert_adam_trained_alike` compares what does hold on any kernel instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

UPDATE_RTOL = 1e-2
"""Bound on ``||(got - start) - (want - start)|| / ||want - start||`` over all elements together.

Measured (the megatron and fsdp2 tests against the local runtime, 1-4 steps): at most 7e-6 with the native
AVX-512, the AVX2 (``make test-avx2``) and the scalar (``make test-scalar``) kernels, and up to 6e-3 with
noise of 1e-5 of each tensor's largest gradient added to every gradient (250x the 4e-8 the kernels differ by).
Rounding changes a step by at most ``2 lr error / eps``; one element whose whole step flipped sign would cost
7e-3 there. A missed or an extra step is off by 0.57-0.66, the initial weights by 1.
"""


def _flat(tensors: Mapping[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
    return torch.cat([tensors[k].detach().double().flatten().cpu() for k in keys])


def assert_adam_trained_alike(
    got: Mapping[str, torch.Tensor],
    want: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    *,
    rtol: float = UPDATE_RTOL,
) -> None:
    """Assert that ``got`` and ``want``, trained with AdamW from the same ``start`` on the same batches by
    different kernels or parallel layouts, agree as far as float32 rounding lets them on any CPU.

    Two checks, in float64, neither of which Adam's normalisation of near-zero gradients can break:

    - each element: ``|got - want| <= 2 max |want - start|``: AdamW moves no element much further than
      its largest step anywhere (about ``lr`` per step), so both runs together stay within twice that;
      a weight other than the trained one (another tensor's shard, the initial weights) fails;
    - the whole update: ``||(got - start) - (want - start)|| <= rtol ||want - start||`` over all elements
      together: the few elements where rounding flips a step weigh little in it (see :data:`UPDATE_RTOL`),
      while a missed, extra or wrong step changes every element.

    Args:
        got: Weights (or EMA weights) of the run under test, by name.
        want: The reference's weights, by name (the same keys).
        start: The weights both runs started from (the same keys).
        rtol: Bound on the relative difference of the whole updates.
    """
    assert got.keys() == want.keys() == start.keys(), (sorted(got), sorted(want), sorted(start))
    keys = sorted(want)
    g, w, s = _flat(got, keys), _flat(want, keys), _flat(start, keys)
    update = w - s
    step = float(update.abs().max())
    worst = float((g - w).abs().max())
    assert worst <= 2 * step + 1e-6, f"an element differs by {worst:.3g}, over twice AdamW's largest step {step:.3g}"
    error = float((g - w).norm() / update.norm().clamp_min(1e-30))
    if error > rtol:
        off = sorted(keys, key=lambda k: -float((got[k].double() - want[k].double()).norm()))[:3]
        raise AssertionError(f"the updates differ by {error:.3g} of their norm (bound {rtol:g}); most in {off}")
