"""The sequence inputs of a captured graph, and positions prepended to them.

A pass that puts tokens in front of a sequence (virtual tokens, or a key/value prefix laid out as
positions) makes the whole graph see the longer sequence by extending the inputs where they enter:

    before:  input_ids ──────────────────────────────────── (every reader)
    after:   input_ids ─ cat([new_full((B, n), fill), ·], dim=1) ─ (every reader)

Every shape, position index and mask the model derives from its inputs then follows (positions
0 .. n+L-1, a causal mask over n+L), without knowing the model. Inputs of one sequence are the
placeholders whose dim 1 is the same (symbolic) size as the main input's: ``input_ids`` with its
``attention_mask`` and ``token_type_ids``; ``decoder_input_ids`` with the decoder's.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

aten = torch.ops.aten
# names that share the main input's sequence axis when the graph carries no shape metadata
_COMPANIONS = ("attention_mask", "token_type_ids", "position_ids")


def placeholder(gm: fx.GraphModule, name: str) -> Optional[fx.Node]:
    return next((n for n in gm.graph.nodes if n.op == "placeholder" and n.target == name), None)


def sequence_inputs(gm: fx.GraphModule, main: str = "input_ids") -> list[fx.Node]:
    """``main`` and the other tensor inputs laid out on its sequence axis (dim 1), main first."""
    head = placeholder(gm, main)
    if head is None:
        return []
    length = _dim1(head)
    prefix = main[: -len("input_ids")] if main.endswith("input_ids") else ""
    found = [head]
    for node in gm.graph.nodes:
        if node.op != "placeholder" or node is head:
            continue
        if length is not None and _dim1(node) is not None:
            if str(_dim1(node)) == str(length):
                found.append(node)
        elif node.target in tuple(prefix + c for c in _COMPANIONS):
            found.append(node)
    return found


def prepend_positions(gm: fx.GraphModule, node: fx.Node, n: int, fill: int) -> tuple[fx.Node, list[fx.Node]]:
    """Every reader of ``node`` reads ``cat([full((B, n), fill), node], dim=1)`` instead.

    Returns (the concatenation node, the nodes inserted), so the caller can stamp and record them.
    """
    graph = gm.graph
    anchor = _last_placeholder(graph)
    with graph.inserting_after(anchor):
        batch = graph.call_function(aten.sym_size.int, (node, 0))
    with graph.inserting_after(batch):
        pad = graph.call_function(aten.new_full.default, (node, [batch, n], fill))
    with graph.inserting_after(pad):
        joined = graph.call_function(aten.cat.default, ([pad, node], 1))
    inserted = [batch, pad, joined]
    node.replace_all_uses_with(joined, delete_user_cb=lambda user: user not in inserted)
    return joined, inserted


def _last_placeholder(graph: fx.Graph) -> fx.Node:
    return [n for n in graph.nodes if n.op == "placeholder"][-1]


def _dim1(node: fx.Node) -> Optional[object]:
    val = node.meta.get("val")
    shape = getattr(val, "shape", None)
    if shape is None or len(shape) < 2:
        return None
    return shape[1]
