"""Check TracInCP's estimates by counterfactual retraining.

TracInCP predicts that removing a test example's top proponents from the train
set raises that example's loss, and that removing the examples with the largest
self-influence (often mislabeled ones) changes the test metrics more than
removing as many random examples. This module retrains the run from scratch
(:func:`tracin.retrain.retrain`) to measure both, in three ways per seed:

- removing the examples that influence picks (top-K proponents, or top-K self-influence),
- removing K train examples drawn uniformly at random,
- removing nothing, the baseline that the other two are compared with.

The three ways of one seed share the seed, so they differ only by the removed
examples. A removal that helps the estimate shows up as a loss change that is
larger for the influence-picked examples than for the random ones.

Each finished retraining is journaled next to the store
(:mod:`tracin.verify_journal`), so the same call after an interruption skips
the retrainings already done.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tracin.errors import ConfigurationError
from tracin.influence import InfluenceContext, ensure_train_gradients, top_k_influence
from tracin.passes import ProgressCallback
from tracin.rebuild import RebuiltRun, rebuild_run
from tracin.retrain import evaluate, retrain, train_loader, trainer_settings
from tracin.selection import check_indices
from tracin.store import StoredRun, read_result, read_run
from tracin.verify_journal import RetrainingJournal

logger = logging.getLogger(__name__)

TEST_WAYS = ("proponents", "random", "none")
"""Order of the ways along axis 1 of :attr:`TestExampleVerification.loss`."""

OUTLIER_WAYS = ("outliers", "random", "none")
"""Order of the ways along axis 0 of :attr:`OutlierVerification.loss` and ``accuracy``."""


@dataclass
class TestExampleVerification:
    """Losses of test examples after retraining without their top-K proponents, K random examples, or nothing.

    Attributes:
        test_index: Dataset indices of the test examples, shape ``(n_test,)``.
        seeds: The seeds, shape ``(R,)``.
        proponent_removed: Top-K proponents of each test example, best first, shape ``(n_test, K)``.
        random_removed: Random train indices removed for each test example and seed, shape ``(n_test, R, K)``.
        loss: Loss of test example i after the retraining of way w (in :data:`TEST_WAYS` order)
            with seed r, at ``[i, w, r]``; shape ``(n_test, 3, R)``. The baseline column
            ``[:, 2, r]`` comes from one retraining per seed, shared by all test examples.
        test_label: Given labels of the test examples, ``(n_test,)``.
        k: Number of removed train examples per way.
        normalize: The proponents were ranked by cosine influence.
    """

    test_index: np.ndarray
    seeds: np.ndarray
    proponent_removed: np.ndarray
    random_removed: np.ndarray
    loss: np.ndarray
    test_label: np.ndarray
    k: int
    normalize: bool = False

    def loss_change(self) -> np.ndarray:
        """Return the loss change against the baseline, shape ``(n_test, 2, R)``: proponents, then random."""
        return self.loss[:, :2, :] - self.loss[:, 2:3, :]

    def proponents_beat_random(self) -> np.ndarray:
        """Return, per test example, whether removing proponents raised the loss more than random removal.

        The comparison is of the mean change over seeds. Shape ``(n_test,)``, bool.
        """
        change = self.loss_change().mean(axis=2)
        return change[:, 0] > change[:, 1]

    def arrays(self) -> dict[str, np.ndarray]:
        """Return the arrays to store, keyed by dataset name."""
        return {
            "test_index": self.test_index,
            "test_label": self.test_label,
            "seeds": self.seeds,
            "proponent_removed": self.proponent_removed,
            "random_removed": self.random_removed,
            "loss": self.loss,
        }


@dataclass
class OutlierVerification:
    """Test-split metrics after retraining without the top-K self-influence examples, K random ones, or nothing.

    Attributes:
        seeds: The seeds, shape ``(R,)``.
        outlier_removed: The K train examples with the largest self-influence, largest first, shape ``(K,)``.
        random_removed: Random train indices removed with each seed, shape ``(R, K)``.
        loss: Mean test loss after the retraining of way w (in :data:`OUTLIER_WAYS` order)
            with seed r, at ``[w, r]``; shape ``(3, R)``.
        accuracy: Test accuracy in ``[0, 1]`` at ``[w, r]``, shape ``(3, R)``; NaN when the
            test batches have no integer labels.
        n_test: Number of test examples evaluated.
    """

    seeds: np.ndarray
    outlier_removed: np.ndarray
    random_removed: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    n_test: int

    @property
    def k(self) -> int:
        """Number of removed train examples per way."""
        return len(self.outlier_removed)

    def arrays(self) -> dict[str, np.ndarray]:
        """Return the arrays to store, keyed by dataset name."""
        return {
            "seeds": self.seeds,
            "outlier_removed": self.outlier_removed,
            "random_removed": self.random_removed,
            "loss": self.loss,
            "accuracy": self.accuracy,
        }


def seed_list(seeds: int | Sequence[int]) -> np.ndarray:
    """Return seeds ``0 .. R-1`` for a count R, or the given seeds, as an int64 array of shape ``(R,)``.

    Raises:
        ConfigurationError: the count is below 1, or the list is empty or repeats a seed.
    """
    if isinstance(seeds, (int, np.integer)):
        if seeds < 1:
            raise ConfigurationError(f"{seeds} seeds is invalid. Pass a positive number of seeds, e.g. 3.")
        return np.arange(int(seeds), dtype=np.int64)
    array = np.asarray(seeds, dtype=np.int64).reshape(-1)
    if array.size == 0 or len(np.unique(array)) != array.size:
        raise ConfigurationError(f"seeds {array.tolist()} are invalid. Pass distinct seeds, e.g. [0, 1, 2].")
    return array


def check_removal_count(k: int, n_train: int) -> None:
    """Reject a number of removed examples outside ``1 <= K < n_train``.

    Raises:
        ConfigurationError: K is below 1, or removes the whole train set.
    """
    if not 1 <= k < n_train:
        raise ConfigurationError(
            f"removing K={k} train examples is invalid for a train set of {n_train}. "
            f"Pass 1 <= K <= {n_train - 1} so that some remain to train on."
        )


def random_removal(n_train: int, k: int, seed: int, test_index: int = -1) -> np.ndarray:
    """Draw K distinct train indices uniformly, reproducibly from the seed and the test example.

    Returns:
        The indices in draw order, shape ``(K,)``.
    """
    generator = np.random.default_rng([seed, test_index + 1])
    return generator.choice(n_train, size=k, replace=False).astype(np.int64)


class _Counter:
    """Count finished retrainings, journaled ones included, and report them to a progress callback."""

    def __init__(self, total: int, progress: ProgressCallback | None) -> None:
        self.total = total
        self.finished = 0
        self.progress = progress

    def step(self) -> None:
        self.finished += 1
        if self.progress is not None:
            self.progress(self.finished, self.total)


class _RunOpener:
    """Rebuild the run behind a store once, and check that its train split matches the store."""

    def __init__(self, run_dir: str | os.PathLike, store: str | os.PathLike) -> None:
        self.stored: StoredRun = read_run(store)
        self.config_text = self.stored.attrs.get("config") or None
        self.run: RebuiltRun = rebuild_run(run_dir, config_text=self.config_text)
        self.n_train = len(self.stored.train["index"])
        traced_dir = self.stored.attrs.get("checkpoint_dir")
        if traced_dir and os.path.realpath(traced_dir) != os.path.realpath(run_dir):
            logger.warning("%s was traced from %s, not from %s. Retraining the run in %s.",
                           store, traced_dir, run_dir, run_dir)
        n_loader = len(train_loader(self.run, run_dir).dataset)
        if n_loader != self.n_train:
            raise ConfigurationError(
                f"the datamodule's train_dataloader() has {n_loader} examples, but the store {store} scores "
                f"{self.n_train}. Retraining must use the same train set in the same order, so make "
                "trace_dataset('train') and train_dataloader() return the same examples."
            )


def verify_test_examples(
    run_dir: str | os.PathLike,
    store: str | os.PathLike,
    test_indices: Sequence[int] | np.ndarray,
    k: int,
    seeds: int | Sequence[int] = 3,
    *,
    context: InfluenceContext | None = None,
    normalize: bool = False,
    settings: Mapping[str, Any] | None = None,
    enable_progress_bar: bool = True,
    progress: ProgressCallback | None = None,
) -> TestExampleVerification:
    """Retrain without each test example's top-K proponents, without K random examples, and without none.

    Training runs: one baseline per seed, plus two per test example and seed, so
    ``R * (1 + 2 * n_test)`` in all.

    Args:
        run_dir: The run's checkpoint directory, written by ``TracInCheckpoint``.
        store: The run's HDF5 store, written by ``tracin score``.
        test_indices: Dataset indices of test examples, shape ``(n_test,)``.
        k: Number of train examples to remove per way.
        seeds: Number of seeds R (seeds 0 to R-1), or the seeds themselves.
        context: Influence context of the store, with its train gradients already stored
            (see :func:`tracin.influence.ensure_train_gradients`). None builds one from the
            store with the default loss, and computes and stores the train gradients if missing.
        normalize: Rank proponents by cosine influence.
        settings: ``pl.Trainer`` settings that replace the recorded ones, e.g. ``{"accelerator": "cpu"}``.
        enable_progress_bar: Show Lightning's progress bar during each ``fit``.
        progress: Called with ``(finished runs, total runs)`` after each retraining.

    Returns:
        A :class:`TestExampleVerification` with losses of shape ``(n_test, 3, R)``.

    Raises:
        StoreError: the store is missing or incomplete.
        SelectionError: a test index is out of range.
        ConfigurationError: K is not in ``1 <= K < n_train``, or the run cannot be retrained.
    """
    opened = _RunOpener(run_dir, store)
    test = opened.run.dataset("test")
    indices = check_indices(test_indices, len(test))
    check_removal_count(k, opened.n_train)
    seed_array = seed_list(seeds)
    resolved = trainer_settings(opened.run.manifest, run_dir, settings)

    if context is None:
        context = InfluenceContext.from_store(opened.stored, opened.run.model)
        ensure_train_gradients(store, context, opened.run.dataset("train"))
    top = top_k_influence(store, context, test, indices, k=k, normalize=normalize)

    n_test, n_seeds = len(indices), len(seed_array)
    random_removed = np.empty((n_test, n_seeds, k), dtype=np.int64)
    loss = np.full((n_test, len(TEST_WAYS), n_seeds), np.nan)
    journal = RetrainingJournal(store, {
        "mode": "test_examples", "k": k, "normalize": normalize, "seeds": seed_array.tolist(),
        "test_index": indices.tolist(), "proponents": top.proponent_index.tolist(), "settings": resolved,
        "n_train": opened.n_train,
    })
    counter = _Counter(n_seeds * (1 + 2 * n_test), progress)

    def retrained_losses(entry: str, removed: np.ndarray, seed: int, evaluated: np.ndarray) -> list[float]:
        def compute() -> list[float]:
            model = retrain(run_dir, removed, seed, config_text=opened.config_text, settings=resolved,
                            enable_progress_bar=enable_progress_bar).model
            return evaluate(model, test, evaluated)[0].tolist()

        values = journal.result(entry, compute)
        counter.step()
        return values

    for column, seed in enumerate(seed_array.tolist()):
        loss[:, 2, column] = retrained_losses(f"seed={seed}/baseline", np.empty(0, dtype=np.int64), seed, indices)
        for row, test_index in enumerate(indices.tolist()):
            random_removed[row, column] = random_removal(opened.n_train, k, seed, test_index)
            for way, removed in ((0, top.proponent_index[row]), (1, random_removed[row, column])):
                entry = f"seed={seed}/test={test_index}/{TEST_WAYS[way]}"
                loss[row, way, column] = retrained_losses(entry, removed, seed, np.array([test_index]))[0]
        logger.debug("seed %d done: %d of %d retrainings", seed, counter.finished, counter.total)
    journal.remove()

    return TestExampleVerification(
        test_index=indices,
        seeds=seed_array,
        proponent_removed=top.proponent_index.astype(np.int64),
        random_removed=random_removed,
        loss=loss,
        test_label=top.test_label,
        k=k,
        normalize=normalize,
    )


def top_self_influence(stored: StoredRun, k: int) -> np.ndarray:
    """Return the K train indices with the largest self-influence, largest first, skipping NaN scores.

    Raises:
        ConfigurationError: fewer than K train examples have a finite score.
    """
    scores = np.asarray(stored.train["self_influence"], dtype=np.float64)
    finite = np.isfinite(scores)
    if finite.sum() < k:
        raise ConfigurationError(
            f"only {int(finite.sum())} of {len(scores)} train examples have a finite self-influence in "
            f"{stored.path}, fewer than K={k}. Pass a smaller K."
        )
    order = np.argsort(-np.where(finite, scores, -np.inf), kind="stable")
    return order[:k].astype(np.int64)


def verify_outliers(
    run_dir: str | os.PathLike,
    store: str | os.PathLike,
    k: int,
    seeds: int | Sequence[int] = 3,
    *,
    settings: Mapping[str, Any] | None = None,
    enable_progress_bar: bool = True,
    progress: ProgressCallback | None = None,
) -> OutlierVerification:
    """Retrain without the top-K self-influence examples, without K random examples, and without none.

    Each retraining is evaluated on the whole test split. Training runs: ``3 * R``.

    Args:
        run_dir: The run's checkpoint directory, written by ``TracInCheckpoint``.
        store: The run's HDF5 store with self-influence, written by ``tracin score``.
        k: Number of train examples to remove per way.
        seeds: Number of seeds R (seeds 0 to R-1), or the seeds themselves.
        settings: ``pl.Trainer`` settings that replace the recorded ones.
        enable_progress_bar: Show Lightning's progress bar during each ``fit``.
        progress: Called with ``(finished runs, total runs)`` after each retraining.

    Returns:
        An :class:`OutlierVerification` with loss and accuracy of shape ``(3, R)``.

    Raises:
        StoreError: the store is missing or incomplete.
        ConfigurationError: K is not in ``1 <= K < n_train``, or the run cannot be retrained.
    """
    opened = _RunOpener(run_dir, store)
    check_removal_count(k, opened.n_train)
    outliers = top_self_influence(opened.stored, k)
    seed_array = seed_list(seeds)
    resolved = trainer_settings(opened.run.manifest, run_dir, settings)
    test = opened.run.dataset("test")

    n_seeds = len(seed_array)
    random_removed = np.empty((n_seeds, k), dtype=np.int64)
    loss = np.full((len(OUTLIER_WAYS), n_seeds), np.nan)
    accuracy = np.full((len(OUTLIER_WAYS), n_seeds), np.nan)
    journal = RetrainingJournal(store, {
        "mode": "outliers", "k": k, "seeds": seed_array.tolist(), "outliers": outliers.tolist(),
        "settings": resolved, "n_train": opened.n_train,
    })
    counter = _Counter(len(OUTLIER_WAYS) * n_seeds, progress)
    for column, seed in enumerate(seed_array.tolist()):
        random_removed[column] = random_removal(opened.n_train, k, seed)
        ways = (outliers, random_removed[column], np.empty(0, dtype=np.int64))
        for way, removed in enumerate(ways):
            def compute(removed: np.ndarray = removed, seed: int = seed) -> list[float]:
                model = retrain(run_dir, removed, seed, config_text=opened.config_text, settings=resolved,
                                enable_progress_bar=enable_progress_bar).model
                losses, correct = evaluate(model, test)
                return [losses.mean(), correct.mean()]

            loss[way, column], accuracy[way, column] = journal.result(f"seed={seed}/{OUTLIER_WAYS[way]}", compute)
            counter.step()
    journal.remove()

    return OutlierVerification(
        seeds=seed_array,
        outlier_removed=outliers,
        random_removed=random_removed,
        loss=loss,
        accuracy=accuracy,
        n_test=len(test),
    )



def read_verification(store: str | os.PathLike, name: str) -> TestExampleVerification | OutlierVerification:
    """Read a result that ``tracin verify`` stored, e.g. ``verify/0000``, back into its dataclass.

    Raises:
        StoreError: the store has no result ``name``.
        ConfigurationError: ``name`` is not a verify result.
    """
    arrays, attrs = read_result(store, name)
    mode = attrs.get("mode")
    if mode == "test_examples":
        return TestExampleVerification(
            test_index=arrays["test_index"], seeds=arrays["seeds"], proponent_removed=arrays["proponent_removed"],
            random_removed=arrays["random_removed"], loss=arrays["loss"], test_label=arrays["test_label"],
            k=int(attrs["k"]), normalize=bool(attrs.get("normalize", False)),
        )
    if mode == "outliers":
        # Results stored before n_test was recorded read as -1.
        return OutlierVerification(
            seeds=arrays["seeds"], outlier_removed=arrays["outlier_removed"], random_removed=arrays["random_removed"],
            loss=arrays["loss"], accuracy=arrays["accuracy"], n_test=int(attrs.get("n_test", -1)),
        )
    raise ConfigurationError(f"{name} in {store} is not a 'tracin verify' result (mode {mode!r}). "
                             "Pass a name that starts with verify/.")
