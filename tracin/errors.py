"""Exception and warning classes of tracin.

Each subclasses the built-in exception that fits, so callers can catch either.
Messages name the received value, what was expected and what to do next. The
CLI prints :class:`TracInError` subclasses without a traceback.
"""


class TracInError(Exception):
    """Base class of every error that tracin raises on user input."""


class ConfigurationError(TracInError, ValueError):
    """An argument, option or config value is invalid."""


class CheckpointError(TracInError, ValueError):
    """A checkpoint file is missing data, unreadable or does not fit the model."""


class CheckpointNotFoundError(TracInError, FileNotFoundError):
    """A checkpoint file or directory does not exist or contains no checkpoint."""


class MissingLearningRateError(CheckpointError):
    """A checkpoint records no learning rate and none was passed explicitly."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint needs arbitrary code to unpickle, so it was not loaded."""


class DataOrderError(TracInError, ValueError):
    """A data loader would not visit the train set in dataset order."""


class LossError(TracInError, ValueError):
    """The loss does not return one value per example."""


class StoreError(TracInError, OSError):
    """An HDF5 store is missing, locked, incomplete or has an unexpected layout."""


class SelectionError(TracInError, IndexError):
    """A selection of examples is empty or out of range."""


class DistributedError(TracInError, RuntimeError):
    """A rank of a multi-process trace failed, or timed out waiting for the other ranks."""


class TracInWarning(UserWarning):
    """Base class of tracin's warnings."""


class NonFiniteScoreWarning(TracInWarning):
    """Some examples have NaN or infinite scores, usually from NaN or infinite inputs."""


class ZeroGradientWarning(TracInWarning):
    """Every tracked gradient of every example is zero, so every score is zero."""


class ZeroLearningRateWarning(TracInWarning):
    """A checkpoint has learning rate 0, so it contributes nothing to any score."""


class StorageOverflowWarning(TracInWarning):
    """A value was too large for the requested storage dtype."""
