r"""The HDF5 store of one traced run.

Layout (format version 1)::

    RUN.h5
    ├── attrs: format_version, tracin_version, model, params (names), n_params,
    │          loss, created (ISO 8601, UTC), checkpoint_dir, config, fingerprint,
    │          complete
    ├── checkpoints/
    │   ├── 0000  attrs: path, step, epoch, lr (per param group), position,
    │   │         parameter_lr (the rate of each tracked parameter)
    │   └── ...
    ├── train/
    │   ├── index                       (N,)    int64    dataset index of each row
    │   ├── label                       (N,)    int64    given label, -1 when unknown
    │   ├── prediction                  (N,)    int64    argmax of the outputs at the last checkpoint
    │   ├── self_influence              (N,)    float64  sum over checkpoints
    │   ├── checkpoint_self_influence   (N, C)  float64  lr_c * ||g_c||^2
    │   ├── loss                        (N, C)  float64  loss at each checkpoint
    │   └── margin                      (N, C)  float64  given-label logit minus largest other logit
    └── progress/
        └── done                        (C, n_batches) bool  blocks already written

Rows are in dataset order: row i is dataset index ``index[i]``. Scores are
float64 whatever the compute dtype. Train datasets start empty and grow by one
batch at a time during the first checkpoint's pass. Each is chunked by rows
and one checkpoint column, because the tracer writes one checkpoint column per
pass and readers load whole columns.

A run writes ``RUN.h5.partial`` and renames it to ``RUN.h5`` only once every
block is done, so a file named ``RUN.h5`` is always complete. An interrupted run
leaves the ``.partial`` file; running the same command again resumes from the
blocks it records as done. A lock on ``RUN.h5.lock`` keeps a second process
from writing the same output.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tracin.errors import StoreError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ROW_CHUNK = 4096
TRAIN_COLUMNS = ("checkpoint_self_influence", "loss", "margin")


def partial_path(path: Path) -> Path:
    """Return the temporary name a run writes to before it is complete."""
    return path.with_name(path.name + ".partial")


def lock_path(path: Path) -> Path:
    """Return the lock file that marks a run writing ``path``."""
    return path.with_name(path.name + ".lock")


def _version() -> str:
    from tracin import __version__

    return __version__


class OutputLock:
    """An exclusive ``flock`` on ``RUN.h5.lock``, released by the kernel even after ``kill -9``."""

    def __init__(self, path: Path):
        self.path = lock_path(path)
        self.handle = None

    def acquire(self) -> None:
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            self.handle.seek(0)
            owner = self.handle.read().strip() or "another process"
            self.handle.close()
            self.handle = None
            raise StoreError(
                f"output {self.path.with_suffix('')} is being written by {owner}. Wait for that run to finish, "
                "or choose another --out."
            ) from error
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"process {os.getpid()}")
        self.handle.flush()

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
            self.path.unlink(missing_ok=True)


def check_output_path(path: Path, overwrite: bool) -> None:
    """Raise StoreError when the directory of ``path`` is missing, or ``path`` exists and ``overwrite`` is False."""
    if not path.parent.is_dir():
        raise StoreError(f"output directory {path.parent} does not exist. Create it or choose another --out.")
    if path.is_dir():
        raise StoreError(f"output {path} is a directory. Pass a file path such as {path / 'tracin.h5'} as --out.")
    if path.exists() and not overwrite:
        raise StoreError(
            f"output {path} already exists. Pass --overwrite (overwrite=True) to replace it, or choose another --out."
        )


def fingerprint_differences(stored: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Return the sorted names of the fingerprint fields whose values differ, including missing ones."""
    return sorted(key for key in set(stored) | set(expected) if stored.get(key) != expected.get(key))


@dataclass
class RunMetadata:
    """Root attributes of a store."""

    model: str
    params: list[str]
    n_params: int
    loss: str
    checkpoint_dir: str = ""
    config: str = ""
    fingerprint: dict[str, Any] = field(default_factory=dict)


