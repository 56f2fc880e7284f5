"""Inference graphs that call torch's functions directly: less Python per op for a decode step.

A captured graph calls ATen through the dispatcher's ``OpOverload`` objects (``torch.ops.aten.add.Tensor``),
whose Python ``__call__`` and generic argument parsing cost a few microseconds per op more than torch's
own bindings (``torch.add``), which eager models call. A decode step runs a few hundred small ops, so this
overhead is a visible part of it. For generation's graphs (inference only, under ``no_grad``), each op
with an exactly equivalent torch binding is retargeted to it, and the graph's runtime metadata asserts
(``aten._assert_tensor_metadata``: checks that inputs still have the dtype/device seen at capture, no
output) are dropped:

    before:  x ─ torch.ops.aten.linear.default(x, W) ─ torch.ops.aten.add.Tensor(·, y) ─
             _assert_tensor_metadata(x, dtype=float32)
    after:   x ─ torch._C._nn.linear(x, W) ─ torch.add(·, y) ─

A concatenation of a tensor with an empty constant is a copy of that tensor. transformers' cache layers
start from ``torch.tensor([])`` and concatenate the past keys and values to it, so a captured decode step
copies the whole cache once per layer before it appends the new position (one more full copy of every
layer's keys and values per token). Where the copy is only read (no user mutates it, it is not an
output, the dtype is the same), the tensor itself is used:

    before:  past ─ cat([detach_(lift_fresh_copy(tensor([]))), past]) ─ cat([·, new]) ─
    after:   past ─ cat([past, new]) ─

Two ATen ops have no binding but a cheaper exact form: ``aten.slice.Tensor`` with constant bounds is
Python's basic indexing (``x[..., a:b]``, the same view), and ``aten.to.dtype`` to the dtype its input
already has returns that input, so the node is dropped.

Equivalence is by signature: every mapped binding takes the ATen op's arguments in the same order with
the same meaning (the schema's positional arguments; the keyword names where a node uses them), so a
node is only retargeted when its keyword arguments are among those the binding accepts.
"""

from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
import torch.fx as fx

aten = torch.ops.aten

# ATen overload -> (torch binding, keyword arguments the binding accepts under the same names)
_BINDINGS: dict[object, tuple[Callable, frozenset]] = {
    aten.add.Tensor: (torch.add, frozenset({"alpha"})),
    aten.sub.Tensor: (torch.sub, frozenset({"alpha"})),
    aten.mul.Tensor: (torch.mul, frozenset()),
    aten.div.Tensor: (torch.div, frozenset()),
    aten.neg.default: (torch.neg, frozenset()),
    aten.pow.Tensor_Scalar: (torch.pow, frozenset()),
    aten.rsqrt.default: (torch.rsqrt, frozenset()),
    aten.cos.default: (torch.cos, frozenset()),
    aten.sin.default: (torch.sin, frozenset()),
    aten.mean.dim: (torch.mean, frozenset({"keepdim", "dtype"})),
    aten.linear.default: (torch._C._nn.linear, frozenset()),
    aten.matmul.default: (torch.matmul, frozenset()),
    aten.bmm.default: (torch.bmm, frozenset()),
    aten.silu.default: (torch._C._nn.silu, frozenset()),
    aten.gelu.default: (torch._C._nn.gelu, frozenset({"approximate"})),
    aten.tanh.default: (torch.tanh, frozenset()),
    aten.softmax.int: (torch.softmax, frozenset({"dtype"})),
    aten.cat.default: (torch.cat, frozenset()),
    aten.unsqueeze.default: (torch.unsqueeze, frozenset()),
    aten.transpose.int: (torch.transpose, frozenset()),
    aten.reshape.default: (torch.reshape, frozenset()),
    aten.view.default: (torch.Tensor.view, frozenset()),
    aten.expand.default: (torch.Tensor.expand, frozenset()),
    aten.contiguous.default: (torch.Tensor.contiguous, frozenset()),
    aten.to.dtype: (torch.Tensor.to, frozenset({"non_blocking", "copy", "memory_format"})),
    aten.to.device: (torch.Tensor.to, frozenset({"non_blocking", "copy", "memory_format"})),
    aten.embedding.default: (torch.embedding, frozenset()),
    aten.scaled_dot_product_attention.default: (
        torch._C._nn.scaled_dot_product_attention,
        frozenset({"attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"})),
}

