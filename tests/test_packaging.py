"""The wheel ships tracin.callbacks from the callbacks/ folder, and an installed wheel imports it."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_imports_callbacks(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = next((tmp_path / "dist").glob("tracin-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "tracin/callbacks/__init__.py" in names
    assert "tracin/callbacks/tracin_checkpoint.py" in names
    assert not any(name.startswith("tests/") for name in names)

    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    imported = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.path.insert(0, sys.argv[1]); from tracin.callbacks import TracInCheckpoint; "
         "import tracin.callbacks; print(tracin.callbacks.__file__)", str(target)],
        capture_output=True, text=True, timeout=120,
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip().startswith(str(target))
