"""Random projections: the Kronecker path, unbiasedness, reproducibility and the projected store."""

import numpy as np
import pytest
import torch
from torch import nn

from helpers import SharedLinear, TinyBatchNormCNN, TinyMLP, digits_dataset, random_dataset, save_checkpoints
from tracin import discover_checkpoints, trace_self_influence
from tracin.gradients import make_gradient_computer
from tracin.influence import InfluenceContext, ensure_train_gradients, influence_matrix
from tracin.losses import CrossEntropyLoss
from tracin.passes import flatten_gradients
from tracin.projection import Projector, ProjectionSpec
from tracin.store import gradient_info


def projected(model, data, method, spec, position=0):
    model = model.double().eval()
    tracked = [name for name, _ in model.named_parameters()]
    computer = make_gradient_computer(model, CrossEntropyLoss(), tracked, method, Projector(model, tracked, spec))
    computer.start_checkpoint(position)
    batch = data[: len(data)]
    with torch.no_grad():
        return flatten_gradients(computer(computer.prepare(dict(model.named_parameters())), batch))


@pytest.mark.parametrize("factory,image", [(TinyMLP, False), (TinyBatchNormCNN, True)])
def test_kronecker_factors_equal_projected_gradient(factory, image):
    torch.manual_seed(0)
    model = factory()
    data = digits_dataset(12, image=image, dtype=torch.float64)
    spec = ProjectionSpec(dim=8, seed=3)

    from_factors = projected(model, data, "auto", spec)
    from_gradients = projected(model, data, "vmap", spec)

    torch.testing.assert_close(from_factors, from_gradients, rtol=1e-10, atol=1e-12)


def test_projection_to_full_dimension_is_identity():
    torch.manual_seed(0)
    model = TinyMLP()
    data = digits_dataset(6, dtype=torch.float64)
    exact = projected(model, data, "vmap", ProjectionSpec(dim=10**6))
    tracked = [name for name, _ in model.named_parameters()]
    computer = make_gradient_computer(model.double().eval(), CrossEntropyLoss(), tracked, "vmap")
    with torch.no_grad():
        full = flatten_gradients(computer(computer.prepare(dict(model.named_parameters())), data[:6]))
    torch.testing.assert_close(exact, full)


def test_projected_dot_products_unbiased():
    torch.manual_seed(0)
    model = SharedLinear()
    data = random_dataset(2, 4, 3, dtype=torch.float64)
    tracked = [name for name, _ in model.named_parameters()]
    computer = make_gradient_computer(model.double().eval(), CrossEntropyLoss(), tracked, "vmap")
    with torch.no_grad():
        full = flatten_gradients(computer(computer.prepare(dict(model.named_parameters())), data[:2]))
    exact = float(full[0] @ full[1])

    estimates = []
    for seed in range(400):
        grads = projected(model, data, "vmap", ProjectionSpec(dim=4, seed=seed))
        estimates.append(float(grads[0] @ grads[1]))
    estimates = np.array(estimates)

    standard_error = estimates.std() / np.sqrt(len(estimates))
    assert abs(estimates.mean() - exact) < 5 * standard_error
    assert estimates.std() > 0


def test_projection_reproducible_per_seed_and_checkpoint():
    torch.manual_seed(0)
    model = TinyMLP()
    data = digits_dataset(4, dtype=torch.float64)

    first = projected(model, data, "auto", ProjectionSpec(dim=16, seed=1), position=0)
    again = projected(model, data, "auto", ProjectionSpec(dim=16, seed=1), position=0)
    other_checkpoint = projected(model, data, "auto", ProjectionSpec(dim=16, seed=1), position=1)
    other_seed = projected(model, data, "auto", ProjectionSpec(dim=16, seed=2), position=0)

    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other_checkpoint)
    assert not torch.allclose(first, other_seed)


def test_projected_store_approximates_exact_influence(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP(hidden=64).double()
    paths = save_checkpoints(model, tmp_path, [0.1, 0.05])
    train = digits_dataset(40, dtype=torch.float64)
    exact_store = tmp_path / "exact.h5"
    trace_self_influence(model, paths, train, exact_store, dtype=torch.float64)
    projected_store = tmp_path / "projected.h5"
    trace_self_influence(model, paths, train, projected_store, dtype=torch.float64)

    exact_context = InfluenceContext.build(model, discover_checkpoints(paths), dtype=torch.float64)
    ensure_train_gradients(exact_store, exact_context, train, storage_dtype="float64")
    context = InfluenceContext.build(model, discover_checkpoints(paths), dtype=torch.float64,
                                     projection=ProjectionSpec(dim=2048, seed=0))
    ensure_train_gradients(projected_store, context, train, storage_dtype="float64")

    exact = influence_matrix(exact_store, exact_context, train, range(40))
    approx = influence_matrix(projected_store, context, train, range(40))

    info = gradient_info(projected_store)
    assert info["projection_dim"] == 2048
    assert info["n_params"] < sum(p.numel() for p in model.parameters())
    relative = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
    assert relative < 0.2
    assert np.corrcoef(np.diag(approx), np.diag(exact))[0, 1] > 0.95


def test_gradients_over_limit_are_projected(tmp_path, caplog):
    torch.manual_seed(0)
    model = TinyMLP(hidden=64)
    paths = save_checkpoints(model, tmp_path, [0.1])
    train = digits_dataset(20)
    store = tmp_path / "run.h5"
    trace_self_influence(model, paths, train, store)
    context = InfluenceContext.build(model, discover_checkpoints(paths))

    ensure_train_gradients(store, context, train, max_bytes=20 * 3000 * 4)

    assert context.projection == ProjectionSpec(1024, 0)
    assert gradient_info(store)["projection_dim"] == 1024
    assert "projecting them to 1024" in caplog.text


def test_projected_dims_respect_layer_shapes():
    model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 10))
    tracked = [name for name, _ in model.named_parameters()]

    sizes = dict(zip(tracked, Projector(model, tracked, ProjectionSpec(dim=256)).sizes()))

    assert sizes["0.weight"] <= 256
    assert sizes["0.bias"] == 256
    assert sizes["2.weight"] <= 256
    assert sizes["2.bias"] == 10
