"""Self-influence throughput of `tracin score` with 2 processes against 1, on the demo's MNIST run.

Command, from the repository root, after ``python -m tracin.demo`` has written
``runs/mnist_demo/checkpoints``::

    python benchmarks/processes.py                  # all 60,000 train images, 2 rounds
    python benchmarks/processes.py --rounds 1

Each round runs the real CLI three times, in this order, and writes a new store
each time:

1. ``tracin score CKPT --devices 1`` with 1 torch thread (``OMP_NUM_THREADS=1``);
2. ``tracin score CKPT --accelerator cpu --devices 2`` (``--strategy ddp``, gloo),
   one thread per process, so both runs use one thread per process;
3. ``tracin score CKPT --devices 1`` with 2 threads, what a user gets by default
   on a machine with 2 cores.

The wall time of each command includes starting Python, importing torch and
Lightning, starting the second process and merging the shards into one file.
The script then checks that the stores of runs 1 and 2 hold the same
self-influence (the merged file must equal a one-process run) and prints the
throughput of each run in train images per second.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from tracin import read_run  # noqa: E402

RUNS = (
    ("1 process, 1 thread", [], 1),
    ("2 processes, 1 thread each", ["--accelerator", "cpu", "--devices", "2"], 1),
    ("1 process, 2 threads", [], 2),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, default=common.DEMO_CHECKPOINTS,
                        help=f"checkpoint directory with a manifest (default {common.DEMO_CHECKPOINTS})")
    parser.add_argument("--rounds", type=int, default=2, help="times to run the three commands (default 2)")
    parser.add_argument("--batch-size", type=int, default=256, help="examples per batch (default 256)")
    parser.add_argument("--json", type=Path, help="also write the timings to this JSON file")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds} must be at least 1")
    if not (args.checkpoints / "tracin_manifest.json").is_file():
        parser.error(f"{args.checkpoints} has no tracin_manifest.json; run 'python -m tracin.demo' first")
    return args


def run_score(checkpoints: Path, out: Path, extra: list[str], threads: int, batch_size: int) -> float:
    """Run ``tracin score`` in a subprocess and return its wall time in seconds."""
    command = [sys.executable, "-m", "tracin.cli", "score", str(checkpoints), "--out", str(out), "--overwrite",
               "--batch-size", str(batch_size), "--json", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {result.returncode}:\n{result.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(json.dumps(common.machine_description()))
    timings: dict[str, list[float]] = {name: [] for name, _, _ in RUNS}
    with tempfile.TemporaryDirectory(prefix="tracin-processes-") as scratch:
        stores = {name: Path(scratch) / f"run{position}.h5" for position, (name, _, _) in enumerate(RUNS)}
        for round_index in range(args.rounds):
            for name, extra, threads in RUNS:
                seconds = run_score(args.checkpoints, stores[name], extra, threads, args.batch_size)
                timings[name].append(seconds)
                print(f"  round {round_index + 1}, {name}: {seconds:.1f} s "
                      f"(1-minute load average {os.getloadavg()[0]:.1f})", flush=True)
        one_process = read_run(stores[RUNS[0][0]]).train
        two_processes = read_run(stores[RUNS[1][0]]).train
        n_train = len(one_process["index"])
        same_order = np.array_equal(one_process["index"], two_processes["index"])
        reference = one_process["self_influence"]
        difference = np.abs(two_processes["self_influence"] - reference) / np.abs(reference).clip(1e-30)

    base = statistics.median(timings[RUNS[0][0]])
    rows = []
    for name, _, _ in RUNS:
        median = statistics.median(timings[name])
        rows.append([name, f"{median:.1f}", f"{n_train / median:,.0f}", f"{base / median:.2f}"])
    print(f"\n{n_train} train images, medians over {args.rounds} round(s)")
    common.print_table(["run", "wall s", "images per s", "speed-up vs 1 process, 1 thread"], rows)
    print(f"2-process store against 1-process store: same train order {same_order}, "
          f"largest relative difference of self-influence {difference.max():.1e}")
    if args.json is not None:
        args.json.write_text(json.dumps({"n_train": n_train, "timings": timings, "same_order": bool(same_order),
                                         "max_relative_difference": float(difference.max())}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
