"""PNG figures for ``tracin verify``, drawn with matplotlib's non-interactive Agg backend.

Both figures show every seed as a dot, so a reader sees the spread that the
tables summarize as mean ± std.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tracin.report import image_array, input_of, label_text
from tracin.verify import OutlierVerification, TestExampleVerification

MAX_THUMBNAILS = 12
"""Test examples up to this count get their image above their loss changes; more get a scatter plot only."""

PROPONENT_COLOR = "tab:red"
RANDOM_COLOR = "tab:gray"
BASELINE_COLOR = "tab:blue"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_test_example_figure(result: TestExampleVerification, test_data, path: str | os.PathLike) -> Path:
    """Write a PNG of each test example's loss change after removing its proponents and after random removal.

    Up to :data:`MAX_THUMBNAILS` test examples, each gets a column: its image on top, and below
    it the change per seed for both removals. With more test examples, one scatter plot puts the
    mean change after random removal on x and after proponent removal on y, so points above
    the diagonal are test examples where the proponents mattered more.
    """
    plt = _pyplot()
    path = Path(path)
    change = result.loss_change()
    n_test = len(result.test_index)
    title = (f"Loss change after retraining without K={result.k} train examples, {len(result.seeds)} seed(s)\n"
             "change = loss after removal - loss with nothing removed, same seed")
    if n_test > MAX_THUMBNAILS:
        figure, axis = plt.subplots(figsize=(5.5, 5.0))
        _scatter(axis, change)
    else:
        figure, axes = plt.subplots(2, n_test, figsize=(1.9 * n_test + 0.8, 4.6), squeeze=False,
                                    gridspec_kw={"height_ratios": [1, 2.2]}, sharey="row")
        for column, test_index in enumerate(result.test_index.tolist()):
            _thumbnail(axes[0, column], test_data, test_index, int(result.test_label[column]))
            _strip(axes[1, column], change[column], first=column == 0)
    figure.suptitle(title, fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _thumbnail(axis, test_data, test_index: int, label: int) -> None:
    axis.imshow(image_array(input_of(test_data[test_index])), cmap="gray", vmin=0, vmax=1)
    axis.set_title(f"test #{test_index}\nlabel {label_text(label)}", fontsize=7)
    axis.set_axis_off()


def _strip(axis, change: np.ndarray, first: bool) -> None:
    """Plot one test example's changes, shape ``(2, R)``: seeds as dots, the mean as a bar."""
    for position, (values, color) in enumerate(((change[0], PROPONENT_COLOR), (change[1], RANDOM_COLOR))):
        axis.scatter(np.full(len(values), position), values, color=color, s=14, zorder=3)
        axis.hlines(float(np.mean(values)), position - 0.3, position + 0.3, color=color, linewidth=2)
    axis.axhline(0.0, color="black", linewidth=0.6)
    axis.set_xticks([0, 1], ["top-K\nproponents", "K random"], fontsize=6)
    axis.set_xlim(-0.6, 1.6)
    axis.tick_params(axis="y", labelsize=6)
    if first:
        axis.set_ylabel("Δ test loss", fontsize=7)


def _scatter(axis, change: np.ndarray) -> None:
    """Plot mean change after random removal (x) against after proponent removal (y), one point per test example."""
    means = change.mean(axis=2)
    stds = change.std(axis=2)
    axis.errorbar(means[:, 1], means[:, 0], xerr=stds[:, 1], yerr=stds[:, 0], fmt="o", markersize=3,
                  color=PROPONENT_COLOR, ecolor="lightgray", elinewidth=0.8)
    low = float(min(means.min(), 0.0))
    high = float(max(means.max(), 0.0))
    axis.plot([low, high], [low, high], color="black", linewidth=0.6, label="proponents = random")
    wins = int((means[:, 0] > means[:, 1]).sum())
    axis.set_xlabel("Δ test loss, K random removed", fontsize=7)
    axis.set_ylabel("Δ test loss, top-K proponents removed", fontsize=7)
    axis.set_title(f"{wins} of {len(means)} test examples above the diagonal", fontsize=7)
    axis.legend(fontsize=6)
    axis.tick_params(labelsize=6)


def write_outlier_figure(result: OutlierVerification, path: str | os.PathLike) -> Path:
    """Write a PNG of test accuracy and test loss after each removal, one dot per seed and a bar for the mean."""
    plt = _pyplot()
    path = Path(path)
    names = (f"top-{result.k}\nself-influence", f"{result.k}\nrandom", "nothing")
    colors = (PROPONENT_COLOR, RANDOM_COLOR, BASELINE_COLOR)
    figure, axes = plt.subplots(1, 2, figsize=(6.4, 3.2))
    for axis, values, label in ((axes[0], 100.0 * result.accuracy, "test accuracy (%)"),
                                (axes[1], result.loss, "mean test loss")):
        for way, color in enumerate(colors):
            axis.scatter(np.full(values.shape[1], way), values[way], color=color, s=14, zorder=3)
            axis.hlines(float(np.mean(values[way])), way - 0.3, way + 0.3, color=color, linewidth=2)
        axis.set_xticks(range(len(names)), names, fontsize=6)
        axis.set_ylabel(label, fontsize=7)
        axis.tick_params(axis="y", labelsize=6)
    figure.suptitle(f"Test split ({result.n_test} examples) after retraining without K={result.k} train examples\n"
                    f"{len(result.seeds)} seed(s) (dots) and their mean (bars)", fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
