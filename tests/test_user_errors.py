"""Python API errors for inputs that do not match the traced run, and leftover partial files."""

import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import TinyMLP, digits_dataset, save_checkpoints
from tracin import discover_checkpoints, trace_self_influence
from tracin.errors import CheckpointError, ConfigurationError, LossError
from tracin.influence import InfluenceContext, ensure_train_gradients
from tracin.passes import resolve_device
from tracin.store import partial_path


@pytest.fixture
def traced(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    paths = save_checkpoints(model, tmp_path, [0.1, 0.05])
    train = digits_dataset(60)
    store = tmp_path / "run.h5"
    trace_self_influence(model, paths, train, store, batch_size=16)
    return model, paths, train, store


def test_gradients_of_smaller_train_set_rejected(traced):
    model, paths, train, store = traced
    context = InfluenceContext.build(model, discover_checkpoints(paths), batch_size=16)
    smaller = TensorDataset(*[tensor[:20] for tensor in train.tensors])

    with pytest.raises(ConfigurationError, match="has 20 examples but .* traced on 60"):
        ensure_train_gradients(store, context, smaller)


def test_gradients_of_reordered_train_set_rejected(traced):
    model, paths, train, store = traced
    context = InfluenceContext.build(model, discover_checkpoints(paths), batch_size=16)
    reversed_train = TensorDataset(*[tensor.flip(0) for tensor in train.tensors])

    with pytest.raises(ConfigurationError, match="not the train set"):
        ensure_train_gradients(store, context, reversed_train)


def test_garbage_checkpoint_raises_checkpoint_error(tmp_path):
    path = tmp_path / "step=00000001.pt"
    path.write_bytes(b"hello world")

    with pytest.raises(CheckpointError, match="could not be read|not a file that torch.save wrote"):
        discover_checkpoints(tmp_path)


@pytest.mark.parametrize("device", ["nonsense", "cuda:0"])
def test_bad_device_rejected(device):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigurationError, match=device):
        resolve_device(device)


def test_failed_run_leaves_no_partial_file(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    paths = save_checkpoints(model, tmp_path, [0.1])
    out = tmp_path / "run.h5"

    with pytest.raises(LossError):
        trace_self_influence(model, paths, digits_dataset(20), out, loss=lambda m, batch: m(batch[0]).sum())

    assert not partial_path(out).exists()
    summary = trace_self_influence(model, paths, digits_dataset(20), out)
    assert summary.run.train["self_influence"].shape == (20,)
