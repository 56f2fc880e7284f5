"""Non-persistent buffers of a model built on the meta device, computed at capture time.

Rotary ``inv_freq`` and the like are in no weights file: transformers computes them in
``_init_weights``. ``capture`` calls ``fill_meta_buffers`` while the model object is at hand, so a
graph captured on the meta device (``graphpeft.runtime.meta``) holds real values for them.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn


def fill_meta_buffers(model: nn.Module, gm: fx.GraphModule) -> list[str]:
    """Give the graph real values for the model's non-persistent buffers that sit on the meta device.

    They are not in any weights file; transformers computes them in ``_init_weights``. Each owning
    module is initialised on a CPU stand-in twice (buffers pre-filled with 0 and with 1); a buffer both
    trials agree on was computed, not left over, and replaces the meta buffer in ``gm``. Returns the
    buffer names filled.
    """
    init = getattr(model, "_init_weights", None)
    if init is None:
        return []
    filled = []
    for path, module in model.named_modules():
        names = [n for n, b in module._buffers.items()
                 if b is not None and b.is_meta and n in module._non_persistent_buffers_set]
        if not names:
            continue
        values = _computed_buffers(module, names, init)
        for name, value in values.items():
            attr = f"{path}.{name}" if path else name
            owner = _module_or_none(gm, attr.rpartition(".")[0])
            if owner is not None and name in owner._buffers:
                owner._buffers[name] = value
                filled.append(attr)
    return filled


def _computed_buffers(module: nn.Module, names: list[str], init: Any) -> dict[str, torch.Tensor]:
    def trial(fill: float) -> dict[str, torch.Tensor]:
        stand_in = copy.copy(module)
        stand_in._parameters = {k: None if p is None else nn.Parameter(torch.zeros(p.shape, dtype=p.dtype), p.requires_grad)
                                for k, p in module._parameters.items()}
        stand_in._buffers = {k: None if b is None else torch.full(b.shape, fill, dtype=b.dtype)
                             for k, b in module._buffers.items()}
        stand_in._modules = dict(module._modules)
        with torch.no_grad():
            try:
                init(stand_in)
            except Exception:        # an initialiser that needs more than the module: leave the buffer on meta
                return {}
        return {k: stand_in._buffers[k] for k in names}

    zeros, ones = trial(0), trial(1)
    return {k: v for k, v in zeros.items() if k in ones and torch.equal(v, ones[k])}


def _module_or_none(root: nn.Module, path: str) -> Optional[nn.Module]:
    module = root
    for part in [p for p in path.split(".") if p]:
        module = module._modules.get(part)
        if module is None:
            return None
    return module
