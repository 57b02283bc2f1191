"""``python -m dfm.app.train``: train a model from a recipe, a YAML file and ``key=value`` overrides.

Run with one process, or under ``torchrun --nproc-per-node N -m dfm.app.train --runtime fsdp2 ...``.
``--dry-run`` prints the resolved config (the one the run directory will store) and exits.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from dfm.app.cli import (
    add_config_arguments,
    config_from_args,
    make_parser,
    parse_args,
    print_config,
    print_recipes,
    report_user_error,
    run_main,
)
from dfm.app.logging import configure_logging

EXAMPLES = """\
  python -m dfm.app.train --dry-run
  python -m dfm.app.train --recipe wan_tiny_t2v train.max_steps=2 run.dir=runs/smoke
  torchrun --nproc-per-node 8 -m dfm.app.train --runtime fsdp2 --recipe wan_1_3b_t2v_finetune \\
      --config my_data.yaml data.path=/data/shards"""

SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}
"""Exit status after a signal stopped training (a checkpoint was written first): 128 + the signal number."""


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
        help="resume policy, or a checkpoint directory or a run directory (its newest intact checkpoint); "
        "shortcut for checkpoint.resume=...",
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
    from dfm.app.services.run_dir import RunDirError
    from dfm.app.services.training import TrainingError, train

    try:
        result = train(config)
    except RunDirError as exc:  # run.dir unusable, in use by another run, or its disk full
        return report_user_error(exc)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except torch.OutOfMemoryError as exc:
        print(
            f"error: out of accelerator memory ({str(exc).splitlines()[0]}); lower train.micro_batch_size, "
            "set train.activation_checkpointing=selective or full, or use a parallel runtime",
            file=sys.stderr,
        )
        return 1
    finally:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # under torchrun: shut the process group down here, not in interpreter teardown, where destroying gloo's
            # objects while their threads run can abort a rank that finished ("terminate called without an active
            # exception", pytorch/pytorch#179291; seen in test_energon_data_parallel_resume.py)
            from dfm.app.bootstrap import destroy_process_group

            destroy_process_group()
    return SIGNAL_EXIT.get(result.stopped_by or "", 0)


if __name__ == "__main__":
    sys.exit(run_main(main))
