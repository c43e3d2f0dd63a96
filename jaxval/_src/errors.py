"""jaxval's exception types: one small hierarchy; every message says what was wrong and what to do.

``jaxval.Error`` (= :class:`JaxvalError`) is the root: ``except jaxval.Error`` catches every error jaxval
raises on purpose, and the ``jaxval`` command prints such an error as one line on stderr and exits with
status 2 (``--debug`` shows the traceback). The subclasses also derive from the built-in type that older
code caught (``ValueError``, ``FileNotFoundError``, ``OSError``), so ``except ValueError`` keeps working.

    JaxvalError (Error)
    ├── ConfigError          a config file, a command-line value or an argument is wrong   (ValueError)
    ├── ProvenanceError      artifacts of different LoGra configurations / model weights mixed (ValueError)
    │                        (alias MismatchError)
    ├── NonFiniteError       NaN / inf gradients or statistics, naming the examples         (ValueError)
    ├── CheckpointError      a checkpoint (preconditioner, student, model) is missing or damaged (ValueError)
    │   └── CheckpointNotFoundError                                                          (FileNotFoundError)
    ├── OutputError          an output folder cannot be written as asked (foreign, unwritable) (ValueError)
    └── StoreError           a gradient store cannot be created / opened / read as asked    (ValueError)
        ├── StoreNotFoundError                                                              (FileNotFoundError)
        ├── IncompleteStoreError   rows not logged yet (scoring refuses unless asked)
        ├── StoreCorruptError      a chunk missing, short or failing its checksum (names its rows)
        └── StoreWriteError        the disk is full / not writable (says which rows are kept)  (OSError)
"""


class JaxvalError(Exception):
    """Base of every error jaxval raises on purpose (the CLI prints its message and exits with status 2)."""


Error = JaxvalError


class ConfigError(JaxvalError, ValueError):
    """A config file, a command-line value or an argument is missing or wrong; the message names the key."""


class ProvenanceError(JaxvalError, ValueError):
    """Artifacts made with different LoGra configurations or model weights were combined."""


MismatchError = ProvenanceError


class NonFiniteError(JaxvalError, ValueError):
    """Gradients (or statistics) holding NaN or inf; the message names the examples."""


class CheckpointError(JaxvalError, ValueError):
    """A checkpoint (preconditioner, student, model) is missing, incomplete or damaged."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No jaxval checkpoint at the given path."""


class OutputError(JaxvalError, ValueError):
    """An output folder cannot be written as asked (it holds files jaxval did not write, ...)."""


class StoreError(JaxvalError, ValueError):
    """A GradientStore could not be created, opened or read as asked (message says why and what to do)."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store (no manifest.json) at the given location."""


class IncompleteStoreError(StoreError):
    """The store has rows not logged yet (scoring it is refused unless ``allow_incomplete=True``)."""


class StoreCorruptError(StoreError):
    """A chunk of the store is missing, short, or fails its checksum; the message names its rows."""


class StoreWriteError(StoreError, OSError):
    """Writing the store failed (disk full, permission denied); the rows already done are kept."""


__all__ = ["JaxvalError", "Error", "ConfigError", "ProvenanceError", "MismatchError", "NonFiniteError",
           "CheckpointError", "CheckpointNotFoundError", "OutputError", "StoreError", "StoreNotFoundError",
           "IncompleteStoreError", "StoreCorruptError", "StoreWriteError"]
