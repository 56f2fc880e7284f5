"""The public entry points: ``rewrite`` and ``from_pretrained``."""

from __future__ import annotations

import copy
from typing import Any

import torch.fx as fx
from torch import nn

from graphpeft import registry
from graphpeft.capture import capture
from graphpeft.errors import GraphPeftError
from graphpeft.io import load_adapter_state, read_adapter_config
from graphpeft.model import GraphPeftModel
from graphpeft.optimize import optimize_graph
from graphpeft.pass_manager import run_passes
from graphpeft.rewriter import copy_graph, get_attr_path
from graphpeft.trainable import apply_modules_to_save

# PEFT's sequence-classification wrapper trains the head in full under these names.
_SEQ_CLS_HEADS = ("classifier", "score")


def rewrite(model: nn.Module, config: Any, example_inputs: Any = None, adapter_name: str = "default",
            optimize: bool = True) -> GraphPeftModel:
    """Capture ``model`` (unless it is already an fx.GraphModule), run the config's pass, freeze the base.

    Returns a GraphPeftModel that takes the model's arguments and returns its output type. With
    ``optimize`` (the default) the result-preserving graph optimisations of ``graphpeft.optimize`` run
    on the rewritten graph (identity dropout dropped, scaling folded into the small weight, adapter
    projections that share an input fused); a model on the meta device is rewritten the same way and
    gets its weights later with ``graphpeft.materialize``.
    """
    gm = capture(model, example_inputs)
    base_graph = copy_graph(gm.graph)
    gm, records = apply_method(gm, config, adapter_name, optimize)
    # what the passes added trains, except parameters a rule registered frozen (requires_grad=False)
    trainable = {name for rec in records for name in rec.params if get_attr_path(gm, name).requires_grad}
    for name, param in gm.named_parameters():
        param.requires_grad_(name in trainable)
    out = GraphPeftModel(gm, {adapter_name: config}, tuple(records), base_graph)
    out.train(model.training if not isinstance(model, fx.GraphModule) else gm.training)
    if not isinstance(model, fx.GraphModule):
        out.keep_source_model(model)
    return out


def apply_method(gm: fx.GraphModule, config: Any, adapter_name: str = "default",
                 optimize: bool = True) -> tuple[fx.GraphModule, list]:
    """Run ``config``'s pass on a captured graph (plus modules_to_save and the optimisations): (graph module, records).

    ``rewrite`` uses it on the training graph; generation uses it on the graphs captured with a cache.
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
        optimize_graph(gm)
    return gm, records


def from_pretrained(model: nn.Module, adapter_dir: str, example_inputs: Any = None, adapter_name: str = "default",
                    is_trainable: bool = False) -> GraphPeftModel:
    """Rewrite ``model`` with the adapter saved in ``adapter_dir`` (by graphpeft or by PEFT) and load its weights.

    As in PEFT, the adapter is frozen and the model in eval mode unless ``is_trainable``.
    """
    config, tensors = read_adapter_config(adapter_dir, is_trainable)
    if not isinstance(model, nn.Module):
        raise GraphPeftError(f"from_pretrained needs a torch.nn.Module, got {type(model).__name__}")
    peft_model = rewrite(model, config.for_loading(), example_inputs, adapter_name)
    peft_model.peft_config[adapter_name] = config
    load_adapter_state(peft_model, tensors, adapter_name)
    if not is_trainable:
        for p in peft_model.parameters():
            p.requires_grad_(False)
        peft_model.eval()
    return peft_model

