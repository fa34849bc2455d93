"""``tracin verify``: counterfactual retraining on a real Lightning run of the digits demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import matplotlib.image
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from tracin import commands, read_run, trace_self_influence
from tracin.callbacks import TracInCheckpoint
from tracin.cli import build_parser, make_progress
from tracin.demo import MLP, ImageClassificationDataModule
from tracin.errors import ConfigurationError, SelectionError, StoreError
from tracin.manifest import MANIFEST_NAME, Manifest, read_manifest
from tracin.rebuild import rebuild_run
from tracin.retrain import kept_indices, retrain, subset_loader, train_loader, trainer_settings
from tracin.store import append_result, list_results, read_result
from tracin import verify as verify_api
from tracin.verify import OUTLIER_WAYS, OutlierVerification, read_verification, verify_outliers, verify_test_examples
from tracin.verify_plot import MAX_THUMBNAILS, write_outlier_figure, write_test_example_figure

pytestmark = pytest.mark.filterwarnings(
    "ignore:The '?train_dataloader'? does not have many workers",
    "ignore:The number of training batches",
    "ignore:.*LeafSpec.*is deprecated",
)

N_TRAIN = 200
N_TEST = 20
BATCH_SIZE = 32
EPOCHS = 2
K = 5
CLI_TIMEOUT_S = 180
REMOVED = [3, 17, 64, 150, 199]


class ExampleCounter(pl.Callback):
    """Count the train examples that fit trains on, from the label count of every train batch."""

    def __init__(self) -> None:
        self.examples = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.examples += len(batch[1])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 2-epoch fit of the demo MLP on 200 digits with TracInCheckpoint, scored into tracin.h5."""
    directory = tmp_path_factory.mktemp("verify") / "run"
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TracInCheckpoint(dirpath=directory)],
    )
    data = ImageClassificationDataModule(dataset="digits", train_size=N_TRAIN, test_size=N_TEST, batch_size=BATCH_SIZE)
    trainer.fit(MLP(image_size=8, hidden=16), datamodule=data)
    run = rebuild_run(directory)
    trace_self_influence(run.model, directory, run.dataset("train"), directory / "tracin.h5",
                         run_info={"checkpoint_dir": str(directory), "config": ""})
    return directory


def test_manifest_records_trainer_settings(run_dir):
    settings = read_manifest(run_dir).trainer

    assert settings["max_epochs"] == EPOCHS
    assert settings["max_steps"] == -1
    assert settings["accumulate_grad_batches"] == 1
    assert settings["gradient_clip_val"] is None
    assert settings["precision"] == "32-true"
    assert settings["accelerator"] == "cpu"


def test_old_manifest_without_trainer_reads(run_dir, tmp_path):
    data = json.loads((run_dir / MANIFEST_NAME).read_text())
    del data["trainer"]

    manifest = Manifest.from_dict(data)

    assert manifest.trainer is None
    with pytest.raises(ConfigurationError, match="records no Trainer settings"):
        trainer_settings(manifest, tmp_path)
    assert trainer_settings(manifest, tmp_path, {"max_epochs": 1}) == {"max_epochs": 1}


def test_retrain_skips_exactly_removed_examples(run_dir):
    counter = ExampleCounter()

    retrained = retrain(run_dir, REMOVED, seed=0, callbacks=[counter], enable_progress_bar=False)

    remaining = retrained.loader.dataset.indices
    assert len(remaining) == N_TRAIN - len(REMOVED)
    assert set(remaining) == set(range(N_TRAIN)) - set(REMOVED)
    assert retrained.loader.batch_size == BATCH_SIZE
    assert counter.examples == EPOCHS * (N_TRAIN - len(REMOVED))


def test_same_seed_reproduces_model(run_dir):
    first = retrain(run_dir, REMOVED, seed=1, enable_progress_bar=False).model.state_dict()
    second = retrain(run_dir, REMOVED, seed=1, enable_progress_bar=False).model.state_dict()

    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_subset_loader_keeps_settings_and_seeded_order(run_dir):
    loader = train_loader(rebuild_run(run_dir), run_dir)
    remaining = kept_indices(N_TRAIN, REMOVED)

    first = subset_loader(loader, remaining, seed=3)
    second = subset_loader(loader, remaining, seed=3)

    assert first.collate_fn is loader.collate_fn
    assert first.num_workers == loader.num_workers
    assert torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in second]))


