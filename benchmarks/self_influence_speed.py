"""Speed of exact self-influence: tracin against a plain backward pass and against Captum's TracInCP.

Commands, from the repository root, after ``python -m tracin.demo`` has written
``runs/mnist_demo/checkpoints``::

    python benchmarks/self_influence_speed.py
    python benchmarks/self_influence_speed.py --model mlp-wide --subset 5000

The first command uses the demo's SmallCNN (3,834 parameters) and its 8
checkpoints on all 60,000 MNIST train images. The second trains an MLP
784-1024-256-10 (1,068,810 parameters) for one epoch with ``TracInCheckpoint``
(2 checkpoints, in ``runs/mlp_wide/checkpoints``) unless it was trained before.

Every method gets the same train images, batch size and checkpoints in the same
process:

* baseline: one batched forward and backward of the summed cross-entropy per
  batch, the cost of a training epoch without the optimizer;
* tracin ``method="auto"``: closed-form per-layer squared gradient norms;
* tracin ``method="vmap"``: ``torch.func.vmap`` per-example gradients;
* Captum 0.9.0 ``TracInCP(sample_wise_grads_per_batch=True).self_influence``,
  with the checkpoint loop outermost (``outer_loop_by_checkpoints=True``).

Captum's per-batch gradients cover only Conv2d and Linear layers, so tracin
tracks the same parameters for the comparison. For SmallCNN, which also has a
BatchNorm layer, one more row gives tracin ``auto`` on all parameters.

A baseline runs first and after every method, and each method's time is
divided by the mean of the baselines just before and after it. Times are per
example, so a method run on fewer examples (``--subset``) is compared per
example. The script prints each time, the median ratios and the relative
differences between tracin and Captum scores. Timing on a shared machine is noisy; the 1-minute load average
is printed with every run.

Options: ``--n-train N`` (default 60000) traces the first N train images,
``--checkpoints C`` (default all) the first C checkpoints, ``--repeats R``
(default 1), ``--batch-size B`` (default 256).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from tracin import trace_self_influence  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smallcnn", "mlp-wide"), default="smallcnn",
                        help="smallcnn: the demo's checkpoints; mlp-wide: a 1M-parameter MLP trained for 1 epoch")
    parser.add_argument("--n-train", type=int, default=60_000, help="trace the first N train images (default 60000)")
    parser.add_argument("--subset", type=int,
                        help="run tracin vmap and Captum, which form every per-example gradient, on the first N "
                             "train images only (default: --n-train)")
    parser.add_argument("--checkpoints", type=int, help="use the first C checkpoints (default all)")
    parser.add_argument("--batch-size", type=int, default=256, help="examples per batch for every method (default 256)")
    parser.add_argument("--repeats", type=int, default=1, help="times each method runs (default 1)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's own choice, one per core)")
    parser.add_argument("--json", type=Path, help="also write the timings and errors to this JSON file")
    parser.add_argument("--skip-vmap", action="store_true",
                        help="leave out tracin vmap, for more repeats of tracin auto and Captum in the same time")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    workload = common.load_demo_workload() if args.model == "smallcnn" else common.load_wide_mlp_workload()
    if args.checkpoints is not None:
        workload.checkpoints = workload.checkpoints[: args.checkpoints]
    train = common.first(workload.train, args.n_train)
    subset = common.first(workload.train, min(args.subset or args.n_train, args.n_train))
    n_train, n_subset = len(train), len(subset)
    matched = common.captum_parameter_names(workload.model)
    all_names = [name for name, parameter in workload.model.named_parameters() if parameter.requires_grad]
    n_matched = sum(p.numel() for name, p in workload.model.named_parameters() if name in matched)
    n_all = sum(p.numel() for name, p in workload.model.named_parameters() if name in all_names)

    machine = common.machine_description()
    print(json.dumps(machine))
    print(f"{workload.name}: {n_all} parameters, {n_matched} in Conv2d/Linear layers; "
          f"{len(workload.checkpoints)} checkpoints; {n_train} train images "
          f"(tracin vmap and Captum: {n_subset}); batch size {args.batch_size}", flush=True)

    timings = common.Timings()
    scores: dict[str, np.ndarray] = {}
    methods: list[tuple[str, int, object]] = []
    with tempfile.TemporaryDirectory(prefix="tracin-bench-") as directory:

        def tracin(method: str, params: list[str], images):
            def run():
                summary = trace_self_influence(
                    workload.model, workload.checkpoints, images, Path(directory) / f"{method}.h5",
                    params=params, batch_size=args.batch_size, device="cpu", overwrite=True, method=method,
                )
                return summary.run.train["self_influence"]
            return run

        def captum():
            return common.captum_tracincp(workload, subset, args.batch_size).self_influence(
                outer_loop_by_checkpoints=True
            ).detach().double().numpy()

        methods = [
            ("tracin auto", n_train, tracin("auto", matched, train)),
            ("tracin vmap", n_subset, tracin("vmap", matched, subset)),
            ("Captum TracInCP", n_subset, captum),
        ]
        if args.skip_vmap:
            methods = [method for method in methods if method[0] != "tracin vmap"]
        if set(all_names) != set(matched):
            methods.append(("tracin auto, all parameters", n_train, tracin("auto", all_names, train)))

        # Each method runs between two baselines, and its time is compared with their mean, so a
        # change in the machine's load during the run moves both sides of the ratio.
        timings.run("baseline", lambda: common.plain_backward_pass(workload, train, args.batch_size))
        baseline_before = timings.seconds["baseline"][-1]
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1} of {args.repeats}", flush=True)
            for name, count, function in methods:
                started_method = time.perf_counter()
                scores[name] = function()
                seconds = time.perf_counter() - started_method
                timings.seconds.setdefault(name, []).append(seconds)
                print(f"  {name}: {seconds:.1f} s (1-minute load average {os.getloadavg()[0]:.1f})", flush=True)
                timings.run("baseline", lambda: common.plain_backward_pass(workload, train, args.batch_size))
                baseline_after = timings.seconds["baseline"][-1]
                around = (baseline_before + baseline_after) / 2
                timings.add_ratio(name, seconds / count, around / n_train)
                baseline_before = baseline_after

    baseline_seconds = timings.seconds["baseline"]

    reference = scores["Captum TracInCP"]
    pairs = {"tracin auto vs Captum": (scores["tracin auto"][:n_subset], reference)}
    if "tracin vmap" in scores:
        pairs["tracin vmap vs Captum"] = (scores["tracin vmap"], reference)
        pairs["tracin vmap vs tracin auto"] = (scores["tracin vmap"], scores["tracin auto"][:n_subset])
    if "tracin auto, all parameters" in scores:
        pairs["tracin auto all parameters vs Captum"] = (scores["tracin auto, all parameters"][:n_subset], reference)
    errors = {}
    for name, (values, expected) in pairs.items():
        relative = common.relative_error(values, expected)
        errors[name] = {
            "max": float(relative.max()),
            "median": float(np.median(relative)),
            "index of max": int(relative.argmax()),
            "count over 1e-4": int((relative > 1e-4).sum()),
        }

    print()
    baseline_rate = n_train / statistics.median(baseline_seconds)
    rows = [["baseline (forward + backward)", n_train, f"{statistics.median(baseline_seconds):.1f}",
             f"{baseline_rate:,.0f}", "1.00"]]
    for name, count, _ in methods:
        seconds = timings.median_seconds(name)
        rows.append([name, count, f"{seconds:.1f}", f"{count / seconds:,.0f}", f"{timings.median_ratio(name):.2f}"])
    common.print_table(["method", "train images", "seconds (median)", "images per second",
                        "time per image / baseline"], rows)
    print()
    ratios = {name: timings.median_ratio(name) for name, _, _ in methods}
    captum_ratio = ratios["Captum TracInCP"]
    for name in ratios:
        if name.startswith("tracin"):
            print(f"{name}: {captum_ratio / ratios[name]:.2f}x the per-image speed of Captum")
    for name, value in errors.items():
        print(f"relative difference, {name}: max {value['max']:.2e} (train index {value['index of max']}), "
              f"median {value['median']:.2e}, {value['count over 1e-4']} of {n_subset} images over 1e-4")
    wall = time.perf_counter() - started
    print(f"wall time {wall:.0f} s; load average at the end {common.machine_description()['load_average']}")

    if args.json is not None:
        args.json.write_text(json.dumps({
            "machine": machine, "args": {key: str(value) for key, value in vars(args).items()},
            "n_train": n_train, "n_subset": n_subset, "checkpoints": len(workload.checkpoints),
            "parameters": n_all, "captum_parameters": n_matched,
            "seconds": timings.seconds, "ratios": timings.ratios, "load": timings.load,
            "errors": errors, "wall_seconds": wall,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
