"""Tests of TracInCheckpoint with real Trainer.fit runs on tiny random data."""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers_lightning import (
    RandomDataModule,
    TinyClassifier,
    TwoOptimizerClassifier,
    UnsavedDataModule,
    make_loader,
)
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.nn import functional as F

from tracin.callbacks import TracInCheckpoint
from tracin.errors import ConfigurationError
from tracin.manifest import MANIFEST_NAME, Manifest, read_manifest

pytestmark = pytest.mark.filterwarnings(
    "ignore:The '?train_dataloader'? does not have many workers",
    "ignore:The number of training batches",
    "ignore:.*LeafSpec.*is deprecated",
    # The resumed runs leave out the ModelCheckpoint that wrote the .ckpt file.
    "ignore:Be aware that when using `ckpt_path`",
)

LR0 = 0.1
# 32 examples in batches of 8.
STEPS_PER_EPOCH = 4
# The saved weights and a manual SGD loop run the same float64 operations.
WEIGHT_TOLERANCE = 1e-12
DDP_TIMEOUT_S = 120


def fit(callback, model, loader=None, datamodule=None, ckpt_path=None, extra_callbacks=(), **trainer_kwargs):
    """Run Trainer.fit on CPU with no logger, progress bar or default ModelCheckpoint."""
    uses_model_checkpoint = any(isinstance(extra, ModelCheckpoint) for extra in extra_callbacks)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=uses_model_checkpoint,
        callbacks=[callback, *extra_callbacks],
        **trainer_kwargs,
    )
    trainer.fit(model, train_dataloaders=loader, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def manifest_of(directory: Path) -> Manifest:
    manifest = read_manifest(directory)
    assert manifest is not None, f"no {MANIFEST_NAME} in {directory}"
    return manifest


def steps_of(manifest: Manifest) -> list[int]:
    return [entry.step for entry in manifest.checkpoints]


def test_epoch_scheduler_records_epoch_lr(tmp_path):
    pl.seed_everything(0)
    fit(
        TracInCheckpoint(tmp_path, every_n_epochs=1),
        TinyClassifier(lr=LR0, scheduler="step"),
        make_loader(32, 8),
        max_epochs=3,
    )
    entries = manifest_of(tmp_path).checkpoints

    assert len(entries) == 3
    for epoch, entry in enumerate(entries):
        # StepLR(step_size=1, gamma=0.5) stepped once per epoch.
        assert entry.lr == [pytest.approx(LR0 * 0.5**epoch)], f"epoch {epoch}"
        assert entry.step == STEPS_PER_EPOCH * (epoch + 1), f"epoch {epoch}"
        assert entry.epoch == epoch


def test_warmup_scheduler_records_step_lr(tmp_path):
    pl.seed_everything(0)
    fit(
        TracInCheckpoint(tmp_path, every_n_train_steps=1),
        TinyClassifier(lr=LR0, scheduler="warmup"),
        make_loader(32, 4),
        max_steps=7,
    )
    entries = manifest_of(tmp_path).checkpoints

    assert steps_of(manifest_of(tmp_path)) == [1, 2, 3, 4, 5, 6, 7]
    assert entries[0].lr == [0.0]
    for entry in entries:
        # Update number k runs after k - 1 scheduler steps: factor min(1, (k - 1) / 4).
        expected = LR0 * min(1.0, (entry.step - 1) / 4)
        assert entry.lr == [pytest.approx(expected)], f"step {entry.step}"


def test_two_param_groups_record_both_lrs(tmp_path):
    pl.seed_everything(0)
    fit(
        TracInCheckpoint(tmp_path),
        TinyClassifier(lr=0.1, head_lr=0.01, scheduler="step"),
        make_loader(32, 8),
        max_epochs=2,
    )
    entries = manifest_of(tmp_path).checkpoints

    assert len(entries) == 2
    for epoch, entry in enumerate(entries):
        assert entry.lr == [pytest.approx(0.1 * 0.5**epoch), pytest.approx(0.01 * 0.5**epoch)]
        assert entry.param_groups == [["body.weight", "body.bias"], ["head.weight", "head.bias"]]


def test_two_optimizers_concatenate_groups(tmp_path):
    pl.seed_everything(0)
    fit(TracInCheckpoint(tmp_path, every_n_train_steps=2), TwoOptimizerClassifier(), make_loader(32, 8), max_epochs=1)
    manifest = manifest_of(tmp_path)

    # Manual optimization counts each optimizer.step() in global_step: two per batch.
    assert steps_of(manifest) == [2, 4, 6, 8]
    for entry in manifest.checkpoints:
        assert entry.lr == [pytest.approx(0.1), pytest.approx(0.01)]
        assert entry.param_groups == [["body.weight", "body.bias"], ["head.weight", "head.bias"]]


def test_both_intervals_rejected(tmp_path):
    with pytest.raises(ConfigurationError) as raised:
        TracInCheckpoint(tmp_path, every_n_epochs=1, every_n_train_steps=50)

    assert "TracInCheckpoint(every_n_epochs=1, every_n_train_steps=50)" in str(raised.value)
    assert "pass only one of" in str(raised.value)


@pytest.mark.parametrize("name", ["every_n_epochs", "every_n_train_steps"])
@pytest.mark.parametrize("value", [0, -3, 1.5, True, "2"])
def test_invalid_interval_rejected(tmp_path, name, value):
    with pytest.raises(ConfigurationError) as raised:
        TracInCheckpoint(tmp_path, **{name: value})

    assert f"TracInCheckpoint({name}={value!r})" in str(raised.value)


def test_dirpath_file_rejected(tmp_path):
    existing_file = tmp_path / "weights.pt"
    existing_file.write_bytes(b"")

    with pytest.raises(ConfigurationError, match="is a file"):
        TracInCheckpoint(existing_file)


def test_default_interval_is_one_epoch(tmp_path):
    callback = TracInCheckpoint(tmp_path)

    assert callback.every_n_epochs == 1
    assert callback.every_n_train_steps is None


@pytest.mark.parametrize(("save_on_train_end", "expected_steps"), [(True, [120, 240, 330]), (False, [120, 240])])
def test_step_interval_across_epochs(tmp_path, save_on_train_end, expected_steps):
    pl.seed_everything(0)
    fit(
        TracInCheckpoint(tmp_path, every_n_train_steps=120, save_on_train_end=save_on_train_end),
        TinyClassifier(lr=LR0, scheduler="step"),
        make_loader(110, 1),
        max_epochs=3,
        limit_val_batches=0,
    )
    manifest = manifest_of(tmp_path)

    assert steps_of(manifest) == expected_steps
    for entry in manifest.checkpoints:
        # 110 steps per epoch, and StepLR halves the rate after each epoch.
        epoch = (entry.step - 1) // 110
        assert entry.epoch == epoch, f"step {entry.step}"
        assert entry.lr == [pytest.approx(LR0 * 0.5**epoch)], f"step {entry.step}"


def test_gradient_accumulation_saves_step_once(tmp_path):
    pl.seed_everything(0)
    fit(
        TracInCheckpoint(tmp_path, every_n_train_steps=1),
        TinyClassifier(),
        make_loader(32, 4),
        max_epochs=1,
        accumulate_grad_batches=2,
    )

    assert steps_of(manifest_of(tmp_path)) == [1, 2, 3, 4]


def test_saved_weights_match_manual_sgd(tmp_path):
    pl.seed_everything(0)
    model = TinyClassifier(lr=LR0)
    reference = copy.deepcopy(model).double()
    loader = make_loader(60, 2)
    fit(TracInCheckpoint(tmp_path, every_n_train_steps=10), model, loader, max_epochs=1, precision="64-true")
    manifest = manifest_of(tmp_path)

    assert steps_of(manifest) == [10, 20, 30]

    optimizer = torch.optim.SGD(reference.parameters(), lr=LR0)
    for step, (features, labels) in enumerate(loader, start=1):
        optimizer.zero_grad()
        F.cross_entropy(reference(features.double()), labels).backward()
        optimizer.step()
        if step == 10:
            break
    saved = torch.load(tmp_path / "step=00000010.pt", weights_only=True)["state_dict"]
    for name, expected in reference.state_dict().items():
        torch.testing.assert_close(saved[name], expected, rtol=0.0, atol=WEIGHT_TOLERANCE, msg=name)


def test_files_load_with_weights_only(tmp_path):
    pl.seed_everything(0)
    model = TinyClassifier(scheduler="step")
    fit(TracInCheckpoint(tmp_path), model, make_loader(32, 8), max_epochs=3)
    manifest = manifest_of(tmp_path)

    saved_files = sorted(path.name for path in tmp_path.glob("*.pt"))
    assert saved_files == [entry.file for entry in manifest.checkpoints]
    assert saved_files == ["step=00000004.pt", "step=00000008.pt", "step=00000012.pt"]
    assert not list(tmp_path.glob("*.tmp"))
    for entry in manifest.checkpoints:
        checkpoint = torch.load(tmp_path / entry.file, weights_only=True)
        assert checkpoint["tracin_format_version"] == 1
        assert checkpoint["global_step"] == entry.step
        assert checkpoint["epoch"] == entry.epoch
        assert checkpoint["lr"] == entry.lr
        assert checkpoint["param_groups"] == entry.param_groups
        assert set(checkpoint["state_dict"]) == set(model.state_dict())
        assert all(tensor.device.type == "cpu" for tensor in checkpoint["state_dict"].values())
    final = torch.load(tmp_path / "step=00000012.pt", weights_only=True)["state_dict"]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(final[name], tensor, rtol=0.0, atol=0.0, msg=name)


def train_with_lightning_checkpoints(tracin_dir: Path, lightning_dir: Path, max_epochs: int) -> None:
    """Train with TracInCheckpoint and a ModelCheckpoint that keeps one .ckpt per epoch."""
    pl.seed_everything(0)
    model_checkpoint = ModelCheckpoint(dirpath=lightning_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    fit(
        TracInCheckpoint(tracin_dir),
        TinyClassifier(scheduler="step"),
        make_loader(32, 8),
        extra_callbacks=[model_checkpoint],
        max_epochs=max_epochs,
    )


def resume(tracin_dir: Path, ckpt_path: Path, max_epochs: int) -> None:
    pl.seed_everything(0)
    fit(
        TracInCheckpoint(tracin_dir),
        TinyClassifier(scheduler="step"),
        make_loader(32, 8),
        ckpt_path=ckpt_path,
        max_epochs=max_epochs,
    )


def test_resume_matches_uninterrupted_run(tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    resumed = tmp_path / "resumed"
    pl.seed_everything(0)
    fit(TracInCheckpoint(uninterrupted), TinyClassifier(scheduler="step"), make_loader(32, 8), max_epochs=4)
    train_with_lightning_checkpoints(resumed, tmp_path / "lightning", max_epochs=2)
    resume(resumed, tmp_path / "lightning" / "epoch=1.ckpt", max_epochs=4)
    expected = manifest_of(uninterrupted).checkpoints
    actual = manifest_of(resumed).checkpoints

    assert steps_of(manifest_of(resumed)) == [4, 8, 12, 16]
    assert [entry.step for entry in actual] == [entry.step for entry in expected]
    assert [entry.epoch for entry in actual] == [entry.epoch for entry in expected]
    for actual_entry, expected_entry in zip(actual, expected):
        assert actual_entry.lr == pytest.approx(expected_entry.lr), f"step {actual_entry.step}"
    assert sorted(path.name for path in resumed.glob("*.pt")) == [entry.file for entry in actual]


def test_resume_drops_abandoned_entries(tmp_path, caplog):
    tracin_dir = tmp_path / "tracin"
    train_with_lightning_checkpoints(tracin_dir, tmp_path / "lightning", max_epochs=3)
    assert steps_of(manifest_of(tracin_dir)) == [4, 8, 12]

    with caplog.at_level(logging.INFO, logger="tracin.callbacks.tracin_checkpoint"):
        resume(tracin_dir, tmp_path / "lightning" / "epoch=0.ckpt", max_epochs=2)

    assert steps_of(manifest_of(tracin_dir)) == [4, 8]
    assert "dropping 2 checkpoints" in caplog.text
    assert "step=00000012.pt" in caplog.text
    # The abandoned file stays on disk, but the manifest no longer lists it.
    assert (tracin_dir / "step=00000012.pt").is_file()


def test_fresh_run_warns_existing_manifest(tmp_path):
    pl.seed_everything(0)
    fit(TracInCheckpoint(tmp_path), TinyClassifier(), make_loader(32, 8), max_epochs=2)

    with pytest.warns(UserWarning, match="already has a manifest with 2 checkpoints"):
        fit(TracInCheckpoint(tmp_path), TinyClassifier(), make_loader(32, 8), max_epochs=1)

    assert steps_of(manifest_of(tmp_path)) == [4]


def test_state_key_includes_dirpath(tmp_path):
    first = TracInCheckpoint(tmp_path / "a")
    second = TracInCheckpoint(tmp_path / "b", every_n_train_steps=5)

    assert os.path.realpath(tmp_path / "a") in first.state_key
    assert first.state_key != second.state_key
    assert first.state_key == TracInCheckpoint(tmp_path / "a", every_n_epochs=2).state_key


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ddp_saves_each_checkpoint_once(tmp_path):
    script = Path(__file__).with_name("ddp_callback_run.py")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    # A new session lets the test stop rank 1 too, which the launcher starts as a child.
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=DDP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"DDP run timed out after {DDP_TIMEOUT_S} s:\n{output}")
    assert process.returncode == 0, output

    checkpoint_dir = tmp_path / "tracin"
    manifest = manifest_of(checkpoint_dir)
    files = [entry.file for entry in manifest.checkpoints]
    rank0_saves = json.loads((tmp_path / "saves_rank0.json").read_text())
    rank1_saves = json.loads((tmp_path / "saves_rank1.json").read_text())

    # 4 steps per epoch over 2 epochs, every 3 steps, and the last step at train end.
    assert steps_of(manifest) == [3, 6, 8]
    assert len(set(files)) == len(files)
    assert rank0_saves == [file + ".tmp" for file in files]
    assert rank1_saves == []
    assert sorted(path.name for path in checkpoint_dir.glob("*.pt")) == files
    for file in files:
        checkpoint = torch.load(checkpoint_dir / file, weights_only=True)
        assert checkpoint["global_step"] == int(file.removeprefix("step=").removesuffix(".pt"))


def test_manifest_records_module_and_datamodule(tmp_path):
    pl.seed_everything(0)
    fit(
        TracInCheckpoint(tmp_path),
        TinyClassifier(hidden=5, lr=0.2),
        datamodule=RandomDataModule(n_examples=16, batch_size=4, seed=3),
        max_epochs=1,
    )
    manifest = manifest_of(tmp_path)

    assert manifest.module.class_path == f"{TinyClassifier.__module__}.TinyClassifier"
    assert manifest.module.init_args == {"hidden": 5, "lr": 0.2, "head_lr": None, "scheduler": None}
    assert manifest.datamodule.class_path == f"{RandomDataModule.__module__}.RandomDataModule"
    assert manifest.datamodule.init_args == {"n_examples": 16, "batch_size": 4, "seed": 3}


def test_manifest_without_datamodule(tmp_path):
    pl.seed_everything(0)
    fit(TracInCheckpoint(tmp_path), TinyClassifier(), make_loader(16, 8), max_epochs=1)

    assert manifest_of(tmp_path).datamodule is None


def test_datamodule_without_hparams_warns(tmp_path):
    pl.seed_everything(0)

    with pytest.warns(UserWarning, match="saved no hyperparameters"):
        fit(TracInCheckpoint(tmp_path), TinyClassifier(), datamodule=UnsavedDataModule(batch_size=8), max_epochs=1)

    manifest = manifest_of(tmp_path)
    assert manifest.datamodule.class_path == f"{UnsavedDataModule.__module__}.UnsavedDataModule"
    assert manifest.datamodule.init_args == {}


def test_fast_dev_run_saves_nothing(tmp_path):
    pl.seed_everything(0)
    fit(TracInCheckpoint(tmp_path, every_n_train_steps=1), TinyClassifier(), make_loader(32, 8), fast_dev_run=2)

    assert not list(tmp_path.glob("*.pt"))
    assert read_manifest(tmp_path) is None
