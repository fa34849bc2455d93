"""A journal of finished retrainings, so an interrupted ``tracin verify`` resumes instead of starting over.

One verify run retrains the model ``R * (1 + 2 * n_test)`` or ``3 * R`` times,
which can take hours. After each retraining, its metrics go into a JSON file
next to the store, named after a hash of the request: the mode, K, the seeds,
the removed train indices of every retraining and the Trainer settings. The
same command run again finds the file and skips the retrainings it lists. A
retraining is a deterministic function of the removed examples, the seed and
the settings (the tests check that the same seed reproduces the same model),
so a journaled result equals a recomputed one. The file is written to a
temporary name and renamed, so a kill leaves either the old or the new
journal. The verify function deletes it when the last retraining is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def request_key(request: dict[str, Any]) -> str:
    """Return a short hash of a JSON-serializable request, stable across runs."""
    text = json.dumps(request, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RetrainingJournal:
    """Metrics of finished retrainings of one verify request, kept in ``STORE.verify-KEY.json``."""

    def __init__(self, store: str | os.PathLike, request: dict[str, Any]) -> None:
        store = Path(store)
        self.path = store.with_name(f"{store.name}.verify-{request_key(request)}.json")
        self.entries: dict[str, list[float]] = {}
        if self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())["entries"]
            except (OSError, ValueError, KeyError) as error:
                logger.warning("ignoring unreadable journal %s (%s); retraining from the start", self.path, error)
            else:
                logger.info("resuming: %d retrainings already done, read from %s", len(self.entries), self.path)

    def result(self, entry: str, compute: Callable[[], list[float]]) -> list[float]:
        """Return the metrics of one retraining, from the journal or by calling ``compute`` and journaling them."""
        if entry in self.entries:
            return self.entries[entry]
        values = [float(value) for value in compute()]
        self.entries[entry] = values
        self._write()
        return values

    def _write(self) -> None:
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps({"entries": self.entries}))
        os.replace(temporary, self.path)

    def remove(self) -> None:
        """Delete the journal, once every retraining of the request is done."""
        self.path.unlink(missing_ok=True)
