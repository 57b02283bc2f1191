"""Argparse pieces shared by the dfm CLIs (``python -m dfm.app.<name>``).

Each CLI builds its parser with :func:`make_parser`, adds :func:`add_config_arguments`, parses with
:func:`parse_args` (options and ``key=value`` overrides may be interleaved), resolves with
:func:`config_from_args`, and runs its ``main`` through :func:`run_main`, which turns user errors
into ``error: <message>`` on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from dfm.app.config import ConfigError, TrainConfig, config_to_yaml, resolve_config
from dfm.app.recipes import recipe_names, recipe_summary
from dfm.ports.checkpoint import CheckpointError
from dfm.ports.samples import BadSampleError

USER_ERROR_EXIT = 2
"""Exit status of a run stopped by a user error (argparse uses 2 as well)."""
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, CheckpointError, BadSampleError)
"""Exception types that are the user's to fix: reported as ``error: ...`` without a traceback."""


class UserError(Exception):
    """A problem the user can fix that is not about the config (e.g. a missing service or file)."""


def recipes_help() -> str:
    """The recipe list shown by ``--help`` and ``--list-recipes``: ``name  summary`` lines."""
    names = recipe_names()
    width = max(map(len, names), default=0)
    return "\n".join(f"  {name.ljust(width)}  {recipe_summary(name)}" for name in names)


def make_parser(prog: str, description: str, *, examples: str = "") -> argparse.ArgumentParser:
    """A parser whose epilog lists the recipes (and ``examples``), keeping newlines."""
    epilog = f"recipes:\n{recipes_help()}" + (f"\n\nexamples:\n{examples}" if examples else "")
    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--recipe``, ``--config``, ``--dry-run``, ``--list-recipes`` and positional ``key=value`` overrides."""
    parser.add_argument(
        "--recipe",
        metavar="NAME",
        default=None,
        help="named recipe to start from (default: 'default'); see the list below",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        default=None,
        help="YAML file with a partial config merged over the recipe",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides applied last, e.g. train.max_steps=100 optim.betas=0.9,0.95",
    )


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` allowing options and ``key=value`` overrides in any order."""
    return parser.parse_intermixed_args(None if argv is None else list(argv))


def config_from_args(args: argparse.Namespace, shortcuts: Sequence[str] = ()) -> TrainConfig:
    """Resolve the config from parsed arguments; ``shortcuts`` (e.g. ``runtime=fsdp2``) go before the overrides.

    Raises:
        ConfigError: Any problem with the recipe, the file or the overrides.
    """
    return resolve_config(args.recipe, args.config, [*shortcuts, *args.overrides])


def print_config(config: TrainConfig, file: TextIO | None = None) -> None:
    """Write the config as YAML (default: stdout)."""
    (file or sys.stdout).write(config_to_yaml(config))


def print_recipes(file: TextIO | None = None) -> None:
    """Write the recipe list (default: stdout)."""
    (file or sys.stdout).write(recipes_help() + "\n")


def report_user_error(exc: BaseException, file: TextIO | None = None) -> int:
    """Print ``error: <line>`` for each line of the message (default: stderr); return the exit status."""
    out = file or sys.stderr
    for line in str(exc).splitlines() or [type(exc).__name__]:
        out.write(f"error: {line}\n")
    return USER_ERROR_EXIT


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a CLI ``main``; user errors (:data:`USER_ERRORS`, :class:`UserError`) become exit status 2."""
    try:
        return main(argv)
    except (*USER_ERRORS, UserError) as exc:
        return report_user_error(exc)
