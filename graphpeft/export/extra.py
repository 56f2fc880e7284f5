"""The optional extra ``onnx``: onnx, onnxscript (the torch.onnx exporter) and onnxruntime-training.

Every ONNX entry point calls ``require()`` first, so a missing package is one line that says how to
install it, never an ImportError from deep inside an export.
"""

from __future__ import annotations

import importlib
import sys

from graphpeft.engine.errors import GraphPeftError

INSTALL_HINT = "pip install 'graphpeft[onnx]'"
# module to import -> package that provides it
_PACKAGES = {
    "onnx": "onnx",
    "onnxscript": "onnxscript",
    "onnxruntime.training.api": "onnxruntime-training",
}


class MissingExtraError(GraphPeftError):
    """A package of the ``onnx`` extra is not installed."""


def missing_packages(training: bool = True) -> list[str]:
    """The packages of the extra that cannot be imported (``training=False``: the export side only)."""
    missing = []
    for module, package in _PACKAGES.items():
        if not training and module.startswith("onnxruntime.training"):
            module = "onnxruntime"
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def require(what: str = "ONNX export", training: bool = True) -> None:
    """Raise MissingExtraError naming what is missing and how to install it."""
    missing = missing_packages(training)
    if not missing:
        return
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    note = "" if sys.version_info < (3, 12) else (f"; onnxruntime-training 1.19.2, the last release, needs "
                                                   f"Python <= 3.11 (this is {python})")
    raise MissingExtraError(f"{what} needs the optional extra 'onnx' ({', '.join(missing)} not installed): "
                            f"{INSTALL_HINT}{note}")
