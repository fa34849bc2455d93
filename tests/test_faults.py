"""Faults a user can run into: bad inputs, odd models and checkpoints, and runs that fail halfway.

Each test checks what tracin does about one fault against a value computed
independently, usually the brute-force float64 reference in helpers.py. The
table in docs/faults.md lists the faults and the tests that guard them.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import (
    RTOL_FLOAT32,
    RTOL_FLOAT64,
    FrozenBackbone,
    HookedBatchNormMLP,
    SingleLogit,
    TiedOutput,
    TinyBatchNormCNN,
    TinyMLP,
    brute_force_self_influence,
    digits_dataset,
    random_dataset,
    save_checkpoints,
    write_checkpoint,
)
from tracin import discover_checkpoints, trace_self_influence
from tracin.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigurationError,
    DataOrderError,
    LossError,
    MissingLearningRateError,
    NonFiniteScoreWarning,
    SelectionError,
    StorageOverflowWarning,
    StoreError,
    UnsafeCheckpointError,
    ZeroGradientWarning,
    ZeroLearningRateWarning,
)
from tracin.gradients import make_gradient_computer
from tracin.influence import InfluenceContext, ensure_train_gradients, to_storage, top_k_influence
from tracin.losses import resolve_loss
from tracin.params import select_parameters
from tracin.passes import gradient_passes, tracing_mode
from tracin.report import outlier_rows

LRS = [0.1, 0.05, 0.01]
METHODS = ["auto", "vmap"]
# Batch composition changes only the order of float32 sums.
BATCH_RTOL = 1e-6
# Largest float16 value.
FLOAT16_MAX = 65504.0


def tracked_names(model: nn.Module) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def output_files(directory: Path) -> list[str]:
    """Return the names of store files (final, partial and lock) in ``directory``."""
    return sorted(path.name for path in directory.iterdir() if ".h5" in path.name)


# Loss reduction


def test_loss_reduction_does_not_change_scores(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP().double()
    paths = save_checkpoints(model, tmp_path, LRS)
    data = digits_dataset(40, dtype=torch.float64)
    mean_loss = nn.CrossEntropyLoss(reduction="mean")

    default = trace_self_influence(model, paths, data, tmp_path / "default.h5", batch_size=16, dtype=torch.float64)
    mean = trace_self_influence(model, paths, data, tmp_path / "mean.h5", loss=mean_loss, batch_size=16,
                                dtype=torch.float64)
    summed = trace_self_influence(model, paths, data, tmp_path / "sum.h5", loss=nn.CrossEntropyLoss(reduction="sum"),
                                  batch_size=16, dtype=torch.float64)

    expected = brute_force_self_influence(TinyMLP, paths, LRS, data, tracked_names(model))
    np.testing.assert_allclose(default.run.train["self_influence"], expected, rtol=RTOL_FLOAT64)
    np.testing.assert_allclose(mean.run.train["self_influence"], expected, rtol=RTOL_FLOAT64)
    np.testing.assert_allclose(summed.run.train["self_influence"], expected, rtol=RTOL_FLOAT64)
    # The user's loss module keeps its own reduction.
    assert mean_loss.reduction == "mean"


def test_scalar_loss_rejected(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    paths = save_checkpoints(model, tmp_path, LRS)

    def batch_mean_loss(model, batch):
        inputs, targets = batch
        return F.cross_entropy(model(inputs), targets)

    for method in METHODS:
        with pytest.raises(LossError) as raised:
            trace_self_influence(model, paths, digits_dataset(20), tmp_path / f"{method}.h5", loss=batch_mean_loss,
                                 batch_size=8, method=method)

        message = str(raised.value)
        assert "shape ()" in message, method
        assert "per-example losses" in message, method
        assert "reduction='none'" in message, method


def test_loss_module_without_reduction_rejected(tmp_path):
    class MarginLoss(nn.Module):
        def forward(self, outputs, targets):
            return (1 - outputs.gather(1, targets.unsqueeze(1))).clamp(min=0).squeeze(1)

    torch.manual_seed(0)
    model = TinyMLP()
    paths = save_checkpoints(model, tmp_path, LRS)

    with pytest.raises(LossError) as raised:
        trace_self_influence(model, paths, digits_dataset(20), tmp_path / "run.h5", loss=MarginLoss())

    assert "MarginLoss" in str(raised.value)
    assert "'reduction'" in str(raised.value)
    assert output_files(tmp_path) == []


# Frozen parameters


def test_frozen_backbone_tracks_only_head(tmp_path):
    torch.manual_seed(0)
    model = FrozenBackbone().double()
    paths = save_checkpoints(model, tmp_path, LRS)
    data = random_dataset(20, 4, 2, dtype=torch.float64)

    summary = trace_self_influence(model, paths, data, tmp_path / "run.h5", batch_size=8, dtype=torch.float64)

    assert summary.run.attrs["params"] == ["head.weight", "head.bias"]
    assert summary.run.attrs["n_params"] == 8 * 2 + 2
    expected = brute_force_self_influence(FrozenBackbone, paths, LRS, data, ["head.weight", "head.bias"])
    np.testing.assert_allclose(summary.run.train["self_influence"], expected, rtol=RTOL_FLOAT64)


def test_unknown_param_pattern_lists_valid_names(tmp_path):
    torch.manual_seed(0)
    model = FrozenBackbone()
    paths = save_checkpoints(model, tmp_path, LRS)

    with pytest.raises(ConfigurationError) as raised:
        trace_self_influence(model, paths, random_dataset(8, 4, 2), tmp_path / "run.h5", params=["nothing*"])

    message = str(raised.value)
    assert "'nothing*'" in message
    for name in ("backbone.weight", "backbone.bias", "head.weight", "head.bias"):
        assert name in message
    assert output_files(tmp_path) == []


# The user's model is left as it was


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def model_snapshot(model: nn.Module) -> dict:
    """Record every flag, hook, parameter, gradient and buffer of ``model``, byte for byte."""
    return {
        "training": {name: module.training for name, module in model.named_modules()},
        "hooks": {
            (name, attr): list(getattr(module, attr).items())
            for name, module in model.named_modules()
            for attr in HOOK_DICTS
        },
        "requires_grad": {name: param.requires_grad for name, param in model.named_parameters()},
        "grads": {name: None if param.grad is None else param.grad.clone() for name, param in model.named_parameters()},
        "parameters": {name: (param.dtype, param.detach().numpy().tobytes()) for name, param in model.named_parameters()},
        "buffers": {name: (buffer.dtype, buffer.numpy().tobytes()) for name, buffer in model.named_buffers()},
    }


class LossFailure(RuntimeError):
    pass


def failing_loss(calls_before_failure: int):
    """A cross-entropy loss that raises LossFailure on call number ``calls_before_failure + 1``."""
    calls = []

    def loss(model, batch):
        calls.append(1)
        if len(calls) > calls_before_failure:
            raise LossFailure(f"loss call {len(calls)}")
        inputs, targets = batch
        logits = model(inputs)
        return F.cross_entropy(logits, targets, reduction="none"), logits

    return loss


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("failure", ["none", "loss_raises", "bad_second_checkpoint"])
def test_model_state_restored(tmp_path, method, failure):
    torch.manual_seed(0)
    model = HookedBatchNormMLP()
    model.train()
    model.head.eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.num_batches_tracked.fill_(7)
    activations = []
    model.fc.register_forward_hook(lambda module, inputs, output: activations.append(output.shape))
    model.bn.register_forward_pre_hook(lambda module, inputs: None)
    data = random_dataset(40, 6, 3)
    paths = save_checkpoints(model, tmp_path, LRS)
    loss = None
    if failure == "loss_raises":
        loss = failing_loss(2)
    if failure == "bad_second_checkpoint":
        state = torch.load(paths[1], weights_only=True)["state_dict"]
        state["fc.weight"] = torch.zeros(8, 7)
        write_checkpoint(paths[1], state, lr=LRS[1], step=20)
    untouched = copy.deepcopy(model)
    before = model_snapshot(model)

    if failure == "none":
        trace_self_influence(model, paths, data, tmp_path / "run.h5", batch_size=8, dtype=torch.float64, method=method)
    else:
        expected_error = LossFailure if failure == "loss_raises" else CheckpointError
        with pytest.raises(expected_error):
            trace_self_influence(model, paths, data, tmp_path / "run.h5", loss=loss, batch_size=8,
                                 dtype=torch.float64, method=method)

    after = model_snapshot(model)
    for key in before:
        assert after[key].keys() == before[key].keys(), key
        for name in before[key]:
            if key == "grads":
                assert before[key][name] is None, name
                assert after[key][name] is None, name
            else:
                assert after[key][name] == before[key][name], f"{key} {name}"
    assert not (tmp_path / "run.h5.lock").exists()

    # One more training step gives the same weights as on a model that was never traced.
    inputs, targets = data.tensors[0][:8], data.tensors[1][:8]
    for network in (model, untouched):
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
        F.cross_entropy(network(inputs), targets).backward()
        optimizer.step()
    for (name, traced), (_, reference) in zip(model.state_dict().items(), untouched.state_dict().items()):
        assert torch.equal(traced, reference), name


# Non-finite inputs


@pytest.mark.parametrize("method", METHODS)
def test_nan_input_scores_only_that_example(tmp_path, method):
    torch.manual_seed(0)
    model = TinyMLP().double()
    paths = save_checkpoints(model, tmp_path, LRS)
    inputs, labels = digits_dataset(100, dtype=torch.float64).tensors
    inputs = inputs.clone()
    inputs[37, 20] = float("nan")
    others = [index for index in range(100) if index != 37]

    with pytest.warns(NonFiniteScoreWarning, match=r"\[37\]"):
        summary = trace_self_influence(model, paths, TensorDataset(inputs, labels), tmp_path / "nan.h5",
                                       batch_size=16, dtype=torch.float64, method=method)
    clean = trace_self_influence(model, paths, TensorDataset(inputs[others], labels[others]), tmp_path / "clean.h5",
                                 batch_size=16, dtype=torch.float64, method=method)

    scores = summary.run.train["self_influence"]
    ranked, nonfinite = outlier_rows(summary.run, top=100)
    assert np.isnan(scores[37])
    assert summary.nonfinite == [37]
    assert [row.index for row in nonfinite] == [37]
    assert len(ranked) == 99
    assert 37 not in [row.index for row in ranked]
    assert np.isfinite(scores[others]).all()
    np.testing.assert_allclose(scores[others], clean.run.train["self_influence"], rtol=RTOL_FLOAT64)


def test_nan_input_in_first_batch_with_tied_weights(tmp_path):
    """A NaN example in the first batch must not hide a tied weight from the layer path's check."""
    torch.manual_seed(0)
    model = TiedOutput().double()
    paths = save_checkpoints(model, tmp_path, LRS)
    inputs, labels = random_dataset(40, 6, 4, dtype=torch.float64).tensors
    inputs = inputs.clone()
    inputs[3, 0] = float("nan")
    others = [index for index in range(40) if index != 3]

    with pytest.warns(NonFiniteScoreWarning):
        summary = trace_self_influence(model, paths, TensorDataset(inputs, labels), tmp_path / "run.h5",
                                       batch_size=16, dtype=torch.float64, method="auto")

    expected = brute_force_self_influence(TiedOutput, paths, LRS, TensorDataset(inputs[others], labels[others]),
                                          tracked_names(model))
    scores = summary.run.train["self_influence"]
    assert np.isnan(scores[3])
    np.testing.assert_allclose(scores[others], expected, rtol=RTOL_FLOAT64)


