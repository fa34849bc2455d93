"""Influence, proponents, opponents and importance against brute-force references."""

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from helpers import (
    RTOL_FLOAT64,
    TinyMLP,
    brute_force_influence,
    digits_dataset,
    save_checkpoints,
    train_checkpoints,
)
from tracin import discover_checkpoints, trace_self_influence
from tracin.errors import SelectionError
from tracin.influence import (
    InfluenceContext,
    ensure_train_gradients,
    importance,
    influence_matrix,
    top_k_influence,
)
from tracin.selection import parse_selection

LRS = [0.1, 0.05, 0.01]


def traced_run(tmp_path, train, lrs=LRS, seed=0, trained=False, steps=5):
    torch.manual_seed(seed)
    model = TinyMLP().double()
    directory = tmp_path / f"checkpoints-{seed}-{lrs[0]}-{trained}"
    directory.mkdir()
    if trained:
        paths = train_checkpoints(model, train, directory, lrs, steps=steps)
    else:
        paths = save_checkpoints(model, directory, lrs)
    store = directory / "run.h5"
    trace_self_influence(model, paths, train, store, batch_size=16, dtype=torch.float64)
    context = InfluenceContext.build(model, discover_checkpoints(paths), dtype=torch.float64, batch_size=16)
    ensure_train_gradients(store, context, train, storage_dtype="float64")
    return model, paths, store, context


def test_matrix_matches_brute_force(tmp_path):
    train = digits_dataset(30, dtype=torch.float64)
    test = TensorDataset(*[t[30:40] for t in digits_dataset(40, dtype=torch.float64).tensors])
    model, paths, store, context = traced_run(tmp_path, train)
    names = [name for name, _ in model.named_parameters()]

    matrix = influence_matrix(store, context, test, range(10))

    expected = brute_force_influence(lambda: TinyMLP(), paths, LRS, train, test, names)
    np.testing.assert_allclose(matrix, expected, rtol=RTOL_FLOAT64, atol=1e-12)


def test_train_matrix_symmetric_with_self_influence_diagonal(tmp_path):
    train = digits_dataset(30, dtype=torch.float64)
    _, _, store, context = traced_run(tmp_path, train)
    from tracin import read_run

    matrix = influence_matrix(store, context, train, range(30))

    np.testing.assert_allclose(matrix, matrix.T, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.diag(matrix), read_run(store).train["self_influence"], rtol=RTOL_FLOAT64)


def test_top_k_equals_argsort_of_full_matrix(tmp_path):
    train = digits_dataset(60, dtype=torch.float64)
    _, _, store, context = traced_run(tmp_path, train)
    test = digits_dataset(80, dtype=torch.float64)
    selection = np.arange(60, 80)

    top = top_k_influence(store, context, test, selection, k=5, block_size=7)

    matrix = influence_matrix(store, context, test, selection)
    np.testing.assert_array_equal(top.proponent_index, np.argsort(-matrix, axis=1)[:, :5])
    np.testing.assert_array_equal(top.opponent_index, np.argsort(matrix, axis=1)[:, :5])
    np.testing.assert_allclose(top.proponent_score, np.sort(matrix, axis=1)[:, ::-1][:, :5], rtol=1e-12)
    assert top.proponent_index.shape == (20, 5)
    assert top.test_label.tolist() == test.tensors[1][60:80].tolist()


def copies_run(tmp_path):
    """Train set: 50 digits, then exact copies of 5 test digits, then the same 5 images relabeled."""
    x, y = digits_dataset(60, dtype=torch.float64).tensors
    test_x, test_y = x[50:55], y[50:55]
    wrong_y = (test_y + 1) % 10
    train = TensorDataset(torch.cat([x[:50], test_x, test_x]), torch.cat([y[:50], test_y, wrong_y]))
    test = TensorDataset(test_x, test_y)
    _, _, store, context = traced_run(tmp_path, train, lrs=[0.5, 0.2, 0.1], trained=True, steps=40)
    return train, test, store, context


