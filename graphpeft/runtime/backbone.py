"""The backbone of a captured model: its graph up to the output head, and a view of the head.

transformers calls a model without its head the ``base_model`` (``LlamaForCausalLM.base_model`` is the
``LlamaModel``, whose output has ``last_hidden_state``), and the head ``get_output_embeddings()``.
TRL's trainers use both: they compute the causal-LM loss from the last hidden states and the head's
weight in chunks, without materialising the logits. A captured graph has no such modules, so the
backbone is the same graph with its output moved to the input of the output head (the linear op whose
result reaches the graph's output through shape ops only, graphpeft.engine.match.output_heads):

    before:  ids ─ ... ─ norm ─ h ─ linear(lm_head.weight) ─ logits ─▶ output
    after:   ids ─ ... ─ norm ─ h ─▶ output                 (the head and what follows it removed)
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.match import Site, find_sites, output_heads
from graphpeft.engine.rewriter import copy_graph, get_attr_path


def output_head(gm: fx.GraphModule) -> Site:
    """The output head's site (the LM head of a causal LM); a clear error when the graph has none."""
    heads = set(output_heads(gm))
    sites = [s for s in find_sites(gm) if s.kind == "linear" and s.module_path in heads]
    if not sites:
        raise GraphPeftError("the captured graph has no linear output head (an op producing the logits); "
                             "its backbone cannot be separated from it")
    return sites[-1]


def backbone_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over ``gm``'s parameters that returns ``(hidden,)``, the input of the output head."""
    head = output_head(gm)
    graph = copy_graph(gm.graph)
    hidden = next(n for n in graph.nodes if n.name == head.node.name).args[0]
    output = graph.output_node()
    output.args = ((hidden,),)
    codegen = graph._codegen
    if hasattr(codegen, "pytree_info"):    # torch.export graphs unflatten their outputs with a tree spec
        codegen.pytree_info = codegen.pytree_info._replace(out_spec=pytree.tree_structure((0,)))
    backbone = fx.GraphModule(gm, graph, class_name="BackboneGraph")
    graph.eliminate_dead_code()
    backbone.recompile()
    backbone.meta.update(gm.meta)
    backbone.training = gm.training
    return backbone


class OutputHead(nn.Module):
    """The output head's weight and bias, as ``get_output_embeddings()`` returns them (not a copy)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, self.weight, self.bias)


def output_head_view(gm: fx.GraphModule) -> OutputHead:
    head = output_head(gm)
    bias_node = head.node.args[2] if len(head.node.args) > 2 else None
    bias = get_attr_path(gm, str(bias_node.target)) if isinstance(bias_node, fx.Node) and bias_node.op == "get_attr" \
        else None
    return OutputHead(get_attr_path(gm, head.weight_name), bias)


class Backbone:
    """``model.base_model`` of a GraphPeftModel: its running graph up to the output head.

    Called with the model's arguments; returns a ``BaseModelOutputWithPast`` with ``last_hidden_state``.
    Follows the model's state (active adapter, ``disable_adapter``, checkpointing while training).
    """

    def __init__(self, model: Any):
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPast

        out = self.model._call(self.model._backbone_module(), args, dict(kwargs))
        return BaseModelOutputWithPast(last_hidden_state=last_hidden_state(out, kwargs))


def last_hidden_state(out: Any, inputs: dict) -> torch.Tensor:
    """The backbone's hidden states, cut to the positions of the given tokens (virtual tokens come first)."""
    hidden = out[0]
    ids = inputs.get("input_ids")
    if ids is not None and hidden.dim() == 3 and hidden.shape[1] > ids.shape[1]:
        hidden = hidden[:, -ids.shape[1]:]
    return hidden
