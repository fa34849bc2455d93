"""Tracing with several processes: shard ranges, top-K merging, and 2-process gloo runs against 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers import TinyMLP, digits_dataset, save_checkpoints

from tracin import trace_self_influence
from tracin.callbacks import TracInCheckpoint
from tracin.cli import build_parser
from tracin.commands import score
from tracin.demo import MLP, ImageClassificationDataModule
from tracin.distributed import (
    make_fabric,
    merge_top_k,
    shard_path,
    shard_ranges,
    trace_self_influence_distributed,
)
from tracin.errors import ConfigurationError
from tracin.rebuild import rebuild_run
from tracin.store import partial_path

pytestmark = pytest.mark.filterwarnings(
    "ignore:The '?train_dataloader'? does not have many workers",
    "ignore:The number of training batches",
    "ignore:.*LeafSpec.*is deprecated",
)

# Starting two processes that import torch and Lightning takes about 30 s on 2 busy CPU cores.
RUN_TIMEOUT_S = 300
SCRIPT = Path(__file__).with_name("distributed_run.py")
SCRIPT_BATCH_SIZE = 16  # distributed_run.BATCH_SIZE
SCRIPT_EXAMPLES = 200  # distributed_run.N_EXAMPLES
CLI_BATCH_SIZE = 32
# Variables that would make Lightning join an outside cluster instead of starting its own processes.
CLUSTER_VARIABLES = ("MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE",
                     "TORCHELASTIC_RUN_ID", "LT_CLI_USED")


def local_env() -> dict[str, str]:
    """Return the environment for a run whose processes talk only over loopback."""
    env = {key: value for key, value in os.environ.items()
           if key not in CLUSTER_VARIABLES and not key.startswith("SLURM_")}
    env["MASTER_ADDR"] = "127.0.0.1"
    env["COLUMNS"] = "200"
    return env


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit code {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


def store_contents(path: Path) -> tuple[dict, dict]:
    """Return every dataset's (dtype, shape, values) and every attribute of a store, by HDF5 path."""
    datasets, attrs = {}, {}
    with h5py.File(path, "r") as file:
        def visit(name, item):
            attrs[name] = {key: np.asarray(value).tolist() for key, value in item.attrs.items()}
            if isinstance(item, h5py.Dataset):
                datasets[name] = (item.dtype, item.shape, item[...])

        file.visititems(visit)
        attrs["/"] = {key: np.asarray(value).tolist() for key, value in file.attrs.items() if key != "created"}
    return datasets, attrs


def assert_same_store(actual: Path, expected: Path) -> None:
    actual_datasets, actual_attrs = store_contents(actual)
    expected_datasets, expected_attrs = store_contents(expected)
    assert sorted(actual_datasets) == sorted(expected_datasets)
    for name, (dtype, shape, values) in expected_datasets.items():
        assert actual_datasets[name][0] == dtype, name
        assert actual_datasets[name][1] == shape, name
        np.testing.assert_array_equal(actual_datasets[name][2], values, err_msg=name)
    assert actual_attrs == expected_attrs


# --- shard ranges ----------------------------------------------------------------------


@pytest.mark.parametrize("n_examples", [1, 15, 16, 17, 100, 1001])
@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_shard_ranges_cover_indices(n_examples, world_size, batch_size):
    ranges = shard_ranges(n_examples, world_size, batch_size)

    assert len(ranges) == world_size
    indices = np.concatenate([np.arange(r.start, r.stop) for r in ranges])
    np.testing.assert_array_equal(indices, np.arange(n_examples))
    for previous, current in zip(ranges, ranges[1:]):
        assert previous.stop == current.start


def test_shard_ranges_whole_batches():
    ranges = shard_ranges(200, 3, 16)  # 13 batches: 5, 4 and 4

    assert ranges == [range(0, 80), range(80, 144), range(144, 200)]
    for r in ranges:
        assert r.start % 16 == 0


def test_shard_ranges_more_ranks_than_batches():
    ranges = shard_ranges(20, 4, 16)  # 2 batches for 4 ranks

    assert ranges == [range(0, 16), range(16, 20), range(20, 20), range(20, 20)]


def test_shard_ranges_invalid_world_size():
    with pytest.raises(ConfigurationError, match="world size"):
        shard_ranges(10, 0, 4)


def test_shard_path_names_rank_and_world_size(tmp_path):
    assert shard_path(tmp_path / "run.h5", 1, 4) == tmp_path / "run.h5.rank1-of-4"


# --- merging top-K lists ---------------------------------------------------------------


@pytest.mark.parametrize("largest", [True, False])
def test_merge_top_k_equals_global(largest):
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 103, generator=generator, dtype=torch.float64)
    k = 7
    expected_scores, expected_indices = scores.topk(k, dim=1, largest=largest, sorted=True)

    parts = []
    for shard in shard_ranges(103, 4, 10):
        shard_scores, positions = scores[:, shard.start:shard.stop].topk(min(k, len(shard)), dim=1,
                                                                          largest=largest, sorted=True)
        parts.append(((positions + shard.start).numpy(), shard_scores.numpy()))
    indices, merged_scores = merge_top_k(parts, k, largest=largest)

    np.testing.assert_array_equal(indices, expected_indices.numpy())
    np.testing.assert_array_equal(merged_scores, expected_scores.numpy())


