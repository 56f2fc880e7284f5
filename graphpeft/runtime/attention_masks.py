"""The attention mask of a rewritten graph: converted once for every layer, and left out when it is only causal.

A captured graph makes one boolean mask [B, 1, Sq, Sk] (padding, causality, windows, prefixes) and hands it
to every ``scaled_dot_product_attention``. Two costs follow, and ``share_attention_masks`` removes both:

1. sdpa turns a boolean mask into ``zeros, masked_fill(~mask, -inf)`` in the query's dtype on every call,
   and in training each layer's converted copy is saved for backward (L float masks instead of one). The
   same conversion done once in the graph gives every layer bit-identical inputs.
2. For a batch without padding on square scores, the mask is plain causality (row i sees keys 0..i).
   transformers then passes no mask at all and ``is_causal=True`` (``masking_utils.sdpa_mask`` skips it),
   so its attention saves no mask for backward and skips the blocks above the diagonal. The shared node
   checks the boolean mask at run time and, when it is exactly that pattern, gives the layers ``None``
   and ``is_causal=True``: the same attention, as the model's own forward runs it.

    before:  mask ─┬─ sdpa_1(q1, k1, v1, mask)
                   └─ sdpa_L(qL, kL, vL, mask)
    after:   mask ─ m = additive_mask_unless_causal(mask, dtype) ─┬─ sdpa_1(.., attn_mask=m, is_causal=c)
                    c = m is None ────────────────────────────────┴─ sdpa_L(.., attn_mask=m, is_causal=c)

Under tracing (torch.compile, fake or meta tensors) the check is not made and the mask is always converted:
a traced graph has no data-dependent branch. ``boolean_attention_masks`` undoes the whole change for ONNX
export, whose exporter turns a boolean mask into the finite additive form ONNX Runtime trains with.
"""

from __future__ import annotations

import contextlib
import operator
from collections import defaultdict
from typing import Iterator, Optional

import torch
import torch.fx as fx

from graphpeft.engine.match import STAMP
from graphpeft.engine.rewriter import copy_graph

aten = torch.ops.aten

_SDPA = (aten.scaled_dot_product_attention.default,)
_SHARED_MASK = STAMP + ".shared_attention_mask"    # node meta: the shared node's original boolean mask
_CAUSAL_FLAG = STAMP + ".causal_flag"              # node meta: ``m is None``; each sdpa's own is_causal was False
_MASK_ARG, _CAUSAL_ARG = 3, 5                      # sdpa(query, key, value, attn_mask, dropout_p, is_causal, ...)


def additive_mask_unless_causal(mask: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``None`` when the boolean ``mask`` is exactly the causal pattern on square scores, else its additive form
    (0 where attended, -inf where not: what sdpa makes of a boolean mask, bit for bit)."""
    if _is_plain_causal(mask):
        return None
    return torch.zeros_like(mask, dtype=dtype).masked_fill(mask.logical_not(), float("-inf"))


def _is_plain_causal(mask: torch.Tensor) -> bool:
    """mask[b, h, i, j] == (j <= i) for every b, h and a square [S, S] (what sdpa's is_causal=True means)."""
    if type(mask) is not torch.Tensor or mask.is_meta or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False                  # fake, functional or traced tensors: no data-dependent branch
    if mask.dim() < 2 or mask.shape[-2] != mask.shape[-1] or mask.shape[-1] < 2:
        return False
    rows, cols = mask.shape[-2], mask.shape[-1]
    causal = torch.ones(rows, cols, dtype=torch.bool, device=mask.device).tril_()
    return torch.equal(mask, causal.expand_as(mask))


def share_attention_masks(gm: fx.GraphModule, *, recompile: bool = True) -> int:
    """Give the attention ops that read one boolean mask its shared form (see the module docstring); returns
    how many masks were shared. An op that reads the mask on its own is left as it is."""
    readers: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _SDPA or _sdpa_arg(node, "is_causal", _CAUSAL_ARG, False):
            continue
        mask, query = _sdpa_arg(node, "attn_mask", _MASK_ARG, None), node.args[0].meta.get("val")
        value = mask.meta.get("val") if isinstance(mask, fx.Node) else None
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool and isinstance(query, torch.Tensor):
            readers[(mask, query.dtype)].append(node)
    shared = 0
    for (mask, dtype), users in readers.items():
        if len(users) < 2:
            continue
        with gm.graph.inserting_after(mask):
            additive = gm.graph.call_function(additive_mask_unless_causal, (mask, dtype))
        with gm.graph.inserting_after(additive):
            causal = gm.graph.call_function(operator.is_, (additive, None))
        value = mask.meta["val"]                  # fake tensors, as capture's: the general (masked) case
        additive.meta["val"] = torch.zeros_like(value, dtype=dtype).masked_fill(value.logical_not(), float("-inf"))
        causal.meta["val"] = False
        for node in (additive, causal):           # part of the model, where the mask is made: not stamped
            if "nn_module_stack" in mask.meta:
                node.meta["nn_module_stack"] = dict(mask.meta["nn_module_stack"])
        additive.meta[_SHARED_MASK], causal.meta[_CAUSAL_FLAG] = mask, True
        for user in users:
            _set_sdpa_arg(user, "attn_mask", _MASK_ARG, additive)
            _set_sdpa_arg(user, "is_causal", _CAUSAL_ARG, causal)
        shared += 1
    if recompile and shared:
        gm.recompile()
    return shared


@contextlib.contextmanager
def boolean_attention_masks(gm: fx.GraphModule) -> Iterator[fx.GraphModule]:
    """Within the block ``gm`` runs the graph where every attention op takes its boolean mask and
    ``is_causal=False`` again (``share_attention_masks`` undone): what ONNX export traces."""
    if not any(n.meta.get(_SHARED_MASK) is not None for n in gm.graph.nodes):
        yield gm
        return
    original, graph = gm.graph, copy_graph(gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    for node in [n for n in graph.nodes if n.meta.get(_CAUSAL_FLAG)]:
        for user in list(node.users):
            _set_sdpa_arg(user, "is_causal", _CAUSAL_ARG, False)
        graph.erase_node(node)
    for additive in [n for n in graph.nodes if n.meta.get(_SHARED_MASK) is not None]:
        additive.replace_all_uses_with(by_name[additive.meta[_SHARED_MASK].name])
        graph.erase_node(additive)
    gm.graph = graph                 # the setter recompiles; the module and its attributes stay the same
    try:
        yield gm
    finally:
        gm.graph = original


def _sdpa_arg(node: fx.Node, name: str, index: int, default: object) -> object:
    return node.kwargs[name] if name in node.kwargs else (node.args[index] if len(node.args) > index else default)


def _set_sdpa_arg(node: fx.Node, name: str, index: int, value: object) -> None:
    if name not in node.kwargs and len(node.args) > index:
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)


__all__ = ["additive_mask_unless_causal", "boolean_attention_masks", "share_attention_masks"]
