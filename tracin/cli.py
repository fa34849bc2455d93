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

from tracin.errors import ConfigurationError, TracInError

logger = logging.getLogger("tracin")

EXIT_USAGE = 2
EXIT_ZERO_GRADIENTS = 3
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _stderr() -> Console:
    return Console(stderr=True)


def abort(message: str, code: int = EXIT_USAGE) -> None:
    """Print an error to stderr, with markup off so user strings print as given, and exit."""
    _stderr().print(f"error: {message}", markup=False, highlight=False, style="red", soft_wrap=True)
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
    score.add_argument("--last-layer", action="store_true",
                       help="track only the last nn.Linear layer (weight and bias); cheap and often enough for outliers")
    score.add_argument("--lr", type=_learning_rates,
                       help="learning rate to use instead of the recorded ones (required when a checkpoint records none): "
                            "one value, or one per checkpoint in training order, comma-separated")
    score.add_argument("--batch-size", type=_positive_int, default=64, help="examples per batch (default 64)")
    score.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype (default float32)")
    score.add_argument("--device", help="torch device, e.g. cpu or cuda:0; default cuda when available")
    _add_launch_options(score)
    _add_output_options(score, rank_by=True)

    influence = commands.add_parser(
        "influence",
        help="top proponents and opponents of test examples",
        description="For each selected test example, find the train examples with the largest positive influence "
        "(proponents: a gradient step on them lowered the test loss) and the most negative (opponents).",
    )
    influence.add_argument("store", type=Path, help="HDF5 store written by 'tracin score'")
    influence.add_argument("--test", required=True, metavar="SELECTION",
                           help="test split indices: 7, 0:100 (half-open range), 3,10:20 or all")
    _add_gradient_options(influence)
    _add_output_options(influence, default_top=10)

    importance = commands.add_parser(
        "importance",
        help="net influence of each train example on a whole split",
        description="Sum each train example's influence over a split: positive means it helped that split's loss go down.",
    )
    importance.add_argument("store", type=Path, help="HDF5 store written by 'tracin score'")
    importance.add_argument("--against", default="test", choices=["train", "test"], help="split to sum over (default test)")
    _add_gradient_options(importance)
    _add_output_options(importance, default_top=10)

    show = commands.add_parser("show", help="print the tables of a stored run again without recomputing")
    show.add_argument("store", type=Path, help="HDF5 store written by 'tracin score'")
    _add_output_options(show, rank_by=True)

    verify = commands.add_parser(
        "verify",
        help="check influence by retraining without the top proponents or outliers",
        description="Retrain the run from scratch without influence-picked train examples, without as many "
        "random ones, and without none, with the same seeds, and compare the test losses. Either --test with "
        "--remove, or --remove-outliers.",
    )
    verify.add_argument("run_dir", type=Path, help="the run's checkpoint directory, written by TracInCheckpoint")
    verify.add_argument("--test", metavar="SELECTION",
                        help="test split indices whose top-K proponents to remove: 7, 0:10 (half-open range) or 3,5")
    verify.add_argument("--remove", type=_positive_int, metavar="K",
                        help="number of proponents (and of random train examples) to remove per test example")
    verify.add_argument("--remove-outliers", type=_positive_int, metavar="K",
                        help="remove the K train examples with the largest self-influence and report the whole "
                             "test split's accuracy and loss")
    verify.add_argument("--seeds", type=_positive_int, default=3,
                        help="number of seeds, 0 to R-1, each shared by the three retrainings (default 3)")
    verify.add_argument("--store", type=Path, help="HDF5 store written by 'tracin score'; default RUN_DIR/tracin.h5")
    verify.add_argument("--accelerator",
                        help="retrain on this accelerator (cpu, gpu, cuda, mps) instead of the one the run used")
    _add_gradient_options(verify)
    verify.add_argument("--json", action="store_true", help="print the results as JSON on stdout instead of a table")
    verify.add_argument("--png", type=Path,
                        help="also write a figure of the changes, one dot per seed, to this PNG file")
    return parser


def _add_gradient_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--normalize", action="store_true",
                        help="cosine scores: divide each gradient by its norm at each checkpoint")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="examples per batch (default 64)")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda:0; default cuda when available")
    parser.add_argument("--storage-dtype", choices=["float16", "float32", "float64"], default="float32",
                        help="dtype of the stored train gradients (default float32)")
    parser.add_argument("--project-dim", type=_positive_int, metavar="K",
                        help="store train gradients projected to K dimensions per parameter (Kronecker-structured "
                        "for Linear and Conv weights); default full dimension while under --max-gradient-gib")
    parser.add_argument("--project-seed", type=int, default=0, help="seed of the projection matrices (default 0)")
    parser.add_argument("--max-gradient-gib", type=float, default=16.0,
                        help="largest size of stored train gradients over all checkpoints, in GiB (default 16)")


def _add_launch_options(parser: argparse.ArgumentParser) -> None:
    """Add Lightning Fabric's options for tracing with several processes; see docs/usage.md."""
    parser.add_argument("--accelerator", choices=["cpu", "gpu", "auto"],
                        help="accelerator of every process, as in Lightning; use it instead of --device")
    parser.add_argument("--devices", default="1", metavar="N",
                        help="processes per node, or which devices (2, 0,1 or auto), as in Lightning (default 1)")
    parser.add_argument("--num-nodes", type=_positive_int, default=1, metavar="M",
                        help="number of nodes; run the same command on each with MASTER_ADDR, MASTER_PORT and "
                             "NODE_RANK set (default 1)")
    parser.add_argument("--strategy", choices=["ddp"], default="ddp",
                        help="how processes start and connect; ddp runs this command again for each extra device "
                             "(default ddp)")
    parser.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS",
                        help="seconds a process waits for the others to finish their shards before it fails "
                             "(default 1800)")


def _add_output_options(parser: argparse.ArgumentParser, default_top: int = 20, rank_by: bool = False) -> None:
    parser.add_argument("--top", type=_positive_int, default=default_top,
                        help=f"rows in each table (default {default_top})")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on stdout instead of a table")
    parser.add_argument("--png", type=Path, help="also write a contact sheet of the top images to this PNG file")
    if rank_by:
        parser.add_argument("--rank-by", choices=["self-influence", "loss", "margin"], default="self-influence",
                            help="order of the outlier table (default self-influence); on MNIST, loss and margin "
                            "found flipped labels best and self-influence unusual images")


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
    # Show warnings as "Category: message"; the file and line of the call are noise for CLI users.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"{category.__name__}: {message}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    from tracin import commands

    try:
        _check_png_directory(args)
        if args.command == "score":
            return commands.score(args, make_progress)
        if args.command == "show":
            return commands.show(args)
        if args.command == "influence":
            return commands.influence(args, make_progress)
        if args.command == "importance":
            return commands.importance(args, make_progress)
        if args.command == "verify":
            return commands.verify(args, make_progress)
    except TracInError as error:
        abort(str(error))
    except KeyboardInterrupt:
        abort("interrupted; rerun the same command to resume. Finished blocks and retrainings are kept.", 130)
    return 0


def _check_png_directory(args: argparse.Namespace) -> None:
    """Reject a --png file in a missing directory before any work is done."""
    png = getattr(args, "png", None)
    if png is not None and not png.parent.is_dir():
        raise ConfigurationError(f"directory {png.parent} of --png {png} does not exist. Create it first.")


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
