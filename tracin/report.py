"""Tables and image panels that show a person which train examples to look at.

Only this module and the CLI render with rich; images are drawn with
matplotlib's non-interactive Agg backend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from tracin.errors import ConfigurationError
from tracin.store import StoredRun

SELF_INFLUENCE_CAPTION = (
    "self-influence = Σ over checkpoints of lr × ‖gradient‖²; high values mark examples the model "
    "kept fighting: likely mislabeled or unusual."
)


@dataclass
class OutlierRow:
    """One train example in the outlier table.

    Attributes:
        rank: 1 for the highest self-influence.
        index: Dataset index.
        label: Given label, -1 when unknown.
        prediction: Predicted label at the last checkpoint, -1 when unknown.
        self_influence: Σ over checkpoints of lr × ‖gradient‖².
        loss: Loss at the last checkpoint.
        margin_rank: Rank by area under the margin (given-label logit minus largest other
            logit, summed over checkpoints), 1 for the lowest; None without labels.
    """

    rank: int
    index: int
    label: int
    prediction: int
    self_influence: float
    loss: float
    margin_rank: int | None


def margin_ranks(run: StoredRun) -> np.ndarray | None:
    """Return each row's rank by area under the margin, 1 for the lowest, shape ``(N,)``; None without margins."""
    margin = run.train["margin"]
    if np.isnan(margin).all():
        return None
    area = margin.sum(axis=1)
    area = np.where(np.isnan(area), np.inf, area)
    order = np.argsort(area, kind="stable")
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks


RANKINGS = ("self-influence", "loss", "margin")
"""Orders of the outlier table: self-influence or last-checkpoint loss, highest first, or area under the margin,
lowest first."""


def outlier_rows(run: StoredRun, top: int, rank_by: str = "self-influence") -> tuple[list[OutlierRow], list[OutlierRow]]:
    """Return the ``top`` rows in the order ``rank_by``, and the rows whose self-influence is not finite.

    Benchmarks on MNIST with flipped labels found more flipped labels near the top of the
    ``loss`` and ``margin`` orders, and more unusual images near the top of ``self-influence``.
    """
    if rank_by not in RANKINGS:
        raise ConfigurationError(f"ranking {rank_by!r} is invalid; choose one of {RANKINGS}.")
    train = run.train
    scores = train["self_influence"]
    finite = np.isfinite(scores)
    ranks = margin_ranks(run)
    if rank_by == "loss":
        key = -train["loss"][:, -1]
    elif rank_by == "margin":
        if ranks is None:
            raise ConfigurationError("this store has no margins (the loss returned no logits or the data no labels); "
                                     "rank by self-influence or loss instead.")
        key = ranks.astype(np.float64)
    else:
        key = -scores
    usable = finite & np.isfinite(key)
    order = np.flatnonzero(usable)[np.argsort(key[usable], kind="stable")][:top]

    def row(rank: int, position: int) -> OutlierRow:
        return OutlierRow(
            rank=rank,
            index=int(train["index"][position]),
            label=int(train["label"][position]),
            prediction=int(train["prediction"][position]),
            self_influence=float(scores[position]),
            loss=float(train["loss"][position, -1]),
            margin_rank=int(ranks[position]) if ranks is not None else None,
        )

    ranked = [row(rank, position) for rank, position in enumerate(order, start=1)]
    nonfinite = [row(0, position) for position in np.flatnonzero(~finite)]
    return ranked, nonfinite


def label_text(value: int) -> str:
    return "?" if value < 0 else str(value)


def outlier_table(rows: Sequence[OutlierRow], nonfinite: Sequence[OutlierRow], n_train: int,
                  rank_by: str = "self-influence") -> Table:
    """Build the rich table of the top train examples in the order ``rank_by``."""
    order = {"self-influence": "self-influence", "loss": "loss at the last checkpoint",
             "margin": "area under the margin (lowest first)"}[rank_by]
    table = Table(
        title=f"Top {len(rows)} of {n_train} train examples by {order}",
        caption=SELF_INFLUENCE_CAPTION,
        caption_justify="left",
    )
    table.add_column("rank", justify="right")
    table.add_column("index", justify="right")
    table.add_column("label", justify="right")
    table.add_column("predicted", justify="right")
    table.add_column("self-influence", justify="right")
    table.add_column("loss", justify="right")
    table.add_column("margin rank", justify="right")
    for row in rows:
        style = "bold" if row.label >= 0 and row.prediction >= 0 and row.label != row.prediction else None
        table.add_row(
            str(row.rank),
            str(row.index),
            label_text(row.label),
            label_text(row.prediction),
            f"{row.self_influence:.6g}",
            f"{row.loss:.4g}",
            "-" if row.margin_rank is None else str(row.margin_rank),
            style=style,
        )
    for row in nonfinite:
        table.add_row(
            "NaN", str(row.index), label_text(row.label), label_text(row.prediction),
            f"{row.self_influence}", f"{row.loss:.4g}", "-", style="red",
        )
    return table


def rows_as_json(rows: Sequence[OutlierRow], nonfinite: Sequence[OutlierRow]) -> dict:
    """Return the table rows as a JSON-ready dict; NaN and infinity become None."""

    def clean(row: OutlierRow) -> dict:
        values = asdict(row)
        return {key: (None if isinstance(value, float) and not math.isfinite(value) else value) for key, value in values.items()}

    return {"rows": [clean(row) for row in rows], "nonfinite": [clean(row) for row in nonfinite]}


def print_table(table: Table, console: Console | None = None) -> None:
    (console or Console()).print(table)


def image_array(example: torch.Tensor | np.ndarray) -> np.ndarray:
    """Convert one input of shape ``(H, W)``, ``(1, H, W)`` or ``(3, H, W)`` to an array to draw, scaled to [0, 1]."""
    array = example.detach().cpu().double().numpy() if isinstance(example, torch.Tensor) else np.asarray(example, float)
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    if array.ndim not in (2, 3):
        raise ConfigurationError(
            f"--png needs image inputs of shape (H, W), (1, H, W) or (3, H, W); this dataset's inputs have shape "
            f"{tuple(example.shape)}. Leave out --png for non-image data."
        )
    finite = np.isfinite(array)
    if not finite.any():
        return np.zeros_like(array)
    low, high = array[finite].min(), array[finite].max()
    scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
    return np.where(finite, scaled, 0.0)


def write_image_grid(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
    columns: int = 10,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Write a grid of images with a caption under each to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigurationError(f"directory {path.parent} of --png {path} does not exist. Create it first.")
    count = max(len(images), 1)
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.9 * rows + 0.5), squeeze=False)
    for position, axis in enumerate(axes.flat):
        axis.set_axis_off()
        if position < len(images):
            axis.imshow(images[position], cmap="gray" if images[position].ndim == 2 else None, vmin=0, vmax=1)
            axis.set_title(captions[position], fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_outlier_sheet(rows: Sequence[OutlierRow], dataset, path: str | os.PathLike) -> Path:
    """Write a contact sheet of the outlier rows' images with label, prediction and score under each."""
    images = [image_array(input_of(dataset[row.index])) for row in rows]
    captions = [
        f"#{row.index} label {label_text(row.label)}\npred {label_text(row.prediction)}  {row.self_influence:.3g}"
        for row in rows
    ]
    return write_image_grid(images, captions, path, title="Top train examples by self-influence")


def input_of(item) -> torch.Tensor:
    if isinstance(item, (tuple, list)):
        return item[0]
    if isinstance(item, dict):
        for key in ("image", "images", "input", "inputs", "x"):
            if key in item:
                return item[key]
    return item
