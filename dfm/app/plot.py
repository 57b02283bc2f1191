"""``python -m dfm.app.plot RUN_DIR``: the run's training curves (loss, gradient norm, learning rate, throughput).

Reads ``RUN_DIR/metrics.jsonl`` and writes ``RUN_DIR/curves.png`` (or ``--out PNG``), then prints its path. Works
on a run in progress (it reads what has been logged so far). Needs matplotlib (the ``plot`` extra, which ``make
demo`` and ``make test`` install).

    python -m dfm.app.plot runs/demo
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dfm.app.cli import UserError, run_main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error)."""
    parser = argparse.ArgumentParser(prog="python -m dfm.app.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (holding metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="the PNG to write (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    from dfm.app.bootstrap import read_metrics, save_curves_png

    metrics = args.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{metrics} does not exist: give a run directory that has logged at least one step")
    try:
        out = save_curves_png(read_metrics(metrics), args.out or args.run_dir / "curves.png", title=str(args.run_dir))
    except ModuleNotFoundError as exc:
        raise UserError(
            f"plotting needs matplotlib ({exc}); install the plot extra: pip install -e '.[plot]'"
        ) from None
    except ValueError as exc:
        raise UserError(f"{metrics}: {exc}") from None
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
