"""Tables and JSON rows for ``tracin verify``.

Every change is the metric after a removal minus the metric of the baseline
retraining with the same seed, shown as mean ± standard deviation over seeds
(population standard deviation, so one seed shows ± 0).
"""

from __future__ import annotations

import math

import numpy as np
from rich.table import Table

from tracin.report import label_text
from tracin.verify import OutlierVerification, TestExampleVerification


def _mean_std(values: np.ndarray, signed: bool = True) -> str:
    mean, std = float(np.mean(values)), float(np.std(values))
    if not math.isfinite(mean):
        return str(mean)
    sign = "+" if signed else ""
    return f"{mean:{sign}.4f} ± {std:.4f}"


def beat_random_summary(result: TestExampleVerification) -> str:
    """Return the sentence that counts test examples where proponent removal raised the loss more than random."""
    wins = result.proponents_beat_random()
    return (
        f"Removing the top-{result.k} proponents raised the loss more than removing {result.k} random train "
        f"examples for {int(wins.sum())} of {len(wins)} test examples ({wins.mean():.0%})."
    )


def test_example_table(result: TestExampleVerification) -> Table:
    """Build a table with one row per test example: its baseline loss and the loss change of each removal."""
    seeds = len(result.seeds)
    kind = "cosine " if result.normalize else ""
    table = Table(
        title=f"Loss change of each test example after retraining without K={result.k} train examples "
        f"({seeds} seed{'s' if seeds != 1 else ''})",
        caption=f"change = loss after the removal - loss with nothing removed, with the same seed. Mean ± std over seeds.\n"
        f"{beat_random_summary(result)}",
        caption_justify="left",
    )
    for header in ("test example", "label", "loss, nothing removed", f"Δ loss, top-K {kind}proponents removed",
                   "Δ loss, K random removed", "proponents > random"):
        table.add_column(header, justify="right")
    change = result.loss_change()
    wins = result.proponents_beat_random()
    for row, test_index in enumerate(result.test_index.tolist()):
        table.add_row(
            str(test_index),
            label_text(int(result.test_label[row])),
            _mean_std(result.loss[row, 2], signed=False),
            _mean_std(change[row, 0]),
            _mean_std(change[row, 1]),
            "yes" if wins[row] else "no",
            style="bold" if wins[row] else None,
        )
    return table


def test_example_json(result: TestExampleVerification) -> dict:
    """Return the per-test-example results as a JSON-ready dict."""
    change = result.loss_change()
    wins = result.proponents_beat_random()
    rows = []
    for row, test_index in enumerate(result.test_index.tolist()):
        rows.append({
            "test_index": test_index,
            "label": int(result.test_label[row]),
            "proponent_removed": result.proponent_removed[row].tolist(),
            "random_removed": result.random_removed[row].tolist(),
            "loss_none_removed": result.loss[row, 2].tolist(),
            "loss_change_proponents": change[row, 0].tolist(),
            "loss_change_random": change[row, 1].tolist(),
            "proponents_beat_random": bool(wins[row]),
        })
    return {
        "k": result.k,
        "seeds": result.seeds.tolist(),
        "normalize": result.normalize,
        "fraction_proponents_beat_random": float(wins.mean()),
        "test_examples": rows,
    }


def outlier_table(result: OutlierVerification) -> Table:
    """Build a table of test accuracy and loss for each way, with the change against the baseline."""
    seeds = len(result.seeds)
    table = Table(
        title=f"Test split ({result.n_test} examples) after retraining without K={result.k} train examples "
        f"({seeds} seed{'s' if seeds != 1 else ''})",
        caption="Δ = metric after the removal - metric with nothing removed, with the same seed. Mean ± std over seeds.",
        caption_justify="left",
    )
    for header in ("removed", "test accuracy", "Δ accuracy", "test loss", "Δ loss"):
        table.add_column(header, justify="right")
    names = (f"top-{result.k} self-influence", f"{result.k} random", "nothing")
    for way, name in enumerate(names):
        is_baseline = way == 2
        table.add_row(
            name,
            _mean_std(result.accuracy[way], signed=False),
            "" if is_baseline else _mean_std(result.accuracy[way] - result.accuracy[2]),
            _mean_std(result.loss[way], signed=False),
            "" if is_baseline else _mean_std(result.loss[way] - result.loss[2]),
        )
    return table


def outlier_json(result: OutlierVerification) -> dict:
    """Return the outlier-removal results as a JSON-ready dict."""
    ways = {}
    for way, name in enumerate(("outliers", "random", "none")):
        ways[name] = {
            "accuracy": result.accuracy[way].tolist(),
            "loss": result.loss[way].tolist(),
            "accuracy_change": (result.accuracy[way] - result.accuracy[2]).tolist(),
            "loss_change": (result.loss[way] - result.loss[2]).tolist(),
        }
    return {
        "k": result.k,
        "seeds": result.seeds.tolist(),
        "n_test": result.n_test,
        "outlier_removed": result.outlier_removed.tolist(),
        "random_removed": result.random_removed.tolist(),
        "ways": ways,
    }
