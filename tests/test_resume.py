"""Crash safety: kill -9 and resume, a refused second writer, and a fingerprint check on resume."""

import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from tracin import read_run
from tracin.errors import StoreError
from tracin.store import OutputLock, partial_path

SCRIPT = Path(__file__).with_name("resume_run.py")
# 200 examples in batches of 16 make 13 batches per checkpoint, and there are 3 checkpoints. The loss
# runs once per block, so call N kills the run in block N after N - 1 blocks are done. With
# checkpoints outermost, call 20 is the 7th batch of the second checkpoint. With batches outermost,
# it is batch 6 at the second checkpoint, after batches 0 to 5 at every checkpoint and batch 6 at
# the first.
KILL_MID_SECOND_CHECKPOINT = 20
KILL_MID_SEVENTH_BATCH = 20


def run_script(directory: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(directory), str(out), *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoints")
    out = directory / "full.h5"
    result = run_script(directory, out)
    assert result.returncode == 0, result.stderr
    return directory, read_run(out)


def assert_resume_equals(directory: Path, out: Path, full, *extra: str) -> None:
    """Rerun the killed trace and check that its scores equal the uninterrupted run's."""
    resumed = run_script(directory, out, *extra)

    assert resumed.returncode == 0, resumed.stderr
    result = read_run(out)
    np.testing.assert_array_equal(result.train["self_influence"], full.train["self_influence"])
    np.testing.assert_array_equal(result.train["loss"], full.train["loss"])
    np.testing.assert_array_equal(result.train["index"], full.train["index"])
    assert not partial_path(out).exists()


def test_resume_after_mid_checkpoint_kill(uninterrupted):
    directory, full = uninterrupted
    out = directory / "killed.h5"

    killed = run_script(directory, out, "--order", "checkpoint", "--kill-at", str(KILL_MID_SECOND_CHECKPOINT))

    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    with h5py.File(partial_path(out), "r") as partial:
        done = partial["progress/done"][...]
    assert done[0].all()
    assert 0 < done[1].sum() < done.shape[1]
    assert not done[2].any()

    assert_resume_equals(directory, out, full, "--order", "checkpoint")


def test_resume_after_mid_row_kill(uninterrupted):
    directory, full = uninterrupted
    out = directory / "killed_batch_order.h5"

    killed = run_script(directory, out, "--kill-at", str(KILL_MID_SEVENTH_BATCH))

    assert killed.returncode == -9, killed.stderr
    with h5py.File(partial_path(out), "r") as partial:
        done = partial["progress/done"][...]
    assert done[:, :6].all()
    assert done[0, 6]
    assert not done[1:, 6].any()
    assert not done[:, 7:].any()

    assert_resume_equals(directory, out, full)


def test_resume_with_other_batch_size_names_field(uninterrupted):
    directory, _ = uninterrupted
    out = directory / "mismatch.h5"
    killed = run_script(directory, out, "--kill-at", "5")
    assert killed.returncode == -9

    from tracin import trace_self_influence
    from helpers import TinyMLP, digits_dataset

    with pytest.raises(StoreError, match="batch_size"):
        trace_self_influence(TinyMLP(), sorted(directory.glob("step=*.pt")), digits_dataset(200), out,
                             batch_size=32)
    assert partial_path(out).exists()


def test_second_writer_refused_and_first_file_valid(uninterrupted, tmp_path):
    directory, full = uninterrupted
    out = tmp_path / "locked.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from tracin.store import OutputLock;"
         "lock = OutputLock(Path(sys.argv[1])); lock.acquire(); print('locked', flush=True); time.sleep(60)",
         str(out)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = run_script(directory, out)
        assert second.returncode != 0
        assert "being written by process" in second.stderr
        assert "choose another --out" in second.stderr
    finally:
        holder.kill()
        holder.wait()

    after = run_script(directory, out)
    assert after.returncode == 0, after.stderr
    np.testing.assert_array_equal(read_run(out).train["self_influence"], full.train["self_influence"])


def test_lock_released_after_kill(tmp_path):
    out = tmp_path / "run.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from tracin.store import OutputLock;"
         "OutputLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(60)",
         str(out)],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    time.sleep(0.1)

    lock = OutputLock(out)
    lock.acquire()
    lock.release()
