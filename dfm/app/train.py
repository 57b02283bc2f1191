"""``python -m dfm.app.train``: train a model from a recipe, a YAML file and ``key=value`` overrides.

Run with one process, or under ``torchrun --nproc-per-node N -m dfm.app.train --runtime fsdp2 ...``.
``--dry-run`` prints the resolved config (the one the run directory will store) and exits.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from dfm.app.cli import (
    UserError,
    add_config_arguments,
    config_from_args,
    make_parser,
    parse_args,
    print_config,
    print_recipes,
    run_main,
)
from dfm.app.config import TrainConfig
from dfm.app.logging import configure_logging

EXAMPLES = """\
  python -m dfm.app.train --dry-run
  python -m dfm.app.train --recipe wan_tiny_t2v train.max_steps=2 run.dir=runs/smoke
  torchrun --nproc-per-node 8 -m dfm.app.train --runtime fsdp2 --recipe wan_1_3b_t2v_finetune \\
      --config my_data.yaml data.path=/data/shards"""

SERVICE_MISSING = "the training service is not available yet (python -m dfm.app.train --dry-run works)"


def build_parser() -> argparse.ArgumentParser:
    """The ``dfm.app.train`` argument parser."""
    parser = make_parser("python -m dfm.app.train", "Train a dfm model.", examples=EXAMPLES)
    parser.add_argument(
        "--runtime",
        choices=("local", "fsdp2", "megatron"),
        default=None,
        help="parallel runtime (shortcut for runtime=...)",
    )
    parser.add_argument(
        "--resume",
        metavar="auto|never|PATH",
        default=None,
        help="resume policy or checkpoint directory (shortcut for checkpoint.resume=...)",
    )
    add_config_arguments(parser)
    return parser


def _shortcuts(args: argparse.Namespace) -> list[str]:
    out = []
    if args.runtime is not None:
        out.append(f"runtime={args.runtime}")
    if args.resume is not None:
        out.append(f"checkpoint.resume={args.resume}")
    return out


def _training_service() -> Callable[[TrainConfig], object]:
    """``dfm.app.services.training.train``; a :class:`UserError` while that module does not exist."""
    try:
        from dfm.app.services.training import train  # type: ignore[import-not-found]
    except ModuleNotFoundError as exc:
        if exc.name in ("dfm.app.services", "dfm.app.services.training"):
            raise UserError(SERVICE_MISSING) from None
        raise
    return train


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error)."""
    args = parse_args(build_parser(), argv)
    if args.list_recipes:
        print_recipes()
        return 0
    config = config_from_args(args, _shortcuts(args))
    if args.dry_run:
        if _rank() == 0:
            print_config(config)
        return 0
    log = config.logging
    configure_logging(rank=_rank(), level=log.level, fmt=log.format, all_ranks=log.all_ranks)
    _training_service()(config)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
