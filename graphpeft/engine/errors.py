"""Errors a user can act on.

Every error graphpeft raises for bad input is a ``GraphPeftError``: its message is one line that
names what was wrong and what to do. The CLI prints it and exits with code 2; the Python API lets
it propagate (it is a ``ValueError``, so code that catches ValueError keeps working).
"""


class GraphPeftError(ValueError):
    """Bad input: a config, a model, an adapter folder or a data file that does not fit."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, always


class CaptureError(GraphPeftError):
    """The model could not be captured as a graph."""


class NoMatchError(GraphPeftError):
    """A pass found no site to rewrite."""


class AdapterFormatError(GraphPeftError):
    """An adapter folder whose files, keys or shapes do not fit the model."""
