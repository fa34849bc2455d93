"""How often the same train images appear among the top opponents, with raw and with normalized scores.

Command (after the demo, ``python -m tracin.demo``, which writes runs/mnist_demo)::

    python benchmarks/opponent_concentration.py runs/mnist_demo/tracin.h5 --n-test 1000

For the first ``--n-test`` MNIST test images it finds the top-10 opponents and
proponents with raw dot products and with ``normalize=True`` (cosine per
checkpoint), then reports how concentrated the lists are: the number of distinct
train images among all opponent slots, the share of slots taken by the 10 most
frequent ones, and the share of opponent slots that are images with flipped labels.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import numpy as np

from tracin.influence import InfluenceContext, ensure_train_gradients, top_k_influence
from tracin.rebuild import rebuild_run
from tracin.store import read_run


def concentration(indices: np.ndarray, flipped: set[int]) -> dict[str, float]:
    counts = Counter(indices.ravel().tolist())
    slots = indices.size
    return {
        "distinct": len(counts),
        "top10_share": sum(count for _, count in counts.most_common(10)) / slots,
        "flipped_share": sum(count for index, count in counts.items() if index in flipped) / slots,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--n-test", type=int, default=1000)
    args = parser.parse_args()

    stored = read_run(args.store)
    run = rebuild_run(stored.attrs["checkpoint_dir"], config_text=stored.attrs.get("config") or None)
    train, test = run.dataset("train"), run.dataset("test")
    flipped = set(run.datamodule.flipped_indices.tolist())
    context = InfluenceContext.from_store(stored, run.model, batch_size=256)
    ensure_train_gradients(args.store, context, train)

    print(f"{args.n_test} test images, top-10 lists, {len(flipped)} of {len(train)} train labels flipped")
    print("| scores | list | distinct train images | share of slots held by the 10 most frequent | "
          "share of slots with flipped labels | time (s) |")
    print("|---|---|---|---|---|---|")
    for normalize in (False, True):
        started = time.perf_counter()
        top = top_k_influence(args.store, context, test, np.arange(args.n_test), k=10, normalize=normalize)
        elapsed = time.perf_counter() - started
        name = "cosine (--normalize)" if normalize else "raw dot product"
        for kind, indices in (("opponents", top.opponent_index), ("proponents", top.proponent_index)):
            stats = concentration(indices, flipped)
            print(f"| {name} | {kind} | {stats['distinct']} | {stats['top10_share']:.1%} | "
                  f"{stats['flipped_share']:.1%} | {elapsed:.0f} |")


if __name__ == "__main__":
    main()
