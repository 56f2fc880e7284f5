"""PEFT's adapter format: adapter_config.json + adapter_model.safetensors, both directions.

Keys follow PEFT (``base_model.model.<module path>.lora_A.weight`` and the like); each Rewrite
record says which graph parameter is saved under which key. Files are written to a temporary
file in the target folder and renamed into place, so an interrupted save leaves the previous
files intact. Loading never unpickles: only safetensors is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from graphpeft.engine.errors import AdapterFormatError, GraphPeftError
from graphpeft.engine.match import PARAM_KINDS
from graphpeft.runtime.outputs import atomic_write_many

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_state(model: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """{PEFT key: tensor} of one adapter, read from the live graph."""
    from graphpeft.engine.rewriter import get_attr_path

    state = {}
    for rec in model.records:
        for attr, key in rec.saved_keys.items():
            if rec.adapter == adapter_name:
                state[key] = get_attr_path(model.graph_module, attr).detach().contiguous().cpu()
    config = getattr(model, "peft_config", {}).get(adapter_name)
    if config is not None:      # a method may store its state differently from memory (e.g. pruned ranks)
        from graphpeft.engine import registry

        hook = getattr(registry.method_for_config(config).pass_cls, "saved_state", None)
        if hook is not None:
            state = hook(model, adapter_name, config, state)
    return state


def resolved_config(model: Any, adapter_name: str) -> dict[str, Any]:
    """The adapter's config as PEFT writes it, with the sites graphpeft found written out."""
    cfg = model.peft_config[adapter_name]
    data = cfg.to_dict()
    mine = [r for r in model.records if r.rule != "modules_to_save" and r.adapter == adapter_name]
    if hasattr(cfg, "target_modules"):
        module_sites = sorted({r.module_path for r in mine if r.kind not in PARAM_KINDS})
        param_sites = sorted({r.info.get("weight") for r in mine if r.kind in PARAM_KINDS})
        data["target_modules"] = module_sites or None
        data["target_parameters"] = param_sites or None
        if module_sites and all(r.kind in ("addmm", "mm") for r in mine if r.module_path in module_sites):
            data["fan_in_fan_out"] = True
    from graphpeft.engine import registry

    for rule_name in sorted({r.rule for r in mine}):
        data = registry.rule(rule_name).saved_config(data, [r for r in mine if r.rule == rule_name])
    info = model.capture_info
    if not data.get("base_model_name_or_path") and info is not None:
        data["base_model_name_or_path"] = info.name_or_path
    data["inference_mode"] = True
    return data


def save_adapter(model: Any, directory: str | os.PathLike, adapter_name: str = "default",
                 initial: Optional[str | os.PathLike] = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors; with ``initial`` (a folder holding the adapter as
    it was right after rewriting), the method's ``convert_for_initial_model`` hook rewrites both first."""
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GraphPeftError(f"cannot create output folder {out}: {exc.strerror}; choose a writable path") from None
    if not os.access(out, os.W_OK):
        raise GraphPeftError(f"output folder {out} is not writable; choose a writable path")
    state = adapter_state(model, adapter_name)
    config = resolved_config(model, adapter_name)
    if initial is not None:
        state, config = _converted_for_initial(model, adapter_name, state, config, initial)
    # both files are written in full before either is renamed into place (see atomic_write_many)
    atomic_write_many({out / WEIGHTS_NAME: lambda p: save_file(state, p, metadata={"format": "pt"}),
                       out / CONFIG_NAME: lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True)
                                                                       + "\n")})
    return out


RESUME_INDEX_NAME = "model.safetensors.index.json"


def write_resume_index(directory: str | os.PathLike, adapter_name: str, state_keys: list[str]) -> Path:
    """transformers' checkpoint index naming the adapter's weights file, so that Trainer can resume.

    Trainer resumes a model that is not a PeftModel by reading the files an index names and passing
    their tensors to ``model.load_state_dict``; GraphPeftModel takes PEFT-keyed adapter tensors there.
    ``state_keys`` are the model's state-dict names of what the file holds (Trainer compares them with
    the model's own to warn about missing keys).
    """
    folder = Path(directory)
    weights = WEIGHTS_NAME if adapter_name == "default" else f"{adapter_name}/{WEIGHTS_NAME}"
    index = {"metadata": {"format": "graphpeft adapter", "adapter_name": adapter_name},
             "weight_map": {key: weights for key in sorted(state_keys)}}
    atomic_write_many({folder / RESUME_INDEX_NAME: lambda p: Path(p).write_text(json.dumps(index, indent=2) + "\n")})
    return folder / RESUME_INDEX_NAME


