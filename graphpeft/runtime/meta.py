"""Rewriting without weights: a model built on the meta device is captured and rewritten as usual, and
its graph gets real weights later, loaded from safetensors files.

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained("llama-7b"))   # no memory
    peft_model = graphpeft.rewrite(model, graphpeft.LoraConfig(r=8, target_modules="all-linear"))
    graphpeft.save_config(peft_model, "adapter")            # adapter_config.json with the sites found
    ...
    torch.manual_seed(0)                                    # the adapters' random init, as an eager rewrite
    graphpeft.materialize(peft_model, "llama-7b/")          # *.safetensors (sharded or not); in place

A graph captured on the meta device differs from an ordinary one in two ways, both fixed here:

- some nodes hold ``device='meta'`` as a constant (``arange(..., device=meta)``, ``to(mask, meta)``):
  ``materialize`` points them at the device of the loaded weights, in the rewritten graph and in the
  base graph that ``disable_adapter`` and ``merge_and_unload`` use;
- non-persistent buffers (rotary ``inv_freq``) are in no weights file: ``capture`` computes them while
  the model object is at hand (``engine.meta_buffers``, with the model's own transformers initialiser).

The adapter parameters get their initial values by replaying the rewrite on the materialized base
graph (the rule's own initialisation, so a seeded materialize equals a seeded eager rewrite), or from
a saved adapter folder (``adapter=``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
import torch.fx as fx
from torch import nn

from graphpeft.engine.capture import retarget_device
from graphpeft.engine.errors import GraphPeftError

META = torch.device("meta")
_INDEX_NAMES = ("model.safetensors.index.json",)


def meta_model(model: Optional[str], task: str = "auto", trust_remote_code: bool = False) -> nn.Module:
    """A Hugging Face model built from its config alone, on the meta device (its weights are never read).

    ``model`` is what the command line takes: a model folder, a hub id in the local cache, or None (the
    embedded default); only config.json is needed.
    """
    from graphpeft.runtime import hub

    if task not in hub.TASKS:
        raise GraphPeftError(f"unknown task {task!r}; choose one of: {', '.join(hub.TASKS)}")
    config = hub.load_config(model, trust_remote_code)
    cls = hub._auto_class(task, config)
    try:
        with torch.device("meta"):
            built = (cls.from_config(config, trust_remote_code=trust_remote_code) if hasattr(cls, "from_config")
                     else cls._from_config(config))
    except (ValueError, KeyError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise GraphPeftError(f"cannot build {model or hub.DEFAULT_MODEL_ID} from its config: {reason}") from None
    built.config._name_or_path = hub.resolve(model)[1]
    return built.eval()


# -- saving the rewrite ---------------------------------------------------------------------------

def save_config(model: Any, directory: Union[str, os.PathLike], adapter_name: Optional[str] = None) -> Path:
    """Write ``adapter_config.json`` (PEFT's format, with the sites graphpeft found written out) and
    ``rewrite.json`` (one record per site); no weights. Works on a model whose weights are on meta.

    A later ``graphpeft.rewrite(model, LoraConfig.from_pretrained(directory))``-style rewrite with this
    config takes exactly these sites.
    """
    from graphpeft.runtime.io import CONFIG_NAME, resolved_config
    from graphpeft.runtime.outputs import atomic_write

    name = adapter_name or model.active_adapter
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GraphPeftError(f"cannot create output folder {out}: {exc.strerror}; choose a writable path") from None
    config = resolved_config(model, name)
    records = {"adapter": name, "records": [r.to_json() for r in model.records if r.adapter == name]}
    atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    atomic_write(out / "rewrite.json", lambda p: Path(p).write_text(json.dumps(records, indent=2) + "\n"))
    return out


# -- materialize ----------------------------------------------------------------------------------

def materialize(model: Any, weights: Union[str, os.PathLike, Iterable[Union[str, os.PathLike]]], *,
                adapter: Optional[Union[str, os.PathLike]] = None, device: Union[str, torch.device] = "cpu") -> Any:
    """Load real weights into a model (GraphPeftModel, CapturedModel or GraphModule) captured on meta.

    weights: a folder of ``*.safetensors`` (a sharded checkpoint's index is followed), one file, or a
    list of files, with the model's state-dict names (what ``save_pretrained`` writes). Every tensor
    still on meta afterwards must be an adapter parameter: those are initialised by replaying the
    rewrite (seed torch first for reproducible values) or read from ``adapter`` (a saved adapter
    folder). Tensors keep the dtype the model was built with. Returns ``model``, changed in place.
    """
    gm = model.graph_module if hasattr(model, "graph_module") else model
    if not isinstance(gm, fx.GraphModule):
        raise GraphPeftError(f"materialize needs a graphpeft model or a GraphModule, got {type(model).__name__}")
    device = torch.device(device)
    files = _weight_files(weights)
    _load_base_weights(gm, files, device, adapter_params=_adapter_params(model))
    retarget_device(gm.graph, device)       # device='meta' constants recorded at capture
    for graph in model._other_graphs() if hasattr(model, "_other_graphs") else ():
        retarget_device(graph, device)       # the base graph and inactive adapters' graphs
    for name, buf in list(gm.named_buffers()):
        if not buf.is_meta and buf.device != device:
            _set_tensor(gm, name, buf.to(device))
    if hasattr(model, "records") and any(t.is_meta for t in gm.parameters()):
        _init_adapters(model, adapter)
    elif adapter is not None:
        _load_adapter(model, adapter)
    still = [n for n, t in (*gm.named_parameters(), *gm.named_buffers()) if t.is_meta]
    if still:
        raise GraphPeftError(f"{len(still)} weight(s) are still on the meta device after loading, e.g. {still[0]}; "
                             f"the files do not hold them: pass the weights save_pretrained wrote for this model")
    gm.recompile()
    return model


def _weight_files(weights: Any) -> list[Path]:
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights).expanduser()
        if path.is_dir():
            for index_name in _INDEX_NAMES:
                if (path / index_name).is_file():
                    index = json.loads((path / index_name).read_text())
                    return [path / f for f in sorted(set(index.get("weight_map", {}).values()))]
            files = sorted(path.glob("*.safetensors"))
            files = [f for f in files if not f.name.startswith("adapter_model")]
            if not files:
                raise GraphPeftError(f"{path} holds no *.safetensors files; pass the folder save_pretrained wrote "
                                     f"(safe_serialization) or the files themselves")
            return files
        items = [path]
    else:
        items = [Path(w).expanduser() for w in weights]
    for f in items:
        if not f.is_file():
            raise GraphPeftError(f"weights file {f} does not exist; pass a model folder or its *.safetensors files")
        if f.suffix != ".safetensors":
            raise GraphPeftError(f"{f} is not a .safetensors file; graphpeft loads weights only from safetensors")
    return items


def _adapter_params(model: Any) -> set[str]:
    return {p for rec in getattr(model, "records", ()) for p in rec.params}


def _aliases(gm: fx.GraphModule) -> dict[str, list[str]]:
    """name -> every name of the same tensor (tied weights share one tensor under two names)."""
    by_id: dict[int, list[str]] = {}
    for name, t in (*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)):
        by_id.setdefault(id(t), []).append(name)
    return {n: names for names in by_id.values() for n in names}


def _load_base_weights(gm: fx.GraphModule, files: list[Path], device: torch.device, adapter_params: set[str]) -> None:
    from safetensors import SafetensorError, safe_open

    aliases = _aliases(gm)
    wanted = {n for n in aliases if n not in adapter_params}
    done: set[str] = set()
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt", device=str(device))
        except (SafetensorError, OSError) as exc:
            raise GraphPeftError(f"{f} is not a readable safetensors file ({str(exc).splitlines()[0]})") from None
        with handle:
            keys = list(handle.keys())
            shift = _prefix_shift(keys, wanted)
            for key in keys:
                name = shift(key)
                if name not in wanted or name in done:
                    continue
                current = _get_tensor(gm, name)
                value = handle.get_tensor(key)
                if tuple(value.shape) != tuple(current.shape):
                    raise GraphPeftError(f"{key} has shape {tuple(value.shape)} in {f.name} but {tuple(current.shape)} "
                                         f"in the model; the files belong to another model or config")
                value = value.to(current.dtype) if current.is_floating_point() else value
                if isinstance(current, nn.Parameter):     # one object for all names, as the tie was
                    value = nn.Parameter(value, requires_grad=current.requires_grad)
                for alias in aliases[name]:
                    _set_tensor(gm, alias, value)
                    done.add(alias)


def _prefix_shift(keys: list[str], wanted: set[str]) -> Any:
    """File key -> model name; a checkpoint of the base model (``layers.0...``) fits a model with a head
    (``model.layers.0...``) and the other way round, as transformers allows."""
    if not keys or sum(k in wanted for k in keys) * 2 >= len(keys):
        return lambda k: k
    firsts = {n.split(".", 1)[0] for n in wanted}
    for prefix in sorted(firsts):
        if sum(f"{prefix}.{k}" in wanted for k in keys) * 2 >= len(keys):
            return lambda k, p=prefix: f"{p}.{k}"
    for prefix in sorted({k.split(".", 1)[0] for k in keys}):
        if sum(k.split(".", 1)[-1] in wanted for k in keys if k.startswith(prefix + ".")) * 2 >= len(keys):
            return lambda k, p=prefix: k[len(p) + 1:] if k.startswith(p + ".") else k
    return lambda k: k


def _get_tensor(gm: nn.Module, name: str) -> torch.Tensor:
    owner_path, _, leaf = name.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    return getattr(owner, leaf)


def _set_tensor(gm: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the parameter or buffer ``name`` with ``value`` (a parameter keeps its requires_grad)."""
    owner_path, _, leaf = name.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=bool(old is not None and old.requires_grad))
        owner._parameters[leaf] = value
    else:
        owner._buffers[leaf] = value



def _init_adapters(model: Any, adapter: Optional[Union[str, os.PathLike]]) -> None:
    """Adapter parameters on meta get the values a rewrite of the materialized base graph gives them."""
    from graphpeft.runtime.api import rewrite
    from graphpeft.engine.capture import CAPTURE_META
    from graphpeft.engine.rewriter import copy_graph

    gm = model.graph_module
    for name, config in model.peft_config.items():
        mine = {p for rec in model.records if rec.adapter == name for p in rec.params}
        if not any(_get_tensor(gm, p).is_meta for p in mine):
            continue
        scratch = fx.GraphModule(gm, copy_graph(model._base_graph), class_name="MaterializeGraph")
        scratch.meta[CAPTURE_META] = gm.meta.get(CAPTURE_META)
        replay = config.for_loading() if adapter is not None else config
        fresh = rewrite(scratch, replay, adapter_name=name, optimize=False).graph_module
        for p in mine:
            try:
                value = _get_tensor(fresh, p)
            except AttributeError:
                raise GraphPeftError(f"replaying the rewrite did not create {p}; rewrite the materialized model "
                                     f"instead (graphpeft.rewrite on the loaded model)") from None
            _set_tensor(gm, p, value.detach())
    if adapter is not None:
        _load_adapter(model, adapter)


def _load_adapter(model: Any, adapter: Union[str, os.PathLike]) -> None:
    from graphpeft.runtime.io import load_adapter_state, read_adapter

    _, tensors = read_adapter(adapter)
    load_adapter_state(model, tensors, model.active_adapter)


__all__ = ["materialize", "meta_model", "save_config"]
