"""Orders of the outlier table."""

import numpy as np
import pytest
import torch

from helpers import TinyMLP, digits_dataset, save_checkpoints
from tracin import trace_self_influence
from tracin.errors import ConfigurationError
from tracin.report import outlier_rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    model = TinyMLP()
    paths = save_checkpoints(model, directory, [0.1, 0.05])
    return trace_self_influence(model, paths, digits_dataset(50), directory / "run.h5").run


@pytest.mark.parametrize("rank_by,key", [
    ("self-influence", lambda train: -train["self_influence"]),
    ("loss", lambda train: -train["loss"][:, -1]),
    ("margin", lambda train: train["margin"].sum(axis=1)),
])
def test_rows_follow_requested_order(run, rank_by, key):
    rows, nonfinite = outlier_rows(run, 10, rank_by)

    expected = np.argsort(key(run.train), kind="stable")[:10]
    assert [row.index for row in rows] == expected.tolist()
    assert [row.rank for row in rows] == list(range(1, 11))
    assert nonfinite == []


def test_unknown_order_rejected(run):
    with pytest.raises(ConfigurationError, match="'entropy'"):
        outlier_rows(run, 10, "entropy")
