"""Peak memory of tracing self-influence for 15,000 and 60,000 MNIST train images.

Command (after the demo, ``python -m tracin.demo``, which writes runs/mnist_demo)::

    python benchmarks/memory.py --checkpoints 2 --sizes 15000 60000

Each size runs in its own process, which traces the first N train images over the
first ``--checkpoints`` demo checkpoints and reports its peak resident set size
(``ru_maxrss``). Memory is bounded by the batch size, so the peak should barely grow
with N; the dataset arrays themselves (60,000 x 784 bytes) are loaded in both cases.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = Path("runs/mnist_demo/checkpoints")


def measure(size: int, checkpoints: int) -> dict:
    from torch.utils.data import Subset

    from tracin import discover_checkpoints, trace_self_influence
    from tracin.rebuild import rebuild_run

    run = rebuild_run(RUN)
    train = Subset(run.dataset("train"), range(size))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        trace_self_influence(run.model, discover_checkpoints(RUN)[:checkpoints], train, Path(scratch) / "run.h5",
                             batch_size=256)
    return {"size": size, "seconds": time.perf_counter() - started,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[15000, 60000])
    parser.add_argument("--checkpoints", type=int, default=2)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.checkpoints)))
        return
    results = []
    for size in args.sizes:
        output = subprocess.run([sys.executable, __file__, "--child", str(size), "--checkpoints", str(args.checkpoints)],
                                capture_output=True, text=True, check=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    print("| train images | checkpoints | peak RSS (MiB) | seconds |")
    print("|---|---|---|---|")
    for result in results:
        print(f"| {result['size']} | {args.checkpoints} | {result['peak_rss_mib']:.0f} | {result['seconds']:.0f} |")
    growth = results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"] - 1
    print(f"peak RSS growth from {results[0]['size']} to {results[-1]['size']}: {growth:.1%}")


if __name__ == "__main__":
    main()