class ScoreWriter:
    """Writes one run's scores block by block into ``RUN.h5.partial``, resuming a matching partial file.

    Args:
        path: Final output path.
        metadata: Root attributes; ``metadata.fingerprint`` decides whether a partial file can be resumed.
        checkpoints: Per-checkpoint attributes (path, step, epoch, lr).
        n_batches: Number of batches per checkpoint pass.
        overwrite: Replace an existing complete file at ``path``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        metadata: RunMetadata,
        checkpoints: list[dict[str, Any]],
        n_batches: int,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.metadata = metadata
        self.checkpoints = checkpoints
        self.n_batches = n_batches
        self.overwrite = overwrite
        check_output_path(self.path, overwrite)
        self.lock = OutputLock(self.path)
        self.lock.acquire()
        try:
            self.file, self.resumed = self._open()
        except BaseException:
            self.lock.release()
            raise

    def _open(self) -> tuple[h5py.File, bool]:
        if self.partial.exists():
            resumed = self._try_resume()
            if resumed is not None:
                return resumed, True
        return self._create(), False

    def _try_resume(self) -> h5py.File | None:
        try:
            file = h5py.File(self.partial, "r+")
        except OSError as error:
            logger.warning("partial output %s is unreadable (%s); starting over", self.partial, error)
            self.partial.unlink()
            return None
        differing = fingerprint_differences(json.loads(file.attrs.get("fingerprint", "{}")), self.metadata.fingerprint)
        if differing and self.overwrite:
            file.close()
            logger.warning("discarding partial output %s, written for a different run (%s differ)",
                           self.partial, ", ".join(differing))
            self.partial.unlink()
            return None
        if differing:
            file.close()
            raise StoreError(
                f"partial output {self.partial} was written for a different run; these fields differ: "
                f"{', '.join(differing)}. Pass --overwrite (overwrite=True) or delete {self.partial} to start "
                "over, or rerun with the original checkpoints, data and options to resume it."
            )
        done = int(file["progress/done"][...].sum())
        logger.info("resuming %s: %d of %d blocks already done", self.partial, done, file["progress/done"].size)
        return file

    def _create(self) -> h5py.File:
        file = h5py.File(self.partial, "w")
        meta = self.metadata
        file.attrs["format_version"] = FORMAT_VERSION
        file.attrs["tracin_version"] = _version()
        file.attrs["model"] = meta.model
        file.attrs["params"] = json.dumps(meta.params)
        file.attrs["n_params"] = meta.n_params
        file.attrs["loss"] = meta.loss
        file.attrs["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        file.attrs["checkpoint_dir"] = meta.checkpoint_dir
        file.attrs["config"] = meta.config
        file.attrs["fingerprint"] = json.dumps(meta.fingerprint, sort_keys=True)
        file.attrs["complete"] = False

        group = file.create_group("checkpoints")
        for position, info in enumerate(self.checkpoints):
            entry = group.create_group(f"{position:04d}")
            entry.attrs["position"] = position
            for key, value in info.items():
                entry.attrs[key] = -1 if value is None else value

        n_checkpoints = len(self.checkpoints)
        train = file.create_group("train")
        for name, dtype in (("index", np.int64), ("label", np.int64), ("prediction", np.int64)):
            train.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(ROW_CHUNK,))
        train.create_dataset("self_influence", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(ROW_CHUNK,))
        for name in TRAIN_COLUMNS:
            train.create_dataset(
                name,
                shape=(0, n_checkpoints),
                maxshape=(None, n_checkpoints),
                dtype=np.float64,
                chunks=(ROW_CHUNK, 1),
                fillvalue=np.nan,
            )
        file.create_group("progress").create_dataset(
            "done", shape=(n_checkpoints, self.n_batches), dtype=bool, fillvalue=False
        )
        file.flush()
        return file

    def is_done(self, checkpoint: int, batch: int) -> bool:
        """Return whether block (checkpoint, batch) was written by this or an earlier run."""
        return bool(self.file["progress/done"][checkpoint, batch])

    def write_block(
        self,
        checkpoint: int,
        batch: int,
        start: int,
        columns: dict[str, np.ndarray],
        rows: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Write one batch of results for one checkpoint and mark the block done.

        Args:
            checkpoint: Position of the checkpoint.
            batch: Position of the batch in the pass.
            start: First row of the batch.
            columns: Per-checkpoint values (``TRAIN_COLUMNS``), each of shape ``(B,)``.
            rows: Per-example values that do not depend on the checkpoint (``index``, ``label``,
                and ``prediction`` at the last checkpoint), each of shape ``(B,)``.
        """
        train = self.file["train"]
        size = len(next(iter(columns.values())))
        stop = start + size
        self._grow(stop)
        for name, values in (rows or {}).items():
            train[name][start:stop] = values
        for name, values in columns.items():
            train[name][start:stop, checkpoint] = values
        self.file["progress/done"][checkpoint, batch] = True
        self.file.flush()

    def write_rows(self, start: int, columns: dict[str, np.ndarray], rows: dict[str, np.ndarray],
                   batches: range) -> None:
        """Write rows for every checkpoint at once and mark ``batches`` done at every checkpoint.

        Merging the shard stores of a multi-process trace uses this in place of one
        :meth:`write_block` per block.

        Args:
            start: First row.
            columns: ``TRAIN_COLUMNS`` values, each of shape ``(B, C)``.
            rows: ``index``, ``label`` and ``prediction``, each of shape ``(B,)``.
            batches: Positions of the batches that these rows make up.
        """
        stop = start + len(rows["index"])
        self._grow(stop)
        train = self.file["train"]
        for name, values in {**rows, **columns}.items():
            train[name][start:stop] = values
        self.file["progress/done"][:, batches.start:batches.stop] = True
        self.file.flush()

    def _grow(self, stop: int) -> None:
        train = self.file["train"]
        if train["index"].shape[0] < stop:
            for name in ("index", "label", "prediction", "self_influence"):
                train[name].resize((stop,))
            for name in TRAIN_COLUMNS:
                train[name].resize((stop, len(self.checkpoints)))

    def finalize(self) -> Path:
        """Sum self-influence over checkpoints, mark the file complete and rename it to its final name."""
        done = self.file["progress/done"][...]
        if not done.all():
            raise StoreError(
                f"{self.partial} has {int((~done).sum())} unfinished blocks and cannot be finalized."
            )
        train = self.file["train"]
        per_checkpoint = train["checkpoint_self_influence"][...]
        train["self_influence"][...] = per_checkpoint.sum(axis=1)
        self.file.attrs["complete"] = True
        self.file.close()
        os.replace(self.partial, self.path)
        self.lock.release()
        return self.path

    def close(self) -> None:
        """Close the partial file, keeping it for a later resume when any block is done, and release the lock."""
        if self.file.id.valid:
            nothing_done = not self.file["progress/done"][...].any()
            self.file.close()
            if nothing_done:
                # A run that failed before its first block leaves nothing to resume, and a stale
                # partial file would block a corrected rerun with a fingerprint mismatch.
                self.partial.unlink(missing_ok=True)
        self.lock.release()


