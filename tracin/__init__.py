"""TracInCP training-data influence for PyTorch models and Lightning runs."""

__version__ = "0.1.0"

from tracin.checkpoints import Checkpoint, discover_checkpoints
from tracin.store import StoredRun, read_run
from tracin.tracer import TraceSummary, trace_self_influence

__all__ = [
    "Checkpoint",
    "StoredRun",
    "TraceSummary",
    "__version__",
    "discover_checkpoints",
    "read_run",
    "trace_self_influence",
]