def test_outliers_removes_top_self_influence(run_dir):
    result = verify_outliers(run_dir, run_dir / "tracin.h5", K, seeds=1, enable_progress_bar=False)

    scores = read_run(run_dir / "tracin.h5").train["self_influence"]
    expected = np.argsort(-scores, kind="stable")[:K]
    np.testing.assert_array_equal(result.outlier_removed, expected)
    assert result.random_removed.shape == (1, K)
    assert result.loss.shape == (len(OUTLIER_WAYS), 1)
    assert np.isfinite(result.loss).all()
    assert ((result.accuracy >= 0) & (result.accuracy <= 1)).all()


@pytest.mark.parametrize(
    ("test_indices", "k", "error", "match"),
    [
        ([N_TEST], K, SelectionError, "out of range"),
        ([0], N_TRAIN, ConfigurationError, "K=200"),
        ([0], 0, ConfigurationError, "K=0"),
    ],
)
def test_verify_rejects_bad_input(run_dir, test_indices, k, error, match):
    with pytest.raises(error, match=match):
        verify_test_examples(run_dir, run_dir / "tracin.h5", test_indices, k, seeds=1)


def test_verify_rejects_missing_store(run_dir, tmp_path):
    with pytest.raises(StoreError, match="not found"):
        verify_test_examples(run_dir, tmp_path / "missing.h5", [0], K, seeds=1)


def run_cli(*args) -> subprocess.CompletedProcess:
    """Run ``python -m tracin.cli ARGS`` with a wide terminal, so rich does not truncate the table."""
    return subprocess.run(
        [sys.executable, "-m", "tracin.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=CLI_TIMEOUT_S,
    )


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit code {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


def test_cli_verify_stores_result(run_dir):
    store = run_dir / "tracin.h5"
    before = list_results(store, "verify")

    png = run_dir.parent / "verify.png"
    result = run_cli("verify", run_dir, "--test", "0", "--remove", K, "--seeds", 1, "--png", png)

    assert result.returncode == 0, describe(result)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Δ loss, top-K proponents removed" in result.stdout, describe(result)
    assert "of 1 test examples" in " ".join(result.stdout.split()), describe(result)
    name = f"verify/{len(before):04d}"
    assert list_results(store, "verify") == [*before, name]
    arrays, attrs = read_result(store, name)
    assert attrs["mode"] == "test_examples"
    assert arrays["loss"].shape == (1, 3, 1)
    assert arrays["proponent_removed"].shape == (1, K)
    assert arrays["random_removed"].shape == (1, 1, K)
    assert np.isfinite(arrays["loss"]).all()
    with h5py.File(store, "r") as file:
        assert "verify/0000" in file
    read_back = read_verification(store, name)
    assert read_back.k == K
    np.testing.assert_array_equal(read_back.loss, arrays["loss"])
    np.testing.assert_array_equal(read_back.test_index, [0])


def test_read_verification_rejects_other_result(run_dir, tmp_path):
    store = tmp_path / "tracin.h5"
    store.write_bytes((run_dir / "tracin.h5").read_bytes())
    name = append_result(store, "influence", {"scores": np.zeros(3)}, {"mode": "top_k"})

    with pytest.raises(ConfigurationError, match="is not a 'tracin verify' result"):
        read_verification(store, name)


def test_cli_verify_rejects_large_k(run_dir):
    result = run_cli("verify", run_dir, "--test", "0", "--remove", N_TRAIN)

    assert result.returncode == 2, describe(result)
    assert "Pass 1 <= K <= 199" in " ".join(result.stderr.split()), describe(result)
    assert "Traceback" not in result.stderr, describe(result)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--remove-outliers", "5", "--test", "0"], "separate check"),
        (["--test", "0"], "needs --test SELECTION together with --remove K"),
        (["--remove", "5"], "needs --test SELECTION together with --remove K"),
    ],
)
def test_verify_command_rejects_mixed_modes(run_dir, args, message):
    parsed = build_parser().parse_args(["verify", str(run_dir), *args])

    with pytest.raises(ConfigurationError, match=message):
        commands.verify(parsed, make_progress)