# Checkpoint order and learning rates


def test_shuffled_checkpoint_files_traced_in_order(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP().double()
    paths = save_checkpoints(model, tmp_path, LRS)
    data = digits_dataset(30, dtype=torch.float64)
    shuffled = [paths[2], paths[0], paths[1]]

    summary = trace_self_influence(model, shuffled, data, tmp_path / "run.h5", batch_size=16, dtype=torch.float64)

    expected = brute_force_self_influence(TinyMLP, paths, LRS, data, tracked_names(model))
    np.testing.assert_allclose(summary.run.train["self_influence"], expected, rtol=RTOL_FLOAT64)
    assert [info["step"] for info in summary.run.checkpoints] == [10, 20, 30]
    assert [info["lr"] for info in summary.run.checkpoints] == [[lr] for lr in LRS]


def test_explicit_lrs_follow_training_order(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP().double()
    # Every file records lr 1.0; the explicit rates, in training order, replace them.
    paths = save_checkpoints(model, tmp_path, [1.0, 1.0, 1.0])
    data = digits_dataset(30, dtype=torch.float64)
    shuffled = [paths[1], paths[2], paths[0]]

    summary = trace_self_influence(model, shuffled, data, tmp_path / "run.h5", lr=LRS, batch_size=16,
                                   dtype=torch.float64)

    expected = brute_force_self_influence(TinyMLP, paths, LRS, data, tracked_names(model))
    np.testing.assert_allclose(summary.run.train["self_influence"], expected, rtol=RTOL_FLOAT64)


def test_second_checkpoint_weights_change_score(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP().double()
    paths = save_checkpoints(model, tmp_path, LRS)
    data = digits_dataset(30, dtype=torch.float64)
    original = trace_self_influence(model, paths, data, tmp_path / "original.h5", batch_size=16, dtype=torch.float64)

    state = torch.load(paths[1], weights_only=True)["state_dict"]
    state["fc1.weight"] = state["fc1.weight"] + 0.2 * torch.randn(state["fc1.weight"].shape, dtype=torch.float64)
    write_checkpoint(paths[1], state, lr=LRS[1], step=20)
    changed = trace_self_influence(model, paths, data, tmp_path / "changed.h5", batch_size=16, dtype=torch.float64)

    before = original.run.train["checkpoint_self_influence"]
    after = changed.run.train["checkpoint_self_influence"]
    np.testing.assert_array_equal(after[:, 0], before[:, 0])
    np.testing.assert_array_equal(after[:, 2], before[:, 2])
    assert np.abs(after[:, 1] - before[:, 1]).min() > 0
    assert not np.allclose(changed.run.train["self_influence"], original.run.train["self_influence"], rtol=1e-6)


def test_shuffled_loader_rejected(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    paths = save_checkpoints(model, tmp_path, LRS)
    loader = DataLoader(digits_dataset(20), batch_size=8, shuffle=True)

    with pytest.raises(DataOrderError) as raised:
        trace_self_influence(model, paths, loader, tmp_path / "run.h5")

    assert "RandomSampler" in str(raised.value)
    assert "shuffle=False" in str(raised.value)
    assert output_files(tmp_path) == []


def test_wrong_lr_count_rejected_before_work(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    paths = save_checkpoints(model, tmp_path, LRS)
    loss = failing_loss(0)

    with pytest.raises(ConfigurationError) as raised:
        trace_self_influence(model, paths, digits_dataset(20), tmp_path / "run.h5", lr=[0.1, 0.05], loss=loss)

    assert "2 learning rates" in str(raised.value)
    assert "3 checkpoints" in str(raised.value)
    assert output_files(tmp_path) == []


def test_zero_lr_checkpoint_contributes_nothing(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP().double()
    lrs = [0.0, 0.0, 0.1]
    paths = save_checkpoints(model, tmp_path, lrs)
    data = digits_dataset(30, dtype=torch.float64)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = trace_self_influence(model, paths, data, tmp_path / "run.h5", batch_size=16, dtype=torch.float64)

    zero_lr_warnings = [item for item in caught if issubclass(item.category, ZeroLearningRateWarning)]
    assert len(zero_lr_warnings) == 1
    assert str(paths[0]) in str(zero_lr_warnings[0].message)
    assert str(paths[1]) in str(zero_lr_warnings[0].message)
    assert summary.zero_lr_checkpoints == [0, 1]
    per_checkpoint = summary.run.train["checkpoint_self_influence"]
    assert (per_checkpoint[:, :2] == 0).all()
    expected = brute_force_self_influence(TinyMLP, paths[2:], lrs[2:], data, tracked_names(model))
    np.testing.assert_allclose(summary.run.train["self_influence"], expected, rtol=RTOL_FLOAT64)


# Batch size, degenerate losses and large values


@pytest.mark.parametrize("method", METHODS)
def test_batch_size_does_not_change_scores(tmp_path, method):
    torch.manual_seed(0)
    model = TinyBatchNormCNN()
    paths = save_checkpoints(model, tmp_path, LRS[:2])
    data = digits_dataset(50, image=True)

    scores = {
        size: trace_self_influence(model, paths, data, tmp_path / f"batch{size}.h5", batch_size=size,
                                   method=method).run.train["self_influence"]
        for size in (1, 7, 32)
    }

    np.testing.assert_allclose(scores[7], scores[1], rtol=BATCH_RTOL)
    np.testing.assert_allclose(scores[32], scores[1], rtol=BATCH_RTOL)


@pytest.mark.parametrize("method", METHODS)
def test_zero_gradients_warn_with_hint(tmp_path, method):
    torch.manual_seed(0)
    model = SingleLogit()
    paths = save_checkpoints(model, tmp_path, LRS)
    # One class, so every label is 0 and every loss is -log_softmax = 0.
    data = random_dataset(20, 4, 1)

    with pytest.warns(ZeroGradientWarning, match="dimension of size 1"):
        summary = trace_self_influence(model, paths, data, tmp_path / "run.h5", batch_size=8, method=method)

    assert summary.all_zero_gradients
    assert (summary.run.train["self_influence"] == 0).all()


def large_gradient_run(directory: Path, scale: float = 1e5) -> tuple[TensorDataset, list[Path], list[float]]:
    """Digits scaled by ``scale`` into a TinyMLP whose first layer is scaled by ``1 / scale``, with lr 10.

    The first layer's gradient is its output gradient times the input, so its norm grows
    with ``scale``: about 1e5 for the default.
    """
    torch.manual_seed(0)
    model = TinyMLP().double()
    generator = torch.Generator().manual_seed(1)
    paths = []
    for step in (1, 2):
        state = {name: value.clone() for name, value in model.state_dict().items()}
        state["fc1.weight"] = (state["fc1.weight"] + 0.1 * torch.randn(state["fc1.weight"].shape,
                                                                     generator=generator, dtype=torch.float64)) / scale
        paths.append(write_checkpoint(directory / f"step={step:08d}.pt", state, lr=10.0, step=step))
    inputs, labels = digits_dataset(40, dtype=torch.float64).tensors
    return TensorDataset(scale * inputs, labels), paths, [10.0, 10.0]


@pytest.mark.parametrize("method", METHODS)
def test_large_gradients_float32_match_float64(tmp_path, method):
    data, paths, lrs = large_gradient_run(tmp_path)
    data32 = TensorDataset(data.tensors[0].float(), data.tensors[1])

    summary = trace_self_influence(TinyMLP(), paths, data32, tmp_path / "run.h5", batch_size=16,
                                   dtype=torch.float32, method=method)

    expected = brute_force_self_influence(TinyMLP, paths, lrs, data, tracked_names(TinyMLP()))
    scores = summary.run.train["self_influence"]
    # Gradient norms are 1e5 to 2.4e5 at learning rate 10, so every score exceeds 1e11.
    assert expected.min() > 1e11
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores, expected, rtol=RTOL_FLOAT32)


def test_float16_storage_overflow_stored_as_nan():
    values = torch.tensor([1.0, FLOAT16_MAX, 7e4, -1e5, 3.5])

    with pytest.warns(StorageOverflowWarning, match="2 gradient values exceed the range of float16"):
        stored = to_storage(values, np.dtype(np.float16))

    assert stored.dtype == np.float16
    assert not np.isinf(stored).any()
    assert np.isnan(stored[[2, 3]]).all()
    np.testing.assert_array_equal(stored[[0, 1, 4]], np.array([1.0, FLOAT16_MAX, 3.5], dtype=np.float16))


def test_float16_train_gradients_have_no_inf(tmp_path):
    # The largest gradient entries are about 3e5, over the float16 maximum.
    data, paths, _ = large_gradient_run(tmp_path, scale=1e6)
    model = TinyMLP().double()
    store = tmp_path / "run.h5"
    trace_self_influence(model, paths, data, store, batch_size=16, dtype=torch.float64)
    context = InfluenceContext.build(model, discover_checkpoints(paths), dtype=torch.float64, batch_size=16)

    with pytest.warns(StorageOverflowWarning):
        ensure_train_gradients(store, context, data, storage_dtype="float16")

    with h5py.File(store, "r") as file:
        gradients = file["gradients/0000"][...]
    assert gradients.dtype == np.float16
    assert not np.isinf(gradients).any()
    assert np.isnan(gradients).any()


# Memory and autograd graphs


def resident_bytes() -> int:
    """Return this process's resident set size, from /proc/self/statm (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# Keeping each example's float32 gradient (9,610 parameters, about 38 KB, for the model
# below) would add about 75 MB per checkpoint pass over 2000 examples.
MEMORY_MARGIN_BYTES = 16 * 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
@pytest.mark.parametrize("method", METHODS)
def test_memory_flat_over_examples(tmp_path, method):
    torch.manual_seed(0)
    model = TinyMLP(hidden=128)
    paths = save_checkpoints(model, tmp_path, LRS[:2])
    data = random_dataset(2000, 64, 10)
    samples = []

    summary = trace_self_influence(model, paths, data, tmp_path / "run.h5", batch_size=50, method=method,
                                   progress=lambda done, total: samples.append((done, resident_bytes())))

    baseline = next(size for done, size in samples if done >= 100)
    peak = max(size for done, size in samples if done >= 100)
    assert samples[-1][0] == 4000
    assert peak - baseline < MEMORY_MARGIN_BYTES, f"resident memory grew by {(peak - baseline) / 2**20:.1f} MiB"
    assert all(isinstance(values, np.ndarray) for values in summary.run.train.values())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("squared_norms", [False, True])
def test_results_hold_no_autograd_graph(tmp_path, method, squared_norms):
    torch.manual_seed(0)
    model = TinyBatchNormCNN()
    paths = save_checkpoints(model, tmp_path, LRS[:2])
    loader = DataLoader(digits_dataset(20, image=True), batch_size=8)
    tracked = select_parameters(model)
    checkpoints = discover_checkpoints(paths)
    tensors = []

    with tracing_mode(model, torch.device("cpu")):
        computer = make_gradient_computer(model, resolve_loss(None, model), tracked, method)
        for block in gradient_passes(model, checkpoints, loader, computer, torch.device("cpu"), torch.float32,
                                     squared_norms=squared_norms):
            result = block.gradients
            tensors.extend([result.losses, result.outputs, result.squared_norms, *result.grads.values()])

    tensors = [tensor for tensor in tensors if tensor is not None]
    assert len(tensors) > 0
    for tensor in tensors:
        assert tensor.grad_fn is None
        assert not tensor.requires_grad


# Checkpoint files


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_wrapper_prefixes_load(tmp_path, prefix):
    torch.manual_seed(0)
    model = TinyMLP()
    paths = save_checkpoints(model, tmp_path, LRS[:1])
    data = digits_dataset(20)
    state = torch.load(paths[0], weights_only=True)["state_dict"]
    prefixed = write_checkpoint(tmp_path / "prefixed.pt", {prefix + name: value for name, value in state.items()},
                                lr=LRS[0])

    plain = trace_self_influence(model, paths, data, tmp_path / "plain.h5")
    wrapped = trace_self_influence(model, [prefixed], data, tmp_path / "wrapped.h5")

    np.testing.assert_array_equal(wrapped.run.train["self_influence"], plain.run.train["self_influence"])


def test_missing_tensor_named(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    state = dict(model.state_dict())
    del state["fc2.bias"]
    path = write_checkpoint(tmp_path / "step=00000001.pt", state)

    with pytest.raises(CheckpointError) as raised:
        trace_self_influence(model, [path], digits_dataset(20), tmp_path / "run.h5")

    assert "'fc2.bias'" in str(raised.value)
    assert str(path) in str(raised.value)


def test_other_architecture_names_shapes(tmp_path):
    torch.manual_seed(0)
    path = write_checkpoint(tmp_path / "step=00000001.pt", TinyMLP(hidden=8).state_dict())

    with pytest.raises(CheckpointError) as raised:
        trace_self_influence(TinyMLP(hidden=16), [path], digits_dataset(20), tmp_path / "run.h5")

    message = str(raised.value)
    assert "'fc1.weight'" in message
    assert "(8, 64)" in message
    assert "(16, 64)" in message


def test_missing_lr_needs_explicit_lr(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP().double()
    recorded = save_checkpoints(model, tmp_path, [0.1])
    state = torch.load(recorded[0], weights_only=True)["state_dict"]
    unrecorded = write_checkpoint(tmp_path / "plain.pt", state, lr=None)
    data = digits_dataset(20, dtype=torch.float64)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    with pytest.raises(MissingLearningRateError) as raised:
        trace_self_influence(model, [unrecorded], data, out_dir / "missing.h5", dtype=torch.float64)
    explicit = trace_self_influence(model, [unrecorded], data, out_dir / "explicit.h5", lr=0.1, dtype=torch.float64)
    expected = trace_self_influence(model, recorded, data, out_dir / "recorded.h5", dtype=torch.float64)

    assert str(unrecorded) in str(raised.value)
    assert "lr=" in str(raised.value)
    assert not list(out_dir.glob("missing.h5*"))
    np.testing.assert_array_equal(explicit.run.train["self_influence"], expected.run.train["self_influence"])


@pytest.mark.parametrize("method", METHODS)
def test_batchnorm_buffers_byte_identical(tmp_path, method):
    torch.manual_seed(0)
    model = TinyBatchNormCNN()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.num_batches_tracked.fill_(11)
    paths = save_checkpoints(model, tmp_path, LRS)
    # The traced model is in train mode, as a LightningModule is during fit.
    model.train()
    buffers = {name: (buffer.dtype, buffer.numpy().tobytes()) for name, buffer in model.named_buffers()}

    trace_self_influence(model, paths, digits_dataset(24, image=True), tmp_path / "run.h5", batch_size=8,
                         method=method)

    assert {name: (buffer.dtype, buffer.numpy().tobytes()) for name, buffer in model.named_buffers()} == buffers
    assert model.training
    assert model.bn.training


def write_marker(path: str) -> str:
    Path(path).write_text("unpickling ran code")
    return path


class RunsCodeOnLoad:
    """Unpickling this object calls write_marker, standing in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return write_marker, (self.marker,)


def test_unsafe_checkpoint_not_executed(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    marker = tmp_path / "marker.txt"
    checkpoint_dir = tmp_path / "checkpoints"
    checkpoint_dir.mkdir()
    path = checkpoint_dir / "step=00000001.pt"
    torch.save({"state_dict": model.state_dict(), "lr": [0.1], "payload": RunsCodeOnLoad(marker)}, path)

    with pytest.raises(UnsafeCheckpointError) as raised:
        trace_self_influence(model, checkpoint_dir, digits_dataset(20), tmp_path / "run.h5")

    assert str(path) in str(raised.value)
    assert not marker.exists()
    # The file really runs code when loaded without weights_only.
    torch.load(path, weights_only=False)
    assert marker.exists()


# User errors in the Python API


def test_empty_train_set_rejected(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    paths = save_checkpoints(model, tmp_path, LRS)
    empty = TensorDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long))

    with pytest.raises(SelectionError, match="train set is empty"):
        trace_self_influence(model, paths, empty, tmp_path / "run.h5")

    assert output_files(tmp_path) == []


def test_out_of_range_test_index_rejected(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    paths = save_checkpoints(model, tmp_path, LRS[:1])
    train = digits_dataset(20)
    test = digits_dataset(10)
    store = tmp_path / "run.h5"
    trace_self_influence(model, paths, train, store)
    context = InfluenceContext.build(model, discover_checkpoints(paths))
    ensure_train_gradients(store, context, train)

    with pytest.raises(SelectionError) as raised:
        top_k_influence(store, context, test, [2, 999], k=3)

    assert "999" in str(raised.value)
    assert "0 to 9" in str(raised.value)


def test_missing_checkpoint_dir_rejected(tmp_path):
    missing = tmp_path / "missing"

    with pytest.raises(CheckpointNotFoundError) as raised:
        trace_self_influence(TinyMLP(), missing, digits_dataset(20), tmp_path / "run.h5")

    assert str(missing) in str(raised.value)
    assert "does not exist" in str(raised.value)


def test_empty_checkpoint_dir_rejected(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()

    with pytest.raises(CheckpointNotFoundError) as raised:
        trace_self_influence(TinyMLP(), empty, digits_dataset(20), tmp_path / "run.h5")

    assert str(empty) in str(raised.value)
    assert "contains no checkpoint" in str(raised.value)


def test_output_in_missing_directory_rejected(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    paths = save_checkpoints(model, tmp_path, LRS)
    out = tmp_path / "missing" / "run.h5"

    with pytest.raises(StoreError) as raised:
        trace_self_influence(model, paths, digits_dataset(20), out)

    assert str(out.parent) in str(raised.value)
    assert "does not exist" in str(raised.value)
    assert not out.parent.exists()


# Tied weights


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tied_weights_fall_back_to_vmap(tmp_path, dtype, caplog):
    torch.manual_seed(0)
    model = TiedOutput()
    paths = save_checkpoints(model, tmp_path, LRS)
    data = random_dataset(40, 6, 4, dtype=dtype)

    with caplog.at_level(logging.WARNING, logger="tracin.layer_gradients"):
        summary = trace_self_influence(model, paths, data, tmp_path / "run.h5", batch_size=16, dtype=dtype,
                                       method="auto")

    expected = brute_force_self_influence(TiedOutput, paths, LRS, random_dataset(40, 6, 4, dtype=torch.float64),
                                          tracked_names(model))
    rtol = RTOL_FLOAT64 if dtype == torch.float64 else RTOL_FLOAT32
    np.testing.assert_allclose(summary.run.train["self_influence"], expected, rtol=rtol)
    assert "embed.weight" in caplog.text
    assert "do not sum to the batch gradient" in caplog.text
