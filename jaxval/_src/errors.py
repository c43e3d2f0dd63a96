"""jaxval's exception types: one small hierarchy; every message says what was wrong and what to do."""


class JaxvalError(Exception):
    """Base of every error jaxval raises on purpose (the CLI prints its message and exits with status 2)."""


class StoreError(JaxvalError, ValueError):
    """A GradientStore could not be created or opened as asked (message says why and what to do)."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store (no manifest.json) at the given location."""
