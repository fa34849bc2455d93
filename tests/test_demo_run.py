"""The README's demo command, ``python -m tracin.demo``, run for real on a small slice of MNIST."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tracin import read_run

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist_demo.yaml"
TIMEOUT_S = 300
TRAIN_SIZE = 600


def run_python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "COLUMNS": "200"})


def describe(result: subprocess.CompletedProcess) -> str:
    return f"exit code {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Run the demo for 2 epochs on the first 600 MNIST train images, writing into a temporary directory."""
    directory = tmp_path_factory.mktemp("demo")
    config = directory / "demo.yaml"
    config.write_text(DEMO_CONFIG.read_text().replace("runs/mnist_demo", str(directory / "run")))
    result = run_python("-m", "tracin.demo", "--config", str(config), "--train-size", str(TRAIN_SIZE),
                        "--epochs", "2", "--top", "5")
    return directory / "run", result


def test_demo_prints_recall_and_writes_store(demo):
    run_dir, result = demo

    assert result.returncode == 0, describe(result)
    assert "Recall of flipped labels: 60 of 600 train labels were flipped" in result.stdout, describe(result)
    stored = read_run(run_dir / "tracin.h5")
    assert len(stored.train["index"]) == TRAIN_SIZE
    assert len(stored.checkpoints) == 2
    assert (run_dir / "top_outliers.png").is_file()


def test_demo_influence_command_runs(demo):
    run_dir, result = demo
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("tracin influence")]
    assert len(lines) == 1, describe(result)

    command = shlex.split(lines[0])[1:]
    followed = run_python("-m", "tracin.cli", *command)

    assert followed.returncode == 0, describe(followed)
    assert (run_dir / "influence.png").is_file()
    for test_index in range(3):
        assert f"Test example {test_index}: label" in followed.stdout, describe(followed)


def test_demo_verify_command_paths(demo):
    run_dir, result = demo
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("tracin verify")]
    assert len(lines) == 1, describe(result)

    arguments = shlex.split(lines[0])

    assert Path(arguments[2]) == run_dir / "checkpoints"
    assert Path(arguments[arguments.index("--store") + 1]) == run_dir / "tracin.h5"
