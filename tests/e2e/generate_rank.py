"""One torchrun rank of ``test_generate_parallel.py`` (not a test module): ``python -m dfm.app.generate`` as is,
with the latents it samples recorded.

``python generate_rank.py LATENTS_DIR ARGS...``: runs the ``dfm.app.generate`` module as ``__main__`` (what
``python -m`` does) with ``ARGS``, where this rank's ``--out`` is moved into ``rank<RANK>/`` beside it, so the
test sees which ranks wrote files. The sampled latents go to ``LATENTS_DIR/rank<RANK>.safetensors``.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import dfm.app.services.generation as generation


def main() -> int:
    latents_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ.get("RANK", "0"))
    out = Path(argv[argv.index("--out") + 1])
    argv[argv.index("--out") + 1] = str(out.parent / f"rank{rank}" / out.name)
    recorded: list[torch.Tensor] = []
    sample_latents = generation.sample_latents

    def recording(*args: object, **kwargs: object) -> torch.Tensor:
        latents = sample_latents(*args, **kwargs)
        recorded.append(latents.detach().cpu().clone())
        return latents

    generation.sample_latents = recording
    sys.argv = ["dfm.app.generate", *argv]
    try:
        runpy.run_module("dfm.app.generate", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    save_file({f"video{i}": t.contiguous() for i, t in enumerate(recorded)}, latents_dir / f"rank{rank}.safetensors")
    return code


if __name__ == "__main__":
    sys.exit(main())