def test_merge_top_k_ties_and_nan():
    parts = [
        (np.array([[5, 1]]), np.array([[2.0, np.nan]])),
        (np.array([[3, 9]]), np.array([[2.0, 1.0]])),
    ]

    indices, scores = merge_top_k(parts, 4, largest=True)

    np.testing.assert_array_equal(indices, [[3, 5, 9, 1]])
    np.testing.assert_array_equal(scores, [[2.0, 2.0, 1.0, np.nan]])


def test_merge_top_k_rejects_k_over_length():
    with pytest.raises(ConfigurationError, match="top K 3"):
        merge_top_k([(np.array([[0, 1]]), np.array([[1.0, 0.5]]))], 3)


# --- options ---------------------------------------------------------------------------


def test_unsupported_strategy_rejected():
    with pytest.raises(ConfigurationError, match="'fsdp' is not supported"):
        make_fabric("cpu", 2, strategy="fsdp")


def test_device_with_devices_rejected(tmp_path):
    args = build_parser().parse_args(["score", str(tmp_path), "--device", "cpu", "--devices", "2"])

    with pytest.raises(ConfigurationError, match="--device cpu applies to one process only"):
        score(args, make_progress=None)


# --- two processes against one ---------------------------------------------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """Checkpoints of one epoch of the demo MLP on 300 digits, saved every 4 optimizer steps."""
    directory = tmp_path_factory.mktemp("digits") / "checkpoints"
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[TracInCheckpoint(dirpath=directory, every_n_train_steps=4)],
    )
    datamodule = ImageClassificationDataModule(dataset="digits", train_size=300, test_size=50, batch_size=32)
    trainer.fit(MLP(image_size=8, hidden=16), datamodule=datamodule)
    return directory


def test_cli_two_processes_equal_one(digits_run, tmp_path):
    one = tmp_path / "one.h5"
    run = rebuild_run(digits_run)
    trace_self_influence(run.model, digits_run, run.dataset("train"), one, batch_size=CLI_BATCH_SIZE,
                         dtype=torch.float64, run_info={"checkpoint_dir": str(digits_run.resolve()), "config": ""})
    two = tmp_path / "two.h5"

    result = subprocess.run(
        [sys.executable, "-m", "tracin.cli", "score", str(digits_run), "--out", str(two), "--json",
         "--batch-size", str(CLI_BATCH_SIZE), "--dtype", "float64", "--accelerator", "cpu", "--devices", "2"],
        capture_output=True, text=True, env=local_env(), timeout=RUN_TIMEOUT_S,
    )

    assert result.returncode == 0, describe(result)
    assert json.loads(result.stdout)["store"] == str(two), describe(result)
    assert "rank 1 of 2: tracing train examples 160 to 299" in result.stderr, describe(result)
    assert_same_store(two, one)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["one.h5", "two.h5"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """Three checkpoints of TinyMLP and a one-process trace of distributed_run.py's data."""
    directory = tmp_path_factory.mktemp("tiny")
    save_checkpoints(TinyMLP(), directory, [0.1, 0.05, 0.01])
    reference = directory / "one.h5"
    trace_self_influence(TinyMLP(), sorted(directory.glob("step=*.pt")), digits_dataset(SCRIPT_EXAMPLES), reference,
                         batch_size=SCRIPT_BATCH_SIZE, dtype=torch.float64)
    return directory, reference


def run_script(directory: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(directory), str(out), *extra],
                          capture_output=True, text=True, env=local_env(), timeout=RUN_TIMEOUT_S)


def test_one_device_runs_in_process(tiny_run, tmp_path):
    directory, reference = tiny_run
    out = tmp_path / "one_device.h5"

    summary = trace_self_influence_distributed(
        TinyMLP(), sorted(directory.glob("step=*.pt")), digits_dataset(SCRIPT_EXAMPLES), out,
        accelerator="cpu", devices=1, batch_size=SCRIPT_BATCH_SIZE, dtype=torch.float64,
    )

    assert summary.run.path == out
    assert_same_store(out, reference)


def test_failed_rank_reported_then_resumed(tiny_run, tmp_path):
    directory, reference = tiny_run
    out = tmp_path / "two.h5"
    # 200 examples in batches of 16 make 13 batches: rank 0 gets 0-111, rank 1 gets 112-199.
    failing = run_script(directory, out, "--fail-at", "150")

    assert failing.returncode == 1, describe(failing)
    assert "DistributedError: 1 of 2 ranks failed" in failing.stderr, describe(failing)
    assert "rank 1: ValueError: injected failure at train example 150" in failing.stderr, describe(failing)
    assert not out.exists()
    assert shard_path(out, 0, 2).is_file()
    assert partial_path(shard_path(out, 1, 2)).is_file()

    resumed = run_script(directory, out)

    assert resumed.returncode == 0, describe(resumed)
    assert "rank 0 of 2: reusing the complete shard store" in resumed.stderr, describe(resumed)
    assert "resuming" in resumed.stderr, describe(resumed)
    assert_same_store(out, reference)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["two.h5"]
