"""The work behind each CLI command: gather rows from the tracer or store, then render one table."""

from __future__ import annotations

import argparse
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

import numpy as np

from tracin import influence_report, report
from tracin.cli import DTYPES, EXIT_ZERO_GRADIENTS, print_json
from tracin.errors import ConfigurationError
from tracin.influence import InfluenceContext, ensure_train_gradients, importance as net_importance, top_k_influence
from tracin.losses import loss_name, resolve_loss
from tracin.rebuild import RebuiltRun, rebuild_run
from tracin.params import last_linear_parameters
from tracin.projection import ProjectionSpec
from tracin.selection import parse_selection
from tracin.checkpoints import discover_checkpoints
from tracin.passes import resolve_device
from tracin.store import StoredRun, append_result, check_output_path, read_run
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
    # Check the output before loading the model and data, which can take minutes.
    check_output_path(out, args.overwrite)
    launch = _launches_processes(args)
    lr = args.lr[0] if args.lr and len(args.lr) == 1 else args.lr
    # Find the checkpoints and check --lr and --device before loading the model and data, so an empty
    # directory is reported as empty rather than as missing a manifest, and a bad device fails at once.
    discover_checkpoints(args.checkpoint_dir, lr)
    if args.device is not None:
        resolve_device(args.device)
    run = rebuild_run(args.checkpoint_dir, args.config)
    train = run.dataset("train")
    if launch:
        return _score_with_fabric(args, run, train, out, lr, make_progress)
    with make_progress("tracing self-influence") as progress:
        task = progress.add_task("trace", total=None)
        summary = trace_self_influence(
            run.model,
            args.checkpoint_dir,
            train,
            out,
            params=_score_params(args, run.model),
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
    return _exit_status(summary)


def _exit_status(summary) -> int:
    """Return EXIT_ZERO_GRADIENTS when every score is zero (zero gradients or zero learning rates), else 0."""
    every_lr_zero = len(summary.zero_lr_checkpoints) == len(summary.run.checkpoints)
    return EXIT_ZERO_GRADIENTS if summary.all_zero_gradients or every_lr_zero else 0


def _launches_processes(args: argparse.Namespace) -> bool:
    """Return whether --accelerator, --devices or --num-nodes ask for Lightning Fabric instead of one process."""
    launch = args.accelerator is not None or args.devices.strip() != "1" or args.num_nodes != 1
    if launch and args.device is not None:
        raise ConfigurationError(
            f"--device {args.device} applies to one process only. Pass either --device, or --accelerator with "
            "--devices and --num-nodes."
        )
    if launch and not args.timeout > 0:
        raise ConfigurationError(f"--timeout {args.timeout:g} is invalid; pass a positive number of seconds.")
    return launch


def _score_with_fabric(args: argparse.Namespace, run: RebuiltRun, train, out, lr, make_progress: Callable) -> int:
    """Trace with one process per device through Lightning Fabric; only global rank 0 prints the results."""
    from tracin.distributed import parse_devices, trace_self_influence_distributed

    progress = _ProgressOnFirstUpdate(make_progress, "tracing self-influence")
    try:
        summary = trace_self_influence_distributed(
            run.model,
            args.checkpoint_dir,
            train,
            out,
            accelerator=args.accelerator or "auto",
            devices=parse_devices(args.devices),
            num_nodes=args.num_nodes,
            strategy=args.strategy,
            timeout_s=args.timeout,
            params=_score_params(args, run.model),
            lr=lr,
            batch_size=args.batch_size,
            dtype=DTYPES[args.dtype],
            overwrite=args.overwrite,
            progress=progress,
            run_info={"checkpoint_dir": str(args.checkpoint_dir.resolve()), "config": run.config_text},
        )
    finally:
        progress.close()
    if summary is None:
        return 0
    logger.info("wrote %s", out)
    _render(summary.run, args, train)
    return _exit_status(summary)


class _ProgressOnFirstUpdate:
    """A progress bar that opens on its first update, so that processes which never report show none."""

    def __init__(self, make_progress: Callable, description: str):
        self.make_progress = make_progress
        self.description = description
        self.progress = None
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if self.progress is None:
            self.progress = self.make_progress(self.description)
            self.progress.start()
            self.task = self.progress.add_task("trace", total=total)
        self.progress.update(self.task, completed=done, total=total)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _score_params(args: argparse.Namespace, model) -> list[str] | None:
    if args.last_layer and args.params:
        raise ConfigurationError("pass either --last-layer or --params, not both.")
    return last_linear_parameters(model) if args.last_layer else args.params


def show(args: argparse.Namespace) -> int:
    """Print the outlier table of a stored run."""
    stored = read_run(args.store)
    dataset = None
    if args.png is not None:
        dataset = _rebuild_from_store(args.store, stored).dataset("train")
    _render(stored, args, dataset)
    return 0


def _render(stored, args: argparse.Namespace, dataset) -> None:
    rows, nonfinite = report.outlier_rows(stored, args.top, args.rank_by)
    if args.json:
        print_json({"store": str(stored.path), **report.rows_as_json(rows, nonfinite)})
    else:
        report.print_table(report.outlier_table(rows, nonfinite, len(stored.train["index"]), args.rank_by), Console())
    if args.png is not None:
        report.write_outlier_sheet(rows, dataset, args.png)
        logger.info("wrote %s", args.png)


def _rebuild_stored(args: argparse.Namespace) -> tuple[StoredRun, RebuiltRun]:
    """Read a store and rebuild the run behind it."""
    stored = read_run(args.store)
    return stored, _rebuild_from_store(args.store, stored)


def _rebuild_from_store(path, stored: StoredRun) -> RebuiltRun:
    """Rebuild the model and data of a store from the checkpoint directory and config it records."""
    checkpoint_dir = stored.attrs.get("checkpoint_dir", "")
    if not checkpoint_dir:
        raise ConfigurationError(
            f"{path} records no checkpoint directory (the Python API wrote it without run_info), so the command "
            "line cannot rebuild its model and data. Use the Python API (tracin.influence), or trace with "
            "'tracin score CHECKPOINT_DIR'."
        )
    return rebuild_run(checkpoint_dir, config_text=stored.attrs.get("config") or None)


def _gradient_context(args: argparse.Namespace, stored: StoredRun, run: RebuiltRun,
                      make_progress: Callable) -> InfluenceContext:
    """Build the influence context of a stored run and make sure its train gradients are stored."""
    default_loss = loss_name(resolve_loss(None, run.model))
    if default_loss != stored.attrs["loss"]:
        raise ConfigurationError(
            f"{args.store} was traced with loss {stored.attrs['loss']!r}, but the command line can only rebuild "
            f"{default_loss!r}. Use the Python API (tracin.influence) with the same loss."
        )
    projection = ProjectionSpec(args.project_dim, args.project_seed) if args.project_dim else None
    context = InfluenceContext.from_store(stored, run.model, device=args.device, batch_size=args.batch_size,
                                          projection=projection)
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
    return context


def influence(args: argparse.Namespace, make_progress: Callable) -> int:
    """Print the top proponents and opponents of the selected test examples and store them."""
    stored, run = _rebuild_stored(args)
    test = run.dataset("test")
    # Parse the selection first, so a typo fails before the train gradients are computed.
    indices = parse_selection(args.test, len(test))
    n_train = len(stored.train["index"])
    if args.top > n_train:
        raise ConfigurationError(f"--top {args.top} is larger than the {n_train} train examples; pass --top {n_train} or less.")
    context = _gradient_context(args, stored, run, make_progress)
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
    stored, run = _rebuild_stored(args)
    context = _gradient_context(args, stored, run, make_progress)
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


def _default_verify_store(run_dir: Path) -> Path:
    """Return RUN_DIR/tracin.h5, or fail with a hint when the store lies next to RUN_DIR instead."""
    store = run_dir / "tracin.h5"
    beside = run_dir.parent / "tracin.h5"
    if not store.exists() and beside.is_file():
        raise ConfigurationError(
            f"store {store} not found, but {beside} exists (the demo writes its store there). "
            f"Pass it with --store {beside}."
        )
    return store


def verify(args: argparse.Namespace, make_progress: Callable) -> int:
    """Retrain a run without influence-picked train examples, print how the test loss changed, and store it."""
    # Imported here because they load the Lightning Trainer, which the other commands do not need.
    from tracin import verify_plot, verify_report
    from tracin.retrain import trainer_settings
    from tracin.verify import OUTLIER_WAYS, TEST_WAYS, check_removal_count, verify_outliers, verify_test_examples

    outliers = args.remove_outliers is not None
    if outliers and (args.test is not None or args.remove is not None):
        raise ConfigurationError(
            "--remove-outliers is a separate check from --test and --remove; pass either --remove-outliers K "
            "or --test SELECTION --remove K."
        )
    if not outliers and (args.test is None or args.remove is None):
        raise ConfigurationError(
            "tracin verify needs --test SELECTION together with --remove K, or --remove-outliers K."
        )
    if not args.run_dir.is_dir():
        raise ConfigurationError(
            f"run directory {args.run_dir} does not exist or is not a directory. Pass the dirpath of "
            "TracInCheckpoint from your run."
        )
    args.store = args.store or _default_verify_store(args.run_dir)
    settings = {"accelerator": args.accelerator} if args.accelerator else None
    # Each retraining builds a Trainer, and Lightning logs its devices and a tip at info level every time.
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    # Lightning 2.6 with torch 2.13 warns about its own use of torch's LeafSpec once per fit.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")

    if outliers:
        with make_progress("retraining") as progress:
            task = progress.add_task("retrain", total=None)
            result = verify_outliers(
                args.run_dir, args.store, args.remove_outliers, args.seeds, settings=settings,
                enable_progress_bar=False,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
        attrs = {"mode": "outliers", "k": result.k, "n_test": result.n_test, "ways": ",".join(OUTLIER_WAYS)}
        table, rows = verify_report.outlier_table(result), verify_report.outlier_json(result)
    else:
        stored = read_run(args.store)
        run = rebuild_run(args.run_dir, config_text=stored.attrs.get("config") or None)
        # Check the selection, K and the Trainer settings first, so a mistake fails before the
        # train gradients are computed.
        indices = parse_selection(args.test, len(run.dataset("test")))
        check_removal_count(args.remove, len(stored.train["index"]))
        trainer_settings(run.manifest, args.run_dir, settings)
        context = _gradient_context(args, stored, run, make_progress)
        with make_progress("retraining") as progress:
            task = progress.add_task("retrain", total=None)
            result = verify_test_examples(
                args.run_dir, args.store, indices, args.remove, args.seeds, context=context,
                normalize=args.normalize, settings=settings, enable_progress_bar=False,
                progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
        attrs = {"mode": "test_examples", "selection": args.test, "k": result.k, "normalize": args.normalize,
                 "ways": ",".join(TEST_WAYS)}
        table, rows = verify_report.test_example_table(result), verify_report.test_example_json(result)

    name = append_result(args.store, "verify", result.arrays(), attrs)
    logger.info("stored as %s in %s", name, args.store)
    if args.json:
        print_json({"store": str(args.store), "result": name, **rows})
    else:
        Console().print(table)
    if args.png is not None:
        if outliers:
            verify_plot.write_outlier_figure(result, args.png)
        else:
            verify_plot.write_test_example_figure(result, run.dataset("test"), args.png)
        logger.info("wrote %s", args.png)
    return 0
