"""Speed of top-10 proponents and opponents on MNIST: tracin's stored train gradients against Captum's TracInCP.

Command, from the repository root, after ``python -m tracin.demo`` has written
``runs/mnist_demo/checkpoints``::

    python benchmarks/influence_speed.py              # 500 + 500 test images
    python benchmarks/influence_speed.py --n-test 10000

It uses the demo's SmallCNN and its 8 checkpoints against all 60,000 MNIST train
images, in one process:

1. ``trace_self_influence`` writes the run's store (the ``tracin score`` step
   that precedes every influence query); timed, but not part of a query.
2. First query: ``ensure_train_gradients`` computes the train gradients of
   every checkpoint and stores them in that file (float32), then
   ``top_k_influence`` finds the top-10 proponents and opponents of the first
   ``--n-test`` test images.
3. Second query: ``top_k_influence`` for ``--n-test`` other test images (the
   last ones of the test set), reusing the stored gradients.
4. Captum 0.9.0 ``TracInCP(sample_wise_grads_per_batch=True).influence(inputs,
   k=10)`` for the first query's test images, once with ``proponents=True``
   and once with ``proponents=False``. Captum recomputes the train gradients of
   every checkpoint in each call and keeps nothing between calls.

A plain batched forward and backward pass over the train images at every
checkpoint runs first and last, as a baseline for the machine's speed at the
time. Captum's per-batch gradients cover only Conv2d and Linear layers, so
tracin tracks the same parameters (3,818 of SmallCNN's 3,834; the BatchNorm
weight and bias are left out).

Agreement: for each test image, whether tracin and Captum return the same set
of 10 proponents (and opponents), and the same indices in the same order. Ties
and float32 rounding can swap neighbors, so the largest relative difference
between the scores at equal ranks is printed too.

With ``--threads 1`` on 2 CPU cores shared with other jobs, the default of 500
test images per query took 11 minutes, ``--n-test 2000`` took 14 minutes and
``--n-test 10000`` took 39 minutes. ``--n-test 10000`` runs the whole test set,
and its second query repeats the same images.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from tracin import trace_self_influence  # noqa: E402
from tracin.influence import InfluenceContext, ensure_train_gradients, top_k_influence  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-test", type=int, default=500,
                        help="test images per query, at most 10000 (default 500)")
    parser.add_argument("--n-train", type=int, default=60_000, help="use the first N train images (default 60000)")
    parser.add_argument("--checkpoints", type=int, help="use the first C checkpoints (default all)")
    parser.add_argument("--k", type=int, default=10, help="proponents and opponents per test image (default 10)")
    parser.add_argument("--batch-size", type=int, default=256, help="examples per batch for every method (default 256)")
    parser.add_argument("--skip-captum", action="store_true", help="time tracin only")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's own choice, one per core)")
    parser.add_argument("--json", type=Path, help="also write the timings and agreement to this JSON file")
    return parser.parse_args(argv)


def agreement(tracin_index: np.ndarray, captum_index: np.ndarray) -> dict[str, float]:
    """Return the fractions of test images whose top-K sets, and whose ordered top-K lists, are identical."""
    same_set = [set(a) == set(b) for a, b in zip(tracin_index.tolist(), captum_index.tolist())]
    same_order = (tracin_index == captum_index).all(axis=1)
    overlap = [len(set(a) & set(b)) / len(a) for a, b in zip(tracin_index.tolist(), captum_index.tolist())]
    return {
        "identical sets": float(np.mean(same_set)),
        "identical ranks": float(np.mean(same_order)),
        "mean overlap": float(np.mean(overlap)),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    workload = common.load_demo_workload()
    if args.checkpoints is not None:
        workload.checkpoints = workload.checkpoints[: args.checkpoints]
    train = common.first(workload.train, args.n_train)
    n_test_total = len(workload.test)
    if not 1 <= args.n_test <= n_test_total:
        raise SystemExit(f"--n-test {args.n_test} is invalid; pass 1 to {n_test_total}.")
    first_selection = np.arange(args.n_test)
    second_selection = np.arange(n_test_total - args.n_test, n_test_total)
    matched = common.captum_parameter_names(workload.model)

    machine = common.machine_description()
    print(json.dumps(machine))
    print(f"{workload.name}, {len(matched)} parameter tensors of Conv2d/Linear layers; {len(workload.checkpoints)} "
          f"checkpoints; {len(train)} train images; {args.n_test} test images per query; k={args.k}; "
          f"batch size {args.batch_size}", flush=True)

    timings = common.Timings()
    results = {}
    with tempfile.TemporaryDirectory(prefix="tracin-bench-") as directory:
        store = Path(directory) / "run.h5"
        timings.run("baseline", lambda: common.plain_backward_pass(workload, train, args.batch_size))
        timings.run("tracin score (self-influence, before any query)", lambda: trace_self_influence(
            workload.model, workload.checkpoints, train, store, params=matched, batch_size=args.batch_size,
            device="cpu", overwrite=True,
        ))
        context = InfluenceContext.build(workload.model, workload.checkpoints, params=matched, device="cpu",
                                         batch_size=args.batch_size)
        timings.run("first query: ensure_train_gradients", lambda: ensure_train_gradients(store, context, train))
        gradient_bytes = store.stat().st_size
        results["tracin first"] = timings.run("first query: top_k_influence", lambda: top_k_influence(
            store, context, workload.test, first_selection, k=args.k))
        results["tracin second"] = timings.run("second query: top_k_influence", lambda: top_k_influence(
            store, context, workload.test, second_selection, k=args.k))

        if not args.skip_captum:
            tracincp = common.captum_tracincp(workload, train, args.batch_size)
            test_loader = DataLoader(Subset(workload.test, first_selection.tolist()), batch_size=args.batch_size)
            results["captum proponents"] = timings.run("Captum influence(k, proponents=True)", lambda: tracincp.influence(
                test_loader, k=args.k, proponents=True))
            results["captum opponents"] = timings.run("Captum influence(k, proponents=False)", lambda: tracincp.influence(
                test_loader, k=args.k, proponents=False))
        timings.run("baseline", lambda: common.plain_backward_pass(workload, train, args.batch_size))

    seconds = {name: values[0] for name, values in timings.seconds.items() if name != "baseline"}
    baseline = statistics.mean(timings.seconds["baseline"])
    first_query = seconds["first query: ensure_train_gradients"] + seconds["first query: top_k_influence"]
    second_query = seconds["second query: top_k_influence"]
    rows = [
        ["baseline: forward + backward over the train images at every checkpoint", f"{baseline:.1f}", "1.00"],
        ["tracin score (self-influence; precedes every query)",
         f"{seconds['tracin score (self-influence, before any query)']:.1f}",
         f"{seconds['tracin score (self-influence, before any query)'] / baseline:.2f}"],
        ["tracin first query: train gradients stored", f"{seconds['first query: ensure_train_gradients']:.1f}",
         f"{seconds['first query: ensure_train_gradients'] / baseline:.2f}"],
        [f"tracin first query: top-{args.k} of {args.n_test} test images", f"{seconds['first query: top_k_influence']:.1f}",
         f"{seconds['first query: top_k_influence'] / baseline:.2f}"],
        ["tracin first query, total", f"{first_query:.1f}", f"{first_query / baseline:.2f}"],
        [f"tracin second query: top-{args.k} of {args.n_test} other test images", f"{second_query:.1f}",
         f"{second_query / baseline:.2f}"],
    ]
    summary = {"first_query_seconds": first_query, "second_query_seconds": second_query,
               "baseline_seconds": timings.seconds["baseline"], "gradient_store_bytes": gradient_bytes}
    if not args.skip_captum:
        captum_seconds = seconds["Captum influence(k, proponents=True)"] + seconds["Captum influence(k, proponents=False)"]
        rows += [
            [f"Captum proponents of {args.n_test} test images", f"{seconds['Captum influence(k, proponents=True)']:.1f}",
             f"{seconds['Captum influence(k, proponents=True)'] / baseline:.2f}"],
            [f"Captum opponents of {args.n_test} test images", f"{seconds['Captum influence(k, proponents=False)']:.1f}",
             f"{seconds['Captum influence(k, proponents=False)'] / baseline:.2f}"],
            ["Captum proponents and opponents, total", f"{captum_seconds:.1f}", f"{captum_seconds / baseline:.2f}"],
        ]
        summary["captum_seconds"] = captum_seconds
    print()
    common.print_table(["step", "seconds", "time / baseline"], rows)
    print(f"\nstore with train gradients: {gradient_bytes / 2**30:.2f} GiB")

    if not args.skip_captum:
        print(f"Captum / tracin first query: {captum_seconds / first_query:.2f}; "
              f"Captum / tracin second query: {captum_seconds / second_query:.2f}")
        tracin_first = results["tracin first"]
        comparisons = {}
        for kind, tracin_index, tracin_score, captum in (
            ("proponents", tracin_first.proponent_index, tracin_first.proponent_score, results["captum proponents"]),
            ("opponents", tracin_first.opponent_index, tracin_first.opponent_score, results["captum opponents"]),
        ):
            captum_index = captum.indices.numpy()
            captum_score = captum.influence_scores.double().numpy()
            comparison = agreement(tracin_index, captum_index)
            comparison["max relative score difference at equal rank"] = float(
                common.relative_error(tracin_score, captum_score).max())
            comparisons[kind] = comparison
            print(f"{kind}: " + ", ".join(f"{name} {value:.4g}" for name, value in comparison.items()))
        summary["agreement"] = comparisons

    wall = time.perf_counter() - started
    print(f"wall time {wall:.0f} s; load average at the end {common.machine_description()['load_average']}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "machine": machine, "args": {key: str(value) for key, value in vars(args).items()},
            "seconds": timings.seconds, "load": timings.load, "summary": summary, "wall_seconds": wall,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
