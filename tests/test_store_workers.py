"""Reading a store from DataLoader workers started with fork and with spawn."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from helpers import TinyMLP, digits_dataset, save_checkpoints
from tracin import read_run, trace_self_influence
from tracin.errors import StoreError
from tracin.store import StoredExamples


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    directory = tmp_path_factory.mktemp("store")
    torch.manual_seed(0)
    model = TinyMLP()
    paths = save_checkpoints(model, directory, [0.1])
    out = directory / "run.h5"
    trace_self_influence(model, paths, digits_dataset(64), out)
    return out


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_workers_read_every_row(store, start_method):
    examples = StoredExamples(store)
    assert examples[0]["index"] == 0  # opens the file in the parent before the workers start
    loader = DataLoader(examples, batch_size=16, num_workers=2, multiprocessing_context=start_method)

    batches = list(loader)

    expected = read_run(store).train
    np.testing.assert_array_equal(torch.cat([b["index"] for b in batches]).numpy(), expected["index"])
    np.testing.assert_array_equal(torch.cat([b["self_influence"] for b in batches]).numpy(),
                                  expected["self_influence"])


def test_missing_dataset_named(store):
    with pytest.raises(StoreError, match="no_such_dataset"):
        StoredExamples(store, names=("no_such_dataset",))
