"""The work behind each CLI command: gather rows from the tracer or store, then render one table."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from rich.console import Console

import numpy as np

from tracin import influence_report, report
from tracin.cli import DTYPES, EXIT_ZERO_GRADIENTS, print_json
from tracin.errors import ConfigurationError
from tracin.influence import InfluenceContext, ensure_train_gradients, importance as net_importance, top_k_influence
from tracin.losses import loss_name, resolve_loss
from tracin.rebuild import RebuiltRun, rebuild_run
from tracin.selection import parse_selection
from tracin.store import StoredRun, append_result, read_run
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


def _stored_context(args: argparse.Namespace, make_progress: Callable) -> tuple[StoredRun, RebuiltRun, InfluenceContext]:
    """Rebuild the run behind a store and make sure its train gradients are stored."""
    stored = read_run(args.store)
    run = rebuild_run(stored.attrs.get("checkpoint_dir", ""), config_text=stored.attrs.get("config") or None)
    default_loss = loss_name(resolve_loss(None, run.model))
    if default_loss != stored.attrs["loss"]:
        raise ConfigurationError(
            f"{args.store} was traced with loss {stored.attrs['loss']!r}, but the command line can only rebuild "
            f"{default_loss!r}. Use the Python API (tracin.influence) with the same loss."
        )
    context = InfluenceContext.from_store(stored, run.model, device=args.device, batch_size=args.batch_size)
    with make_progress("train gradients") as progress:
        task = progress.add_task("gradients", total=None)
        ensure_train_gradients(
            args.store,
            context,
            run.dataset("train"),
            storage_dtype=args.storage_dtype,
            max_bytes=int(args.max_gradient_gib * 2**30),
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    return stored, run, context


def influence(args: argparse.Namespace, make_progress: Callable) -> int:
    """Print the top proponents and opponents of the selected test examples and store them."""
    stored, run, context = _stored_context(args, make_progress)
    test = run.dataset("test")
    indices = parse_selection(args.test, len(test))
    top = top_k_influence(args.store, context, test, indices, k=args.top, normalize=args.normalize)
    name = append_result(
        args.store,
        "influence",
        {
            "test_index": top.test_index,
            "test_label": top.test_label,
            "test_prediction": top.test_prediction,
            "proponent_index": top.proponent_index,
            "proponent_score": top.proponent_score,
            "opponent_index": top.opponent_index,
            "opponent_score": top.opponent_score,
        },
        {"selection": args.test, "k": args.top, "normalize": args.normalize},
    )
    logger.info("stored as %s in %s", name, args.store)
    labels = stored.train["label"]
    if args.json:
        print_json({"store": str(args.store), "result": name, **influence_report.influence_json(top, labels)})
    else:
        console = Console()
        for table in influence_report.influence_tables(top, labels):
            console.print(table)
    if args.png is not None:
        influence_report.write_influence_panel(top, test, run.dataset("train"), labels, args.png)
        logger.info("wrote %s", args.png)
    return 0


def importance(args: argparse.Namespace, make_progress: Callable) -> int:
    """Print the train examples that helped and harmed a split the most, and store every score."""
    stored, run, context = _stored_context(args, make_progress)
    scores = net_importance(args.store, context, run.dataset(args.against), normalize=args.normalize)
    name = append_result(args.store, "importance", {"score": scores},
                         {"against": args.against, "normalize": args.normalize})
    logger.info("stored as %s in %s", name, args.store)
    labels = stored.train["label"]
    helpful, harmful = influence_report.importance_order(scores, args.top)
    if args.json:
        def entries(rows: np.ndarray) -> list[dict]:
            return [{"index": int(i), "label": int(labels[i]), "net_influence": float(scores[i])} for i in rows]

        print_json({"store": str(args.store), "result": name, "against": args.against,
                    "sign": influence_report.SIGN_NOTE, "helpful": entries(helpful), "harmful": entries(harmful)})
    else:
        console = Console()
        for table in influence_report.importance_tables(scores, labels, args.top, args.against):
            console.print(table)
    if args.png is not None:
        influence_report.write_importance_sheet(scores, run.dataset("train"), labels, args.top, args.png)
        logger.info("wrote %s", args.png)
    return 0