def copy_run(run_dir: Path, target: Path, keep_trainer: bool = True) -> Path:
    """Copy the checkpoints and manifest of ``run_dir`` (not its store) into ``target``."""
    target.mkdir()
    for path in run_dir.glob("*.pt"):
        (target / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((run_dir / MANIFEST_NAME).read_text())
    if not keep_trainer:
        del manifest["trainer"]
    (target / MANIFEST_NAME).write_text(json.dumps(manifest))
    return target


def test_missing_trainer_settings_fail_early(run_dir, tmp_path):
    copy = copy_run(run_dir, tmp_path / "old_run", keep_trainer=False)
    run = rebuild_run(copy)
    store = copy / "tracin.h5"
    trace_self_influence(run.model, copy, run.dataset("train"), store,
                         run_info={"checkpoint_dir": str(copy), "config": ""})
    parsed = build_parser().parse_args(["verify", str(copy), "--test", "0", "--remove", str(K)])

    with pytest.raises(ConfigurationError, match="records no Trainer settings"):
        commands.verify(parsed, make_progress)

    with h5py.File(store, "r") as file:
        assert "gradients" not in file


def test_verify_points_to_store_beside_run_dir(run_dir, tmp_path):
    copy = copy_run(run_dir, tmp_path / "checkpoints")
    beside = tmp_path / "tracin.h5"
    beside.write_bytes((run_dir / "tracin.h5").read_bytes())
    parsed = build_parser().parse_args(["verify", str(copy), "--test", "0", "--remove", str(K)])

    with pytest.raises(ConfigurationError, match=f"Pass it with --store {beside}"):
        commands.verify(parsed, make_progress)


def synthetic_test_result(n_test: int, seeds: int = 2) -> verify_api.TestExampleVerification:
    """A verification result with made-up losses, for the figures."""
    generator = np.random.default_rng(0)
    # Imported through the module, so pytest does not collect the class as a test.
    return verify_api.TestExampleVerification(
        test_index=np.arange(n_test), seeds=np.arange(seeds),
        proponent_removed=np.zeros((n_test, K), dtype=np.int64),
        random_removed=np.zeros((n_test, seeds, K), dtype=np.int64),
        loss=generator.uniform(0.0, 2.0, size=(n_test, 3, seeds)), test_label=np.zeros(n_test, dtype=np.int64), k=K,
    )


@pytest.mark.parametrize("n_test", [3, MAX_THUMBNAILS + 1])
def test_test_example_figure_size(run_dir, tmp_path, n_test):
    test_data = rebuild_run(run_dir).dataset("test")

    path = write_test_example_figure(synthetic_test_result(n_test), test_data, tmp_path / "verify.png")

    height, width, _ = matplotlib.image.imread(path).shape
    if n_test <= MAX_THUMBNAILS:
        assert width == round(110 * (1.9 * n_test + 0.8))
        assert height == round(110 * 4.6)
    else:
        assert (width, height) == (round(110 * 5.5), round(110 * 5.0))


def test_outlier_figure_written(tmp_path):
    result = OutlierVerification(
        seeds=np.arange(2), outlier_removed=np.arange(K), random_removed=np.zeros((2, K), dtype=np.int64),
        loss=np.array([[0.5, 0.6], [0.4, 0.45], [0.41, 0.42]]),
        accuracy=np.array([[0.8, 0.82], [0.85, 0.84], [0.86, 0.85]]), n_test=N_TEST,
    )

    path = write_outlier_figure(result, tmp_path / "outliers.png")

    height, width, _ = matplotlib.image.imread(path).shape
    assert (width, height) == (round(110 * 6.4), round(110 * 3.2))


class Interrupt(Exception):
    """Raised by a progress callback to stop a verify run between retrainings."""


def stop_after(count: int):
    def progress(done: int, total: int) -> None:
        if done == count:
            raise Interrupt(f"stopped after {done} of {total}")

    return progress


def count_retrainings(monkeypatch) -> list[int]:
    """Count calls of tracin.verify.retrain from now on; return the list that collects them."""
    calls: list[int] = []
    original = verify_api.retrain

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(verify_api, "retrain", counted)
    return calls


def store_copy(run_dir: Path, target: Path) -> Path:
    target.write_bytes((run_dir / "tracin.h5").read_bytes())
    return target


def test_interrupted_verify_resumes_same_losses(run_dir, tmp_path, monkeypatch):
    reference = verify_test_examples(run_dir, store_copy(run_dir, tmp_path / "reference.h5"), [0], K, seeds=1,
                                     enable_progress_bar=False)
    store = store_copy(run_dir, tmp_path / "tracin.h5")
    with pytest.raises(Interrupt):
        verify_test_examples(run_dir, store, [0], K, seeds=1, enable_progress_bar=False, progress=stop_after(2))
    journals = list(tmp_path.glob("tracin.h5.verify-*.json"))
    assert len(journals) == 1
    assert len(json.loads(journals[0].read_text())["entries"]) == 2

    calls = count_retrainings(monkeypatch)
    resumed = verify_test_examples(run_dir, store, [0], K, seeds=1, enable_progress_bar=False)

    assert len(calls) == 1
    np.testing.assert_array_equal(resumed.loss, reference.loss)
    assert not list(tmp_path.glob("tracin.h5.verify-*"))


def test_interrupted_outlier_verify_resumes(run_dir, tmp_path, monkeypatch):
    store = store_copy(run_dir, tmp_path / "tracin.h5")
    with pytest.raises(Interrupt):
        verify_outliers(run_dir, store, K, seeds=1, enable_progress_bar=False, progress=stop_after(1))

    calls = count_retrainings(monkeypatch)
    resumed = verify_outliers(run_dir, store, K, seeds=1, enable_progress_bar=False)

    assert len(calls) == 2
    assert np.isfinite(resumed.loss).all()
    assert not list(tmp_path.glob("tracin.h5.verify-*"))


def test_verify_with_other_k_ignores_journal(run_dir, tmp_path, monkeypatch):
    store = store_copy(run_dir, tmp_path / "tracin.h5")
    with pytest.raises(Interrupt):
        verify_test_examples(run_dir, store, [0], K, seeds=1, enable_progress_bar=False, progress=stop_after(2))

    calls = count_retrainings(monkeypatch)
    verify_test_examples(run_dir, store, [0], K + 1, seeds=1, enable_progress_bar=False)

    assert len(calls) == 3
    assert len(list(tmp_path.glob("tracin.h5.verify-*.json"))) == 1


@pytest.mark.parametrize(
    ("accelerator", "message"),
    [
        ("tpu", r"accelerator 'tpu' \(passed\) is not available here"),
        ("foo", r"accelerator 'foo' \(passed\) is not one that pl.Trainer accepts"),
        pytest.param("gpu", r"accelerator 'gpu' \(passed\) needs CUDA or MPS",
                     marks=pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(),
                                              reason="this machine has a GPU")),
    ],
)
def test_unavailable_accelerator_rejected(run_dir, accelerator, message):
    with pytest.raises(ConfigurationError, match=message):
        trainer_settings(read_manifest(run_dir), run_dir, {"accelerator": accelerator})


def test_cpu_accelerator_override_kept(run_dir):
    settings = trainer_settings(read_manifest(run_dir), run_dir, {"accelerator": "cpu"})

    assert settings["accelerator"] == "cpu"
    assert settings["max_epochs"] == EPOCHS


def test_read_run_directory_rejected(tmp_path):
    expected = f"is a directory. Pass the file that 'tracin score' wrote, e.g. {tmp_path / 'tracin.h5'}"

    with pytest.raises(StoreError, match=expected):
        read_run(tmp_path)


class CtrlC(pl.Callback):
    """Raise KeyboardInterrupt at the third train batch, as Ctrl-C does."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 2:
            raise KeyboardInterrupt


def test_ctrl_c_in_fit_raises(run_dir):
    handler = signal.getsignal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="retraining with seed 0 was interrupted"):
        retrain(run_dir, REMOVED, seed=0, callbacks=[CtrlC()], enable_progress_bar=False)

    assert signal.getsignal(signal.SIGINT) is handler
