"""Activation checkpointing on a captured graph: each repeated layer runs under ``torch.utils.checkpoint``.

Hugging Face models checkpoint their decoder layers module by module; a captured graph has no
modules to wrap, so the graph is cut where its nodes change layer (the module path of each op, from
``nn_module_stack``: ``model.layers.3.self_attn.q_proj`` belongs to layer ``model.layers.3``). Each
layer becomes a submodule of a new GraphModule over the same parameters, and the submodules of the
checkpointed layers are called through the checkpoint function: their activations are not kept for
the backward pass but recomputed from the layer's inputs (dropout masks included, as the checkpoint
restores the random state). The maths is unchanged; only what is stored between forward and backward.

    before:  x ─ embed ─ [layer 0 ops] ─ [layer 1 ops] ─ norm ─ head ─ y
    after:   x ─ submod_0 ─ checkpoint(submod_1) ─ checkpoint(submod_2) ─ submod_3 ─ y
             (submod_0: embed; submod_1, submod_2: one layer each; submod_3: norm and head)

Nodes without a module path (shape arithmetic, glue a pass added) stay in the segment they follow.
"""

from __future__ import annotations

import copy
import functools
import re
import warnings
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.split_module import split_module

# the first ``.<index>`` of a module path ends the layer's path: model.layers.3, encoder.block.0, h.1
_LAYER_PATH = re.compile(r"^((?:.*?\.)?\d+)(?:\.|$)")
_OUTSIDE = ""     # a node with a module path outside every layer (embeddings, final norm, head)


class CheckpointedLayer(nn.Module):
    """Calls ``layer`` through ``checkpoint_fn`` (``torch.utils.checkpoint.checkpoint`` with its options)."""

    def __init__(self, layer: nn.Module, checkpoint_fn: Callable[..., Any], inputs_need_grad: bool):
        super().__init__()
        self.layer = layer
        self.checkpoint_fn = checkpoint_fn
        self.inputs_need_grad = inputs_need_grad

    def forward(self, *args: Any) -> Any:
        if self.inputs_need_grad:
            # reentrant checkpointing only back-propagates into a segment whose inputs need grad; as
            # transformers' enable_input_require_grads does for embeddings, mark the frozen inputs
            args = tuple(a.requires_grad_() if _is_frozen_float(a) else a for a in args)
        return self.checkpoint_fn(self.layer, *args)


def _is_frozen_float(value: Any) -> bool:
    return hasattr(value, "is_floating_point") and value.is_floating_point() and not value.requires_grad


def checkpoint_function(options: dict[str, Any], offload: bool = False) -> Callable[..., Any]:
    """``torch.utils.checkpoint.checkpoint`` with the given options; ``offload`` keeps saved inputs on the host."""
    from torch.utils.checkpoint import checkpoint

    if not offload:
        return functools.partial(checkpoint, **options)

    def offloaded(function: Any, *args: Any) -> Any:
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return checkpoint(function, *args, **options)
    return offloaded


def layer_of(node: fx.Node) -> Optional[str]:
    """The layer path of a node's module (``model.layers.3``), ``""`` outside layers, None without a path."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    match = _LAYER_PATH.match(path)
    return match.group(1) if match else _OUTSIDE


def layer_segments(graph: fx.Graph) -> tuple[dict[fx.Node, int], dict[int, str]]:
    """Each computing node's segment number (in graph order), and each segment's layer path."""
    segment_of: dict[fx.Node, int] = {}
    layer_path: dict[int, str] = {}
    current, current_layer = 0, _OUTSIDE
    layer_path[0] = _OUTSIDE
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        layer = layer_of(node)
        if layer is not None and layer != current_layer:
            current, current_layer = current + 1, layer
            layer_path[current] = layer
        segment_of[node] = current
    return segment_of, layer_path


def checkpointed(gm: fx.GraphModule, checkpoint_fn: Callable[..., Any], every_n_layers: int = 1,
                 inputs_need_grad: bool = False) -> fx.GraphModule:
    """A GraphModule computing what ``gm`` computes, its layers called through ``checkpoint_fn``.

    Every ``every_n_layers``-th layer is checkpointed (1: all). The result shares ``gm``'s parameters
    and keeps its calling convention and meta; it must be rebuilt when ``gm``'s graph changes.
    """
    segment_of, layer_path = layer_segments(gm.graph)
    split = split_module(gm, gm, lambda node: segment_of[node], keep_original_order=True)
    with warnings.catch_warnings():        # torch's pytree deprecation chatter on copying tree specs
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        split.graph._codegen = copy.deepcopy(gm.graph._codegen)    # same calling convention (pytree in/out specs)
    split.recompile()
    split.meta.update(gm.meta)
    layers = sorted(n for n in layer_path if layer_path[n] and hasattr(split, f"submod_{n}"))
    for ordinal, number in enumerate(layers):
        if ordinal % every_n_layers == 0:
            name = f"submod_{number}"
            setattr(split, name, CheckpointedLayer(getattr(split, name), checkpoint_fn, inputs_need_grad))
    split.training = gm.training
    return split


def count_checkpointed(gm: nn.Module) -> int:
    """How many layers of a module built by ``checkpointed`` run under checkpointing."""
    return sum(isinstance(m, CheckpointedLayer) for m in gm.modules())
