"""Self-influence against a brute-force loop, one example at a time with torch.autograd.grad."""

import numpy as np
import pytest
import torch

from helpers import (
    RTOL_FLOAT32,
    RTOL_FLOAT64,
    FrozenBackbone,
    GroupedStridedCNN,
    SharedLinear,
    TinyBatchNormCNN,
    TinyMLP,
    brute_force_self_influence,
    digits_dataset,
    random_dataset,
    save_checkpoints,
)
from tracin import trace_self_influence

LRS = [0.1, 0.05, 0.01]

CASES = {
    "mlp": (TinyMLP, lambda dtype: digits_dataset(40, dtype=dtype)),
    "cnn_batchnorm": (TinyBatchNormCNN, lambda dtype: digits_dataset(40, image=True, dtype=dtype)),
    "frozen_backbone": (FrozenBackbone, lambda dtype: random_dataset(40, 4, 2, dtype=dtype)),
    "shared_module": (SharedLinear, lambda dtype: random_dataset(40, 4, 3, dtype=dtype)),
    "grouped_strided_conv": (GroupedStridedCNN, lambda dtype: digits_dataset(40, image=True, dtype=dtype)),
}


@pytest.mark.parametrize("method", ["auto", "vmap"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_self_influence_matches_brute_force(case, dtype, method, tmp_path):
    factory, make_data = CASES[case]
    torch.manual_seed(0)
    model = factory()
    if case == "cnn_batchnorm":
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    paths = save_checkpoints(model, tmp_path, LRS)
    data = make_data(dtype)
    tracked = [name for name, p in model.named_parameters() if p.requires_grad]

    summary = trace_self_influence(model, paths, data, tmp_path / "run.h5", batch_size=16, dtype=dtype, method=method)

    expected = brute_force_self_influence(factory, paths, LRS, make_data(torch.float64), tracked)
    scores = summary.run.train["self_influence"]
    rtol = RTOL_FLOAT64 if dtype == torch.float64 else RTOL_FLOAT32
    np.testing.assert_allclose(scores, expected, rtol=rtol)
    assert summary.run.attrs["params"] == tracked
    assert summary.run.train["index"].tolist() == list(range(len(data)))
