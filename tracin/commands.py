"""The work behind each CLI command: gather rows from the tracer or store, then render one table."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from rich.console import Console

from tracin import report
from tracin.cli import DTYPES, EXIT_ZERO_GRADIENTS, print_json
from tracin.errors import ConfigurationError
from tracin.rebuild import rebuild_run
from tracin.store import read_run
from tracin.tracer import trace_self_influence

logger = logging.getLogger(__name__)


def score(args: argparse.Namespace, make_progress: Callable) -> int:
    """Trace self-influence of a run and print its top outliers."""
    if not args.checkpoint_dir.is_dir():
        state = "does not exist" if not args.checkpoint_dir.exists() else "is not a directory"
        raise ConfigurationError(
            f"checkpoint directory {args.checkpoint_dir} {state}. Pass the dirpath of TracInCheckpoint from your run."
        )
    out = args.out or args.checkpoint_dir / "tracin.h5"
    run = rebuild_run(args.checkpoint_dir, args.config)
    train = run.dataset("train")
    lr = args.lr[0] if args.lr and len(args.lr) == 1 else args.lr
    with make_progress("tracing self-influence") as progress:
        task = progress.add_task("trace", total=None)
        summary = trace_self_influence(
            run.model,
            args.checkpoint_dir,
            train,
            out,
            params=args.params,
            lr=lr,
            batch_size=args.batch_size,
            dtype=DTYPES[args.dtype],
            device=args.device,
            overwrite=args.overwrite,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            run_info={"checkpoint_dir": str(args.checkpoint_dir.resolve()), "config": run.config_text},
        )
    logger.info("wrote %s", out)
    _render(summary.run, args, train)
    return EXIT_ZERO_GRADIENTS if summary.all_zero_gradients else 0


def show(args: argparse.Namespace) -> int:
    """Print the outlier table of a stored run."""
    stored = read_run(args.store)
    dataset = None
    if args.png is not None:
        run = rebuild_run(stored.attrs.get("checkpoint_dir", ""), config_text=stored.attrs.get("config") or None)
        dataset = run.dataset("train")
    _render(stored, args, dataset)
    return 0


def _render(stored, args: argparse.Namespace, dataset) -> None:
    rows, nonfinite = report.outlier_rows(stored, args.top)
    if args.json:
        print_json({"store": str(stored.path), **report.rows_as_json(rows, nonfinite)})
    else:
        report.print_table(report.outlier_table(rows, nonfinite, len(stored.train["index"])), Console())
    if args.png is not None:
        report.write_outlier_sheet(rows, dataset, args.png)
        logger.info("wrote %s", args.png)
