"""The ``tracin`` command line: ``tracin score`` traces a run, ``tracin show`` prints a stored one.

Tables go to stdout, logs, progress and errors to stderr. User errors exit with
status 2 and no traceback; a trace whose gradients are all zero exits with 3.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tracin.errors import TracInError

logger = logging.getLogger("tracin")

EXIT_USAGE = 2
EXIT_ZERO_GRADIENTS = 3
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _stderr() -> Console:
    return Console(stderr=True)


def abort(message: str, code: int = EXIT_USAGE) -> None:
    """Print an error to stderr, with markup off so user strings print as given, and exit."""
    _stderr().print(f"error: {message}", markup=False, highlight=False, style="red")
    raise SystemExit(code)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid; pass a positive integer")
    return value


def _learning_rates(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid learning rate list {text!r}; pass 0.01 or 0.1,0.05,0.01") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracin", description="TracInCP influence of training examples.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser(
        "score",
        help="rank train examples by self-influence",
        description="Trace self-influence over a run's checkpoints, store it in HDF5 and print the top outliers.",
    )
    score.add_argument("checkpoint_dir", type=Path, help="directory with the run's checkpoints")
    score.add_argument("--config", type=Path, help="LightningCLI YAML of the run; default: the manifest")
    score.add_argument("--out", type=Path, help="HDF5 store to write; default CHECKPOINT_DIR/tracin.h5")
    score.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    score.add_argument("--params", action="append", metavar="GLOB",
                       help="track only parameters matching this name or glob; repeatable")
    score.add_argument("--lr", type=_learning_rates,
                       help="learning rate to use instead of the recorded ones (required when a checkpoint records none): "
                            "one value, or one per checkpoint in training order, comma-separated")
    score.add_argument("--batch-size", type=_positive_int, default=64, help="examples per batch (default 64)")
    score.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default float32)")
    score.add_argument("--device", help="torch device, e.g. cpu or cuda:0; default cuda when available")
    _add_output_options(score)

    show = commands.add_parser("show", help="print the tables of a stored run again without recomputing")
    show.add_argument("store", type=Path, help="HDF5 store written by 'tracin score'")
    _add_output_options(show)
    return parser


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--top", type=_positive_int, default=20, help="rows in the table (default 20)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on stdout instead of a table")
    parser.add_argument("--png", type=Path, help="also write a contact sheet of the top images to this PNG file")


def _configure_logging(verbose: bool) -> None:
    handler = RichHandler(console=_stderr(), show_path=False, markup=False)
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.handlers[:] = [handler]
    warnings_logger.propagate = False
    logging.captureWarnings(True)
    warnings.simplefilter("default")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    from tracin import commands

    try:
        if args.command == "score":
            return commands.score(args, make_progress)
        if args.command == "show":
            return commands.show(args)
    except TracInError as error:
        abort(str(error))
    except KeyboardInterrupt:
        abort("interrupted; rerun the same command to resume from the blocks already stored.", 130)
    return 0


def make_progress(description: str) -> Progress:
    """Return a rich progress bar on stderr."""
    return Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=_stderr(),
        transient=False,
    )


def print_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