_ASSERTS = {aten._assert_tensor_metadata.default}
_CONSTANT_WRAPPERS = {aten.lift_fresh_copy.default, aten.detach_.default, aten.detach.default}
_SLICE_ARGS = ("dim", "start", "end", "step")


def lean_calls(gm: fx.GraphModule, *, recompile: bool = True) -> dict[str, int]:
    """Retarget ``gm``'s ATen ops to torch's bindings (or basic indexing), drop its metadata asserts, casts to
    the dtype a tensor has and copies of the cache (inference graphs only): counts of each."""
    direct = dropped = casts = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _ASSERTS and not node.users:
            gm.graph.erase_node(node)
            dropped += 1
            continue
        if node.target is aten.to.dtype and _same_dtype(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            casts += 1
            continue
        index = _slice_index(node) if node.target is aten.slice.Tensor else None
        if index is not None:
            node.target, node.args, node.kwargs = operator.getitem, (node.args[0], index), {}
            direct += 1
            continue
        binding = _BINDINGS.get(node.target)
        if binding is not None and set(node.kwargs) <= binding[1]:
            node.target = binding[0]
            direct += 1
    copies = _drop_empty_concats(gm)
    if recompile and (direct or dropped or casts or copies):
        gm.recompile()
    return {"direct": direct, "asserts_dropped": dropped, "casts_dropped": casts, "empty_concats_dropped": copies}


def _same_dtype(node: fx.Node) -> bool:
    """``to(x, dtype)`` that returns ``x`` itself: no copy asked, x already of that dtype."""
    source = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    dtype = node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
    extra = dict(zip(("non_blocking", "copy", "memory_format"), node.args[2:]), **node.kwargs)
    return (isinstance(source, torch.Tensor) and isinstance(dtype, torch.dtype) and source.dtype == dtype
            and not extra.get("copy") and extra.get("memory_format") is None)


def _slice_index(node: fx.Node) -> Optional[tuple]:
    """``slice(x, dim, start, end, step)`` with constant bounds as an index for ``x[...]``; None otherwise."""
    values = dict(zip(_SLICE_ARGS, node.args[1:]), **node.kwargs)
    dim, start, end, step = (values.get(k, d) for k, d in zip(_SLICE_ARGS, (0, None, None, 1)))
    source = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if not isinstance(source, torch.Tensor) or not all(isinstance(v, int) or v is None for v in (start, end)) \
            or not isinstance(dim, int) or not isinstance(step, int) or step < 1 or not -source.dim() <= dim < source.dim():
        return None
    cut = slice(start, end, step)
    if dim < 0:
        return (Ellipsis, cut) + (slice(None),) * (-dim - 1)
    return (slice(None),) * dim + (cut,)


def _empty_constant(gm: fx.GraphModule, node: object) -> bool:
    """``node`` is a constant 1-D tensor with no elements (through lift_fresh_copy/detach)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _CONSTANT_WRAPPERS \
            and len(node.users) == 1:
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return False
    value = getattr(gm, node.target, None)
    return isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == 0


def _only_read(node: fx.Node) -> bool:
    def reads(user: fx.Node) -> bool:
        schema = getattr(user.target, "_schema", None)
        if user.op == "output" or (schema is not None and schema.is_mutable):
            return False
        return user.op == "call_function" and not getattr(user.target, "__name__", "").endswith("_")
    return all(reads(user) for user in node.users)


def _drop_empty_concats(gm: fx.GraphModule) -> int:
    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.cat.default, torch.cat) or not node.args:
            continue
        parts = node.args[0]
        if not isinstance(parts, (list, tuple)) or len(parts) != 2:
            continue
        kept = [p for p in parts if not _empty_constant(gm, p)]
        if len(kept) != 1 or not isinstance(kept[0], fx.Node) or not _only_read(node):
            continue
        before, after = kept[0].meta.get("val"), node.meta.get("val")
        if before is None or after is None or before.dtype != after.dtype:
            continue
        node.replace_all_uses_with(kept[0])
        wrappers = [p for p in parts if p is not kept[0]]
        gm.graph.erase_node(node)
        while wrappers and isinstance(wrappers[0], fx.Node) and not wrappers[0].users:
            inner = wrappers[0].args[0] if wrappers[0].op == "call_function" else None
            gm.graph.erase_node(wrappers[0])
            wrappers = [inner] if inner is not None else []
        dropped += 1
    return dropped


__all__ = ["lean_calls"]
