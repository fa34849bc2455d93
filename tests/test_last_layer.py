"""Last-layer TracInCP: the final Linear layer's weight and bias, against the closed form."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import RTOL_FLOAT64, TinyBatchNormCNN, digits_dataset, save_checkpoints
from tracin import trace_self_influence
from tracin.errors import ConfigurationError
from tracin.params import last_linear_parameters


def closed_form_last_layer(model, paths, lrs, data) -> np.ndarray:
    """Sum over checkpoints of lr * ||p - e_y||^2 * (||h||^2 + 1), h the input of the last layer."""
    x, y = data.tensors
    scores = np.zeros(len(y))
    for path, lr in zip(paths, lrs):
        model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
        model.eval()
        captured = {}
        handle = model.head.register_forward_hook(lambda module, inputs, output: captured.update(h=inputs[0]))
        with torch.no_grad():
            probabilities = F.softmax(model(x), dim=1)
        handle.remove()
        residual = probabilities - F.one_hot(y, probabilities.shape[1]).double()
        squared = residual.pow(2).sum(1) * (captured["h"].pow(2).sum(1) + 1)
        scores += lr * squared.numpy()
    return scores


def test_last_layer_matches_closed_form_with_bias(tmp_path):
    torch.manual_seed(0)
    model = TinyBatchNormCNN().double()
    lrs = [0.1, 0.02]
    paths = save_checkpoints(model, tmp_path, lrs)
    data = digits_dataset(30, image=True, dtype=torch.float64)

    names = last_linear_parameters(model)
    summary = trace_self_influence(model, paths, data, tmp_path / "run.h5", params=names, dtype=torch.float64)

    assert names == ["head.weight", "head.bias"]
    assert summary.run.attrs["params"] == names
    expected = closed_form_last_layer(TinyBatchNormCNN().double(), paths, lrs, data)
    np.testing.assert_allclose(summary.run.train["self_influence"], expected, rtol=RTOL_FLOAT64)


def test_last_layer_without_linear_rejected():
    with pytest.raises(ConfigurationError, match="no nn.Linear"):
        last_linear_parameters(nn.Sequential(nn.Conv2d(1, 2, 3)))
