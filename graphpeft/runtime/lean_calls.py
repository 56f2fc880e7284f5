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

Equivalence is by signature: every mapped binding takes the ATen op's arguments in the same order with
the same meaning (the schema's positional arguments; the keyword names where a node uses them), so a
node is only retargeted when its keyword arguments are among those the binding accepts.
"""

from __future__ import annotations

from typing import Callable

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


def lean_calls(gm: fx.GraphModule, *, recompile: bool = True) -> dict[str, int]:
    """Retarget ``gm``'s ATen ops to torch's bindings and drop its metadata asserts (inference graphs only)."""
    direct = dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _ASSERTS and not node.users:
            gm.graph.erase_node(node)
            dropped += 1
            continue
        binding = _BINDINGS.get(node.target)
        if binding is not None and set(node.kwargs) <= binding[1]:
            node.target = binding[0]
            direct += 1
    if recompile and (direct or dropped):
        gm.recompile()
    return {"direct": direct, "asserts_dropped": dropped}


__all__ = ["lean_calls"]
