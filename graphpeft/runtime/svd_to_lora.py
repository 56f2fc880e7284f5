"""Writing an adapter's plain-LoRA form as a PEFT adapter folder (``save_as_lora``).

An adapter held in another form than the one it is best shipped in (AdaLoRA's SVD triplets, whose
allocated ranks make plain LoRA of the kept ranks with the same outputs) gets that form from its
method's ``export_form(model, adapter_name, config)`` hook, the one ONNX export uses; this module
writes it, as ``adapter_config.json`` + ``adapter_model.safetensors``. Nothing here names a method:
the hook is found through the registry.

    from graphpeft.runtime.svd_to_lora import save_as_lora
    save_as_lora(model, "adapter-lora")      # loads with graphpeft.from_pretrained and with PEFT as LoRA
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from graphpeft.engine import registry
from graphpeft.engine.errors import GraphPeftError
from graphpeft.runtime.outputs import atomic_write

HOOK = "export_form"


def save_as_lora(model: Any, directory: Union[str, Path], adapter_name: Optional[str] = None) -> Path:
    """Write the adapter's ``export_form`` (AdaLoRA: ``shrink_to_lora(model)``) as a PEFT LoRA adapter folder
    (adapter_config.json + safetensors)."""
    from safetensors.torch import save_file

    name = adapter_name or model.active_adapter
    config = model.peft_config.get(name)
    hook = getattr(registry.method_for_config(config).pass_cls, HOOK, None) if config is not None else None
    form = hook(model, name, config) if hook is not None else None
    if form is None:
        raise GraphPeftError(f"adapter {name!r} has no plain LoRA form to save (its method defines no {HOOK} hook; "
                             f"AdaLoRA's does); save_as_lora needs such an adapter")
    config, tensors = form
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GraphPeftError(f"cannot create output folder {out}: {exc.strerror}; choose a writable path") from None
    atomic_write(out / "adapter_model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(out / "adapter_config.json",
                 lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return out