@dataclass
class StoredRun:
    """A complete store read into memory.

    Attributes:
        path: The store.
        attrs: Root attributes; ``params`` decoded to a list.
        checkpoints: Attributes of each checkpoint, in training order.
        train: Train datasets by name, e.g. ``self_influence`` of shape ``(N,)`` and
            ``loss`` of shape ``(N, C)``.
    """

    path: Path
    attrs: dict[str, Any]
    checkpoints: list[dict[str, Any]]
    train: dict[str, np.ndarray]


def read_run(path: str | os.PathLike) -> StoredRun:
    """Read a complete store.

    Raises:
        StoreError: the file is missing, incomplete, of another format version or lacks a dataset.
    """
    path = Path(path)
    if path.is_dir():
        raise StoreError(f"store {path} is a directory. Pass the file that 'tracin score' wrote, e.g. "
                         f"{path / 'tracin.h5'}.")
    if not path.is_file():
        hint = f" An interrupted run left {partial_path(path)}; rerun the same command to finish it." if partial_path(path).exists() else ""
        raise StoreError(f"store {path} not found.{hint} Run 'tracin score' first.")
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        if "lock" in str(error).lower():
            raise StoreError(f"{path} is in use by another tracin process; wait for it to finish.") from error
        raise StoreError(f"{path} is not a readable HDF5 file: {error}") from error
    with file:
        version = file.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"{path} has format_version {version!r}; this tracin reads version {FORMAT_VERSION}.")
        if not file.attrs.get("complete", False):
            raise StoreError(f"{path} is incomplete. Rerun the command that wrote it to finish it.")
        attrs = {key: _decode(value) for key, value in file.attrs.items()}
        attrs["params"] = json.loads(attrs["params"])
        checkpoints = [
            {key: _decode(value) for key, value in file["checkpoints"][name].attrs.items()}
            for name in sorted(file["checkpoints"])
        ]
        train = {}
        for name, dataset in file["train"].items():
            if not isinstance(dataset, h5py.Dataset):
                raise StoreError(f"{path}: train/{name} is a {type(dataset).__name__}, expected a dataset.")
            train[name] = dataset[...]
    return StoredRun(path=path, attrs=attrs, checkpoints=checkpoints, train=train)


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# Train gradients and influence results live in the same file as the scores:
#
#   gradients/
#     attrs: n_params, dtype, complete, projection_dim (0: full dimension), projection_seed
#     0000  (N, P) float32 or float16   gradient of each train example at checkpoint 0
#     ...
#     done  (C, n_batches) bool
#   influence/NNNN/                      one group per query, in order
#     attrs: kind ("proponents" or "importance"), selection, normalize, k, created
#     test_index (n_test,), proponent_index/score, opponent_index/score (n_test, K)
#   importance/NNNN/ ... score (N,)


