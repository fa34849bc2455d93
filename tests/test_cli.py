"""The ``tracin`` command line, run as a subprocess on a real Lightning run of the digits demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers_lightning import SingleLogitClassifier, make_dataset
from torch.utils.data import DataLoader, TensorDataset

from tracin import read_run
from tracin.callbacks import TracInCheckpoint
from tracin.demo import MLP, ImageClassificationDataModule
from tracin.store import read_result

pytestmark = pytest.mark.filterwarnings(
    "ignore:The '?train_dataloader'? does not have many workers",
    "ignore:The number of training batches",
    "ignore:.*LeafSpec.*is deprecated",
)

CLI_TIMEOUT_S = 120
TOP = 5
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TESTS_DIR = Path(__file__).parent
# The table prints self-influence with 6 significant digits.
TABLE_RTOL = 1e-5


def run_cli(*args, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m tracin.cli ARGS`` with a wide terminal, so rich does not truncate table cells."""
    env = {**os.environ, "COLUMNS": "200"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "tracin.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=CLI_TIMEOUT_S,
    )


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit code {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


def one_line(text: str) -> str:
    """Join rich's wrapped lines, so a message can be searched as one sentence."""
    return " ".join(text.split())


def table_rows(stdout: str) -> list[list[str]]:
    """Return the cells of each data row of a rich table: rows whose first cell is a rank."""
    rows = []
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if len(cells) > 1 and cells[0].isdigit():
            rows.append(cells)
    return rows


def top_rows(store: Path, top: int = TOP) -> list[dict]:
    """Return the store's ``top`` rows by descending self-influence, read with h5py through read_run."""
    train = read_run(store).train
    order = np.argsort(-train["self_influence"], kind="stable")[:top]
    return [
        {
            "index": int(train["index"][position]),
            "label": int(train["label"][position]),
            "prediction": int(train["prediction"][position]),
            "self_influence": float(train["self_influence"][position]),
        }
        for position in order
    ]


def datamodule() -> ImageClassificationDataModule:
    return ImageClassificationDataModule(dataset="digits", flip_fraction=0.1, train_size=300, test_size=50, batch_size=32)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Checkpoints of a 2-epoch Trainer.fit of the demo MLP on 300 digits, 10% of labels flipped."""
    directory = tmp_path_factory.mktemp("digits") / "checkpoints"
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TracInCheckpoint(dirpath=directory)],
    )
    trainer.fit(MLP(image_size=8, hidden=16), datamodule=datamodule())
    return directory


@pytest.fixture(scope="module")
def scored(run_dir):
    """Process, store path and PNG path of ``tracin score DIR --top 5 --png outliers.png``, run once."""
    png = run_dir.parent / "outliers.png"
    result = run_cli("score", run_dir, "--top", TOP, "--png", png)
    assert result.returncode == 0, describe(result)
    return result, run_dir / "tracin.h5", png


@pytest.fixture(scope="module")
def fresh_store(scored, tmp_path_factory) -> Path:
    """A copy of the scored store made before any influence query, so it contains no train gradients."""
    copy = tmp_path_factory.mktemp("fresh") / "fresh.h5"
    shutil.copy(scored[1], copy)
    return copy


@pytest.fixture(scope="module")
def scored_json(run_dir):
    """Process and store path of ``tracin score DIR --out json.h5 --top 5 --json``, run once."""
    store = run_dir.parent / "json.h5"
    result = run_cli("score", run_dir, "--out", store, "--top", TOP, "--json")
    assert result.returncode == 0, describe(result)
    return result, store


def test_score_table_matches_store(scored):
    result, store, _ = scored
    rows = table_rows(result.stdout)
    expected = top_rows(store)

    assert len(rows) == TOP, describe(result)
    for cells, row in zip(rows, expected):
        rank, index, label, predicted, score = cells[:5]
        assert int(index) == row["index"], describe(result)
        assert int(label) == row["label"], describe(result)
        assert int(predicted) == row["prediction"], describe(result)
        assert float(score) == pytest.approx(row["self_influence"], rel=TABLE_RTOL), describe(result)
    assert [int(cells[0]) for cells in rows] == list(range(1, TOP + 1))
    scores = [float(cells[4]) for cells in rows]
    assert scores == sorted(scores, reverse=True), describe(result)
    assert "Traceback" not in result.stderr


def test_score_json_rows_match_store(scored_json):
    result, store = scored_json
    output = json.loads(result.stdout)
    rows = output["rows"]

    assert len(rows) == TOP
    for row, expected in zip(rows, top_rows(store)):
        for key, value in expected.items():
            assert row[key] == value, f"{key} of row {row}"
    assert [row["rank"] for row in rows] == list(range(1, TOP + 1))
    assert output["nonfinite"] == []
    assert Path(output["store"]) == store


def test_score_png_is_real_image(scored):
    result, _, png = scored

    assert png.is_file(), describe(result)
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert png.stat().st_size > 1024


def test_show_prints_same_rows_without_recomputing(scored):
    score_result, store, _ = scored
    modified = store.stat().st_mtime_ns

    result = run_cli("show", store, "--top", TOP)

    assert result.returncode == 0, describe(result)
    assert table_rows(result.stdout) == table_rows(score_result.stdout)
    assert store.stat().st_mtime_ns == modified
    assert "tracing" not in result.stderr, describe(result)


def test_score_again_without_overwrite_fails(run_dir, scored):
    _, store, _ = scored
    modified = store.stat().st_mtime_ns

    result = run_cli("score", run_dir, "--top", TOP)

    message = one_line(result.stderr)
    assert result.returncode != 0, describe(result)
    assert str(store) in message, describe(result)
    assert "--overwrite" in message, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    assert store.stat().st_mtime_ns == modified
    # The output is checked before the model and data are loaded.
    assert "train examples" not in message, describe(result)


@pytest.fixture(scope="module")
def influence_run(scored, tmp_path_factory):
    """Process and store path of ``tracin influence STORE --test 0:3 --top 3 --json``, on a copy of the store."""
    store = tmp_path_factory.mktemp("influence") / "influence.h5"
    shutil.copy(scored[1], store)
    result = run_cli("influence", store, "--test", "0:3", "--top", 3, "--json")
    assert result.returncode == 0, describe(result)
    return result, store


def test_influence_json_lists_proponents_and_opponents(influence_run):
    result, _ = influence_run
    output = json.loads(result.stdout)
    tests = output["test"]

    assert [entry["index"] for entry in tests] == [0, 1, 2]
    for entry in tests:
        proponents = [item["influence"] for item in entry["proponents"]]
        opponents = [item["influence"] for item in entry["opponents"]]
        assert len(proponents) == 3, entry
        assert len(opponents) == 3, entry
        assert proponents[0] > 0, entry
        assert proponents == sorted(proponents, reverse=True), entry
        assert opponents[0] < 0, entry
        assert opponents == sorted(opponents), entry


def test_influence_result_stored(influence_run):
    result, store = influence_run
    output = json.loads(result.stdout)

    arrays, attrs = read_result(store, "influence/0000")

    assert output["result"] == "influence/0000"
    assert attrs["selection"] == "0:3"
    assert attrs["k"] == 3
    assert arrays["test_index"].tolist() == [0, 1, 2]
    for row, entry in enumerate(output["test"]):
        assert arrays["proponent_index"][row].tolist() == [item["index"] for item in entry["proponents"]]
        assert arrays["proponent_score"][row].tolist() == [item["influence"] for item in entry["proponents"]]
        assert arrays["opponent_index"][row].tolist() == [item["index"] for item in entry["opponents"]]
    with h5py.File(store, "r") as file:
        assert file["gradients"].attrs["complete"]


def test_importance_json_sorted_and_stored(scored, tmp_path):
    store = tmp_path / "importance.h5"
    shutil.copy(scored[1], store)

    result = run_cli("importance", store, "--against", "test", "--top", 4, "--json")

    assert result.returncode == 0, describe(result)
    output = json.loads(result.stdout)
    arrays, attrs = read_result(store, output["result"])
    scores = arrays["score"]
    helpful = [entry["net_influence"] for entry in output["helpful"]]
    harmful = [entry["net_influence"] for entry in output["harmful"]]
    assert output["result"] == "importance/0000"
    assert attrs["against"] == "test"
    assert scores.shape == (300,)
    assert len(helpful) == 4
    assert helpful == sorted(helpful, reverse=True)
    assert harmful == sorted(harmful)
    assert [entry["index"] for entry in output["helpful"]] == np.argsort(-scores, kind="stable")[:4].tolist()
    assert helpful[0] == pytest.approx(float(scores.max()))
    assert harmful[0] == pytest.approx(float(scores.min()))


def assert_usage_error(result: subprocess.CompletedProcess, *names: str) -> None:
    message = one_line(result.stderr)
    assert result.returncode == 2, describe(result)
    for name in names:
        assert name in message, describe(result)
    assert "Traceback" not in result.stderr, describe(result)


def test_missing_checkpoint_dir_rejected(tmp_path):
    missing = tmp_path / "missing"

    result = run_cli("score", missing)

    assert_usage_error(result, str(missing), "does not exist")


def test_empty_checkpoint_dir_rejected(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()

    result = run_cli("score", empty)

    assert_usage_error(result, str(empty))
    assert list(empty.iterdir()) == []


def test_out_of_range_test_index_rejected_before_gradients(fresh_store):
    result = run_cli("influence", fresh_store, "--test", "999")

    assert_usage_error(result, "999", "out of range")
    with h5py.File(fresh_store, "r") as file:
        assert "gradients" not in file
        assert "influence" not in file


def test_empty_test_selection_rejected(fresh_store):
    result = run_cli("influence", fresh_store, "--test", "")

    assert_usage_error(result, "''", "empty")
    with h5py.File(fresh_store, "r") as file:
        assert "gradients" not in file


def test_out_in_missing_directory_rejected(run_dir, tmp_path):
    out = tmp_path / "missing" / "run.h5"

    result = run_cli("score", run_dir, "--out", out)

    assert_usage_error(result, str(out.parent), "does not exist")
    assert not out.parent.exists()
    assert "train examples" not in one_line(result.stderr), describe(result)


def test_png_in_missing_directory_rejected_before_work(fresh_store, tmp_path):
    png = tmp_path / "missing" / "panel.png"

    result = run_cli("influence", fresh_store, "--test", "0", "--top", 2, "--png", png)

    assert_usage_error(result, str(png))
    with h5py.File(fresh_store, "r") as file:
        assert "gradients" not in file
        assert "influence" not in file


def test_zero_gradients_exit_code_3(tmp_path):
    directory = tmp_path / "checkpoints"
    pl.seed_everything(0)
    features = make_dataset(16).tensors[0]
    loader = DataLoader(TensorDataset(features, torch.zeros(16, dtype=torch.long)), batch_size=8)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TracInCheckpoint(dirpath=directory)],
    )
    trainer.fit(SingleLogitClassifier(n_examples=16), train_dataloaders=loader)

    result = run_cli("score", directory, "--top", 3, pythonpath=TESTS_DIR)

    message = one_line(result.stderr)
    assert result.returncode == 3, describe(result)
    assert "ZeroGradientWarning" in message, describe(result)
    assert "dimension of size 1" in message, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    assert read_run(directory / "tracin.h5").train["self_influence"].tolist() == [0.0] * 16


def test_zero_learning_rate_everywhere_exits_3(run_dir, tmp_path):
    result = run_cli("score", str(run_dir), "--out", str(tmp_path / "zero.h5"), "--lr", "0")

    assert result.returncode == 3, describe(result)
    assert "learning rate 0" in one_line(result.stderr)


def test_out_that_is_a_directory_rejected(run_dir, tmp_path):
    result = run_cli("score", str(run_dir), "--out", str(tmp_path))

    assert_usage_error(result, str(tmp_path), "is a directory")


def test_bad_device_rejected_before_loading(run_dir, tmp_path):
    result = run_cli("score", str(run_dir), "--out", str(tmp_path / "x.h5"), "--device", "nonsense")

    assert_usage_error(result, "nonsense", "invalid")
    assert not (tmp_path / "x.h5.partial").exists()


def test_garbage_checkpoint_file_rejected(tmp_path):
    (tmp_path / "step=00000001.pt").write_text("this is not a checkpoint")

    result = run_cli("score", str(tmp_path))

    assert_usage_error(result, "step=00000001.pt", "torch.save")
