"""Scripts of tools/ imported as modules for their tests (tools/ is not a package)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@contextlib.contextmanager
def tool_module(script: str) -> Iterator[ModuleType]:
    """``tools/<script>`` as a module, registered in sys.modules while in use (its dataclasses look it up)."""
    name = f"graphpeft_tool_{Path(script).stem}"
    spec = importlib.util.spec_from_file_location(name, TOOLS / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