def test_copy_is_top_proponent_normalized(tmp_path):
    _, test, store, context = copies_run(tmp_path)

    top = top_k_influence(store, context, test, range(5), k=3, normalize=True)

    assert top.proponent_index[:, 0].tolist() == list(range(50, 55))
    assert top.opponent_index[:, 0].tolist() == list(range(55, 60))
    np.testing.assert_allclose(top.proponent_score[:, 0], 0.5 + 0.2 + 0.1, rtol=1e-12)


def test_copy_outranked_only_by_larger_gradients_raw(tmp_path):
    """With raw dot products a train example can outrank an exact copy only through a larger gradient norm."""
    train, test, store, context = copies_run(tmp_path)
    from tracin import read_run

    top = top_k_influence(store, context, test, range(5), k=3)
    self_influence = read_run(store).train["self_influence"]

    for row in range(5):
        copy = 50 + row
        copy_score = influence_matrix(store, context, test, [row])[0, copy]
        np.testing.assert_allclose(copy_score, self_influence[copy], rtol=1e-12)
        winner = top.proponent_index[row, 0]
        assert winner == copy or self_influence[winner] > self_influence[copy]
    assert (top.opponent_index[:, 0] >= 55).all()


def test_scaling_learning_rates_scales_scores(tmp_path):
    train = digits_dataset(30, dtype=torch.float64)
    _, _, store, context = traced_run(tmp_path, train, lrs=LRS)
    _, _, store10, context10 = traced_run(tmp_path, train, lrs=[10 * lr for lr in LRS])

    base = influence_matrix(store, context, train, range(30))
    scaled = influence_matrix(store10, context10, train, range(30))

    np.testing.assert_allclose(scaled, 10 * base, rtol=RTOL_FLOAT64, atol=1e-13 * np.abs(base).max())


def test_importance_sums_influence_over_split(tmp_path):
    train = digits_dataset(30, dtype=torch.float64)
    _, _, store, context = traced_run(tmp_path, train)
    against = TensorDataset(*[t[30:45] for t in digits_dataset(45, dtype=torch.float64).tensors])

    scores = importance(store, context, against)

    expected = influence_matrix(store, context, against, range(15)).sum(axis=0)
    np.testing.assert_allclose(scores, expected, rtol=1e-10)
    assert scores.shape == (30,)


def test_normalized_scores_are_bounded_by_lr_sum(tmp_path):
    train = digits_dataset(30, dtype=torch.float64)
    _, _, store, context = traced_run(tmp_path, train)

    matrix = influence_matrix(store, context, train, range(30), normalize=True)

    np.testing.assert_allclose(np.diag(matrix), sum(LRS), rtol=1e-12)
    assert np.abs(matrix).max() <= sum(LRS) * (1 + 1e-12)


@pytest.mark.parametrize("text", ["30", "5:3", "", " , ", "-1", "a:b", "0:31"])
def test_bad_selection_rejected(text):
    with pytest.raises(SelectionError) as error:
        parse_selection(text, 30)
    assert repr(text.strip()) in str(error.value) or "out of range" in str(error.value)


@pytest.mark.parametrize(("text", "message"), [("5:5", "selects nothing"), ("5:3", "selects nothing"),
                                                ("25:31", "is out of range for the test split of 30")])
def test_bad_range_message_names_problem(text, message):
    with pytest.raises(SelectionError, match=message):
        parse_selection(text, 30)


def test_selection_parses_ranges_and_indices():
    assert parse_selection("3,10:13,3", 30).tolist() == [3, 10, 11, 12]
    assert parse_selection(":2", 30).tolist() == [0, 1]
    assert parse_selection("all", 3).tolist() == [0, 1, 2]


def test_out_of_range_python_selection_rejected(tmp_path):
    train = digits_dataset(30, dtype=torch.float64)
    _, _, store, context = traced_run(tmp_path, train)
    with pytest.raises(SelectionError, match="out of range"):
        top_k_influence(store, context, train, [0, 30], k=3)
    with pytest.raises(SelectionError, match="empty"):
        top_k_influence(store, context, train, [], k=3)
