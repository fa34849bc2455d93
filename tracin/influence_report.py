"""Tables and image panels for proponents, opponents and net importance.

Sign convention in every table: influence > 0 marks a proponent, a train example
whose gradient steps lowered the test loss; influence < 0 marks an opponent.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.table import Table

from tracin.influence import TopInfluence
from tracin.report import input_of, label_text, image_array

SIGN_NOTE = "influence > 0: proponent, a step on it lowered the test loss; < 0: opponent, it raised it"


def _score_text(value: float) -> str:
    return f"{value:+.4g}" if math.isfinite(value) else str(value)


def influence_tables(top: TopInfluence, train_labels: np.ndarray) -> list[Table]:
    """Build one table per test example with its proponents and opponents side by side."""
    kind = "cosine influence" if top.normalize else "influence"
    tables = []
    for row, test_index in enumerate(top.test_index):
        table = Table(
            title=(
                f"Test example {test_index}: label {label_text(int(top.test_label[row]))}, "
                f"predicted {label_text(int(top.test_prediction[row]))} at the last checkpoint"
            ),
            caption=f"cosine similarity per checkpoint; {SIGN_NOTE}" if top.normalize else SIGN_NOTE,
            caption_justify="left",
        )
        for header in ("rank", "proponent", "label", kind, "opponent", "label ", f"{kind} "):
            table.add_column(header, justify="right")
        for rank in range(top.proponent_index.shape[1]):
            proponent = int(top.proponent_index[row, rank])
            opponent = int(top.opponent_index[row, rank])
            table.add_row(
                str(rank + 1),
                str(proponent),
                label_text(int(train_labels[proponent])),
                _score_text(float(top.proponent_score[row, rank])),
                str(opponent),
                label_text(int(train_labels[opponent])),
                _score_text(float(top.opponent_score[row, rank])),
            )
        tables.append(table)
    return tables


def influence_json(top: TopInfluence, train_labels: np.ndarray) -> dict:
    """Return proponents and opponents of each test example as a JSON-ready dict."""

    def entries(indices: np.ndarray, scores: np.ndarray) -> list[dict]:
        return [
            {"index": int(index), "label": int(train_labels[index]), "influence": _finite_or_none(score)}
            for index, score in zip(indices, scores)
        ]

    return {
        "sign": SIGN_NOTE,
        "normalize": top.normalize,
        "test": [
            {
                "index": int(test_index),
                "label": int(top.test_label[row]),
                "prediction": int(top.test_prediction[row]),
                "proponents": entries(top.proponent_index[row], top.proponent_score[row]),
                "opponents": entries(top.opponent_index[row], top.opponent_score[row]),
            }
            for row, test_index in enumerate(top.test_index)
        ],
    }


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def write_influence_panel(top: TopInfluence, test_data, train_data, train_labels: np.ndarray,
                          path: str | os.PathLike) -> Path:
    """Write a PNG: per test example, its image on the left, proponents on the top row, opponents below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    k = top.proponent_index.shape[1]
    n_test = len(top.test_index)
    figure, axes = plt.subplots(2 * n_test, k + 1, figsize=(1.5 * (k + 1), 3.4 * n_test + 0.4), squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    for row, test_index in enumerate(top.test_index):
        test_axis = axes[2 * row, 0]
        test_axis.imshow(image_array(input_of(test_data[int(test_index)])), cmap="gray", vmin=0, vmax=1)
        test_axis.set_title(
            f"test #{test_index}\nlabel {label_text(int(top.test_label[row]))} "
            f"pred {label_text(int(top.test_prediction[row]))}",
            fontsize=7,
        )
        for line, (indices, scores, name) in enumerate(
            ((top.proponent_index, top.proponent_score, "proponent"), (top.opponent_index, top.opponent_score, "opponent"))
        ):
            for rank in range(k):
                index = int(indices[row, rank])
                axis = axes[2 * row + line, rank + 1]
                axis.imshow(image_array(input_of(train_data[index])), cmap="gray", vmin=0, vmax=1)
                axis.set_title(
                    f"{name} #{index}\nlabel {label_text(int(train_labels[index]))} {_score_text(float(scores[row, rank]))}",
                    fontsize=6,
                )
    figure.suptitle(f"Proponents (top rows) and opponents (bottom rows); {SIGN_NOTE}", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def importance_tables(scores: np.ndarray, train_labels: np.ndarray, k: int, against: str) -> list[Table]:
    """Build the tables of the K most helpful and K most harmful train examples for a split."""
    helpful, harmful = importance_order(scores, k)
    tables = []
    for title, rows in (
        (f"Most helpful train examples for the {against} split (net influence > 0 lowered its loss)", helpful),
        (f"Most harmful train examples for the {against} split (net influence < 0 raised its loss)", harmful),
    ):
        table = Table(title=title)
        for header in ("rank", "index", "label", "net influence"):
            table.add_column(header, justify="right")
        for rank, index in enumerate(rows, start=1):
            table.add_row(str(rank), str(int(index)), label_text(int(train_labels[index])), _score_text(float(scores[index])))
        tables.append(table)
    return tables


def importance_order(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the indices of the K most helpful and the K most harmful train examples."""
    finite = np.flatnonzero(np.isfinite(scores))
    order = finite[np.argsort(-scores[finite], kind="stable")]
    return order[:k], order[::-1][:k]


def write_importance_sheet(scores: np.ndarray, train_data, train_labels: np.ndarray, k: int,
                           path: str | os.PathLike) -> Path:
    """Write a PNG with the K most helpful train images on the first row and the K most harmful on the second."""
    from tracin.report import write_image_grid

    helpful, harmful = importance_order(scores, k)
    chosen: Sequence[int] = [*helpful, *harmful]
    images = [image_array(input_of(train_data[int(index)])) for index in chosen]
    captions = [
        f"{'helpful' if position < len(helpful) else 'harmful'} #{index}\n"
        f"label {label_text(int(train_labels[index]))} {_score_text(float(scores[index]))}"
        for position, index in enumerate(chosen)
    ]
    return write_image_grid(images, captions, path, title="Net influence: most helpful (first row), most harmful (second row)",
                            columns=max(len(helpful), 1))
