"""Lightning callbacks of tracin."""

from tracin.callbacks.tracin_checkpoint import TracInCheckpoint

__all__ = ["TracInCheckpoint"]