def _converted_for_initial(model: Any, adapter_name: str, state: dict, config: dict, initial: Any) -> tuple[dict, dict]:
    from graphpeft.engine import registry

    method = registry.method_for_config(model.peft_config[adapter_name])
    hook = getattr(method.pass_cls, "convert_for_initial_model", None)
    if hook is None:
        raise GraphPeftError(f"{method.name} adapters have no conversion against an initial model; "
                             f"save without path_initial_model_for_weight_conversion")
    _, tensors = read_adapter(initial)
    return hook(state, {_strip_adapter_name(k, adapter_name): v for k, v in tensors.items()}, config)


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, {key: tensor}) from a PEFT-format adapter folder, with one-line errors."""
    folder = Path(directory)
    if not folder.is_dir():
        raise AdapterFormatError(f"adapter folder {folder} does not exist; pass the folder save_pretrained wrote")
    cfg_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise AdapterFormatError(f"{folder} has no {CONFIG_NAME}; pass a folder written by save_pretrained")
    if not weights_path.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise AdapterFormatError(f"{folder} holds adapter_model.bin (a pickle), which graphpeft does not load; "
                                     f"re-save it with safetensors (PEFT: save_pretrained(..., safe_serialization=True))")
        raise AdapterFormatError(f"{folder} has no {WEIGHTS_NAME}; pass a folder written by save_pretrained")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{cfg_path} is not valid JSON ({exc}); re-save the adapter") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterFormatError(f"{cfg_path} has no peft_type; it is not a PEFT adapter config")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"{weights_path} is not a readable safetensors file ({str(exc).splitlines()[0]}); "
                                 f"re-save the adapter") from None
    return config, tensors


def read_adapter_config(directory: str | os.PathLike, is_trainable: bool = False) -> tuple[Any, dict[str, torch.Tensor]]:
    """(config object of the saved method, {key: tensor}); ``inference_mode`` set as PEFT's loading sets it."""
    from graphpeft.engine import registry

    config_dict, tensors = read_adapter(directory)
    config = registry.method_for_peft_type(config_dict["peft_type"]).config_cls.from_dict(config_dict)
    config.inference_mode = not is_trainable
    return config, tensors


def load_adapter_state(model: Any, tensors: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Copy PEFT-keyed tensors into the graph's adapter parameters; every key and shape must fit."""
    from graphpeft.engine.rewriter import get_attr_path

    targets = {}
    for rec in model.records:
        for attr, key in rec.saved_keys.items():
            if rec.adapter == adapter_name:
                targets[key] = attr
    tensors = {_strip_adapter_name(k, adapter_name): v for k, v in tensors.items()}
    # PEFT saves the full weight of a targeted embedding (``<path>.base_layer.weight``, for resized
    # vocabularies); like PEFT, load it into the base weight of that site.
    for rec in model.records:
        key = f"base_model.model.{rec.module_path}.base_layer.weight"
        if rec.adapter == adapter_name and key in tensors and "weight" in rec.info:
            targets.setdefault(key, rec.info["weight"])
    missing = sorted(k for k in set(targets) - set(tensors) if not k.endswith(".base_layer.weight"))
    unexpected = sorted(set(tensors) - set(targets))
    if unexpected:
        raise AdapterFormatError(f"adapter file has {len(unexpected)} key(s) the rewritten model does not have, "
                                 f"e.g. {unexpected[0]}; was it saved for another model or config?")
    if missing:
        raise AdapterFormatError(f"adapter file lacks {len(missing)} key(s) the config asks for, e.g. {missing[0]}; "
                                 f"the file does not fit its adapter_config.json")
    pairs = [(get_attr_path(model.graph_module, attr), key, tensors[key]) for key, attr in targets.items()
             if key in tensors]
    for param, key, value in pairs:      # every tensor is checked before any is copied: a refused file changes nothing
        if tuple(param.shape) != tuple(value.shape):
            raise AdapterFormatError(f"{key} has shape {tuple(value.shape)} in the file but "
                                     f"{tuple(param.shape)} in the model; was it saved for another model?")
        if not value.is_floating_point():
            raise AdapterFormatError(f"{key} has dtype {value.dtype}; adapter weights must be floating point")
    with torch.no_grad():
        for param, _, value in pairs:
            param.copy_(value.to(param.dtype))


def _strip_adapter_name(key: str, adapter_name: str) -> str:
    """PEFT strips the adapter name on save; accept files that kept it (``lora_A.default.weight``)."""
    for suffix in (f".{adapter_name}.weight", f".{adapter_name}.bias"):
        if key.endswith(suffix):
            return key[: -len(suffix)] + suffix[len(adapter_name) + 1:]
    if key.endswith(f".{adapter_name}"):
        return key[: -len(adapter_name) - 1]
    return key.replace(f".modules_to_save.{adapter_name}.", ".")
