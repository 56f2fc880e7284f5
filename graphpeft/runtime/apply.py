"""A config's pass applied to a captured graph: the rule, modules_to_save, the optimisations, what trains.

``api.rewrite`` builds a GraphPeftModel on it; ``GraphPeftModel.add_adapter`` and generation's graphs
(captured with a cache) use it directly, so none of them needs the other.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.fx as fx

from graphpeft.engine import registry
from graphpeft.engine.pass_manager import run_passes
from graphpeft.engine.rewriter import get_attr_path
from graphpeft.runtime.optimize import optimize_graph
from graphpeft.runtime.trainable import apply_modules_to_save

# PEFT's sequence-classification wrapper trains the head in full under these names.
_SEQ_CLS_HEADS = ("classifier", "score")


def rewrite_graph(gm: fx.GraphModule, config: Any, adapter_name: str = "default",
                  optimize: bool = True) -> tuple[fx.GraphModule, list]:
    """``apply_method``, then the graph's parameters frozen except what the passes added: (graph module, records).

    A parameter a rule registered frozen (requires_grad=False) stays frozen.
    """
    gm, records = apply_method(gm, config, adapter_name, optimize)
    trainable = {name for rec in records for name in rec.params if get_attr_path(gm, name).requires_grad}
    for name, param in gm.named_parameters():
        param.requires_grad_(name in trainable)
    return gm, records


def apply_method(gm: fx.GraphModule, config: Any, adapter_name: str = "default",
                 optimize: bool = True, inference: bool = False) -> tuple[fx.GraphModule, list]:
    """Run ``config``'s pass on a captured graph (plus modules_to_save and the optimisations): (graph module, records).

    ``rewrite`` uses it on the training graph; generation uses it on the graphs captured with a cache,
    which only ever run inference (``inference=True``: the optimisations for a graph that saves nothing).
    """
    method = registry.method_for_config(config)
    to_save = list(getattr(config, "modules_to_save", None) or [])
    if getattr(config, "task_type", None) == "SEQ_CLS":
        to_save += [h for h in _SEQ_CLS_HEADS if h not in to_save]
    pass_config = config
    if hasattr(config, "modules_to_save") and to_save != list(config.modules_to_save or []):
        # as in PEFT, adapters never target a module that is saved in full (e.g. classifier.dense)
        pass_config = copy.copy(config)
        pass_config.modules_to_save = to_save
    result = run_passes(gm, [method.pass_cls(pass_config, adapter_name=adapter_name)])
    gm = result.graph_module
    records = list(result.records)
    if to_save:
        records += apply_modules_to_save(gm, to_save, adapter_name, {p for rec in records for p in rec.params},
                                        key_prefix=getattr(config, "saved_key_prefix", "base_model.model."))
    if optimize:
        optimize_graph(gm, inference=inference)
    return gm, records
