"""The public entry points: ``rewrite`` and ``from_pretrained``."""

from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from graphpeft.engine.capture import capture
from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.rewriter import copy_graph
from graphpeft.runtime.apply import rewrite_graph
from graphpeft.runtime.io import load_adapter_state, read_adapter_config
from graphpeft.runtime.model import GraphPeftModel


def rewrite(model: nn.Module, config: Any, example_inputs: Any = None, adapter_name: str = "default",
            optimize: bool = True) -> GraphPeftModel:
    """Capture ``model`` (unless it is already an fx.GraphModule), run the config's pass, freeze the base.

    Returns a GraphPeftModel that takes the model's arguments and returns its output type. With
    ``optimize`` (the default) the result-preserving graph optimisations of ``graphpeft.runtime.optimize`` run
    on the rewritten graph (identity dropout dropped, scaling folded onto the rank-r activation, the
    attention mask converted once, or left out for a plain causal batch); a model on the meta device is rewritten the same way and
    gets its weights later with ``graphpeft.materialize``.
    """
    gm = capture(model, example_inputs)
    base_graph = copy_graph(gm.graph)
    gm, records = rewrite_graph(gm, config, adapter_name, optimize)
    out = GraphPeftModel(gm, {adapter_name: config}, tuple(records), base_graph)
    out.train(model.training if not isinstance(model, fx.GraphModule) else gm.training)
    if not isinstance(model, fx.GraphModule):
        out.keep_source_model(model)
    return out


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
