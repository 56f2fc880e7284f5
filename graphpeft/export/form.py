"""The form an adapter is exported in: the model as it is, or the replacement its method asks for.

A method's pass class may define the hook

    export_form(model, adapter_name, config) -> Optional[(adapter_config dict, {PEFT key: tensor})]

returning another adapter, in PEFT's format, that computes what the adapter computes and that export
should write instead (e.g. an adapter whose ranks were allocated in training, as plain low-rank pairs of
the kept ranks). ``export_form`` then rebuilds the model as that adapter: the base graph rewritten by the
replacement config's pass, its tensors loaded, trainable when the original adapter was. Nothing here
names a method: the replacement's method comes from the registry, by the config's ``peft_type``.

    form = export_form(peft_model)      # form.model: what to export; form.replaced: what changed, or None
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch.fx as fx

from graphpeft.engine import registry
from graphpeft.engine.errors import GraphPeftError

HOOK = "export_form"


@dataclass
class ExportForm:
    """The model export writes, and, when it replaced the adapter, a description of the replacement."""

    model: Any
    replaced: Optional[dict[str, Any]] = None     # {"from", "method", "peft_type", "adapter", "ranks"}

    @property
    def statement(self) -> Optional[str]:
        """One line for the command's output, or None when the adapter is exported as it is."""
        if self.replaced is None:
            return None
        r = self.replaced
        ranks = ", ".join(f"{path}: {rank}" for path, rank in r["ranks"].items())
        return (f"{r['from']} adapter {r['adapter']!r} is exported as plain {r['method']} (peft_type "
                f"{r['peft_type']}) of ranks {{{ranks}}}" if ranks else
                f"{r['from']} adapter {r['adapter']!r} is exported as {r['method']} (peft_type {r['peft_type']})")


def export_form(model: Any, adapter_name: Optional[str] = None) -> ExportForm:
    """``model`` itself, or, when the active adapter's method defines ``export_form``, the model rebuilt as
    the adapter that hook returns (one-line GraphPeftError when the hook refuses)."""
    adapter = adapter_name or getattr(model, "active_adapter", None)
    config = getattr(model, "peft_config", {}).get(adapter)
    if config is None:
        return ExportForm(model)
    method = registry.method_for_config(config)
    hook = getattr(method.pass_cls, HOOK, None)
    if hook is None:
        return ExportForm(model)
    replacement = hook(model, adapter, config)
    if replacement is None:
        return ExportForm(model)
    config_dict, tensors = replacement
    rebuilt = rebuild(model, adapter, config_dict, tensors)
    new_method = registry.method_for_config(rebuilt.peft_config[adapter])
    ranks: dict[str, int] = {}
    for rec in rebuilt.records:
        if rec.adapter == adapter and "r" in rec.info:
            ranks.setdefault(rec.module_path, int(rec.info["r"]))
    return ExportForm(rebuilt, {"from": method.name, "method": new_method.name,
                                "peft_type": new_method.config_cls.peft_type, "adapter": adapter, "ranks": ranks})


def rebuild(model: Any, adapter: str, config_dict: dict[str, Any], tensors: dict) -> Any:
    """A GraphPeftModel over ``model``'s base graph and base weights (shared, not copied) with one adapter,
    ``adapter``, of ``config_dict`` (PEFT's adapter_config.json), holding ``tensors`` (PEFT's keys)."""
    from graphpeft.runtime.api import rewrite
    from graphpeft.engine.capture import CAPTURE_META, capture_info
    from graphpeft.runtime.io import load_adapter_state
    from graphpeft.engine.rewriter import copy_graph, get_attr_path

    gm = model.graph_module
    trainable = any(get_attr_path(gm, p).requires_grad
                    for rec in model.records if rec.adapter == adapter for p in rec.params)
    peft_type = config_dict.get("peft_type")
    if not peft_type:
        raise GraphPeftError(f"the export form of adapter {adapter!r} has no peft_type; this is a bug, "
                             f"please report it")
    config = registry.method_for_peft_type(peft_type).config_cls.from_dict(config_dict)
    config.inference_mode = not trainable
    scratch = fx.GraphModule(gm, copy_graph(model._base_graph), class_name="ExportGraph")
    scratch.meta[CAPTURE_META] = capture_info(gm)
    scratch.train(model.training)
    flags = {id(p): (p, p.requires_grad) for p in gm.parameters()}
    try:
        rebuilt = rewrite(scratch, config.for_loading(), adapter_name=adapter)
    finally:       # rewrite freezes the base weights it reads, which the original model shares
        for p, flag in flags.values():
            p.requires_grad_(flag)
    rebuilt.peft_config[adapter] = config
    load_adapter_state(rebuilt, tensors, adapter)
    if not trainable:
        for p in rebuilt.parameters():
            p.requires_grad_(False)
    rebuilt.train(model.training)
    return rebuilt