class GradientWriter:
    """Appends per-checkpoint train gradients to a complete store, resuming an interrupted write.

    Gradients are chunked by rows with the full parameter dimension per chunk,
    because queries read them in blocks of train examples.
    """

    def __init__(self, path: str | os.PathLike, n_checkpoints: int, n_examples: int, n_params: int,
                 n_batches: int, dtype: np.dtype, attrs: dict[str, Any] | None = None):
        self.path = Path(path)
        self.lock = OutputLock(self.path)
        self.lock.acquire()
        try:
            self.file = h5py.File(self.path, "r+")
        except OSError as error:
            self.lock.release()
            raise StoreError(f"{self.path} could not be opened for writing: {error}") from error
        group = self.file.get("gradients")
        expected = (n_examples, n_params)
        attrs = attrs or {}
        if group is not None and (group.attrs.get("n_params") != n_params or np.dtype(group.attrs.get("dtype")) != dtype
                                  or group["done"].shape != (n_checkpoints, n_batches)
                                  or any(group.attrs.get(key) != value for key, value in attrs.items())):
            logger.info("stored gradients of %s do not match this request; recomputing them", self.path)
            del self.file["gradients"]
            group = None
        if group is None:
            group = self.file.create_group("gradients")
            group.attrs["n_params"] = n_params
            group.attrs["dtype"] = np.dtype(dtype).name
            group.attrs["complete"] = False
            for key, value in attrs.items():
                group.attrs[key] = value
            rows = max(1, min(n_examples, (4 << 20) // max(1, n_params * np.dtype(dtype).itemsize)))
            for position in range(n_checkpoints):
                group.create_dataset(f"{position:04d}", shape=expected, dtype=dtype, chunks=(rows, n_params))
            group.create_dataset("done", shape=(n_checkpoints, n_batches), dtype=bool, fillvalue=False)
            self.file.flush()
        self.group = group

    def is_done(self, checkpoint: int, batch: int) -> bool:
        return bool(self.group["done"][checkpoint, batch])

    def write_block(self, checkpoint: int, batch: int, start: int, gradients: np.ndarray) -> None:
        self.group[f"{checkpoint:04d}"][start:start + len(gradients)] = gradients
        self.group["done"][checkpoint, batch] = True
        self.file.flush()

    def finish(self) -> None:
        self.group.attrs["complete"] = bool(self.group["done"][...].all())
        self.close()

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()
        self.lock.release()


def gradient_info(path: str | os.PathLike) -> dict[str, Any] | None:
    """Return the attributes of a store's train gradients (n_params, dtype, complete, projection), or None."""
    with h5py.File(path, "r") as file:
        if "gradients" not in file:
            return None
        return {key: _decode(value) for key, value in file["gradients"].attrs.items()}


class GradientReader:
    """Reads blocks of stored train gradients, shape ``(rows, P)`` per checkpoint."""

    def __init__(self, path: str | os.PathLike):
        self.file = h5py.File(path, "r")
        group = self.file.get("gradients")
        if group is None or not group.attrs.get("complete", False):
            self.file.close()
            raise StoreError(f"{path} has no complete train gradients. Run 'tracin influence' to compute them.")
        self.group = group
        self.n_checkpoints = group["done"].shape[0]

    def block(self, checkpoint: int, start: int, stop: int) -> np.ndarray:
        return self.group[f"{checkpoint:04d}"][start:stop]

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> GradientReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def append_result(path: str | os.PathLike, kind: str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> str:
    """Store the arrays of one query under ``kind/NNNN`` and return the group's name."""
    path = Path(path)
    lock = OutputLock(path)
    lock.acquire()
    try:
        with h5py.File(path, "r+") as file:
            parent = file.require_group(kind)
            name = f"{kind}/{len(parent):04d}"
            group = file.create_group(name)
            group.attrs["created"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            for key, value in attrs.items():
                group.attrs[key] = value
            for key, value in arrays.items():
                group.create_dataset(key, data=value)
    finally:
        lock.release()
    return name


def read_result(path: str | os.PathLike, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read the arrays and attributes of a stored query, e.g. ``influence/0000``."""
    with h5py.File(path, "r") as file:
        if name not in file:
            raise StoreError(f"{path} has no result {name!r}.")
        group = file[name]
        return {key: dataset[...] for key, dataset in group.items()}, {
            key: _decode(value) for key, value in group.attrs.items()
        }


def list_results(path: str | os.PathLike, kind: str) -> list[str]:
    """Return the names of the stored results of one kind, oldest first."""
    with h5py.File(path, "r") as file:
        return [f"{kind}/{name}" for name in sorted(file[kind])] if kind in file else []


class StoredExamples:
    """A map-style dataset over rows of a complete store, safe to read from DataLoader workers.

    h5py file handles must not cross a ``fork`` and cannot be pickled for ``spawn``,
    so the file is opened lazily, once per process, on the first item read in it.
    Item i is a dict of the named train datasets at row i, e.g.
    ``{"index": 3, "self_influence": 0.7}``.

    Args:
        path: A store written by ``tracin score``.
        names: Datasets under ``train/`` to return; default ``index``, ``label`` and ``self_influence``.
    """

    def __init__(self, path: str | os.PathLike, names: tuple[str, ...] = ("index", "label", "self_influence")):
        self.path = Path(path)
        self.names = tuple(names)
        with h5py.File(self.path, "r") as file:
            missing = [name for name in self.names if f"train/{name}" not in file]
            if missing:
                raise StoreError(f"{self.path} has no train datasets {missing}; it has {sorted(file['train'])}.")
            self.length = file["train/index"].shape[0]
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, row: int) -> dict[str, Any]:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return {name: self._file[f"train/{name}"][row] for name in self.names}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_file"] = None
        state["_pid"] = None
        return state
