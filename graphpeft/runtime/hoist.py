"""Adapter computations that read only parameters, done once per parameter update instead of once per call.

An inference graph (generation's prefill and step graphs) recomputes, on every call, values that depend
on weights alone: the fused ``cat(A_q, A_k, A_v)`` of ``fuse_shared_input``, a scaling folded into a
small weight (``mul(B, s)``), DoRA's weight norm ``|| W + s B A ||``. A decode step runs the graph once
per token, so these are paid once per token though they change only when the parameters do.

    before:  get_attr(A_q) ┐
             get_attr(A_k) ├─ cat ─ linear(x, ·) ─ ...        (cat on every call)
             get_attr(A_v) ┘
    after:   get_attr(_graphpeft_hoisted_0) ─ linear(x, ·) ─ ...
             weights graph: cat(A_q, A_k, A_v) -> _graphpeft_hoisted_0, rerun when a parameter it reads
             changes (its version counter, storage or identity), checked before each call

Only nodes a rule or an optimisation inserted (stamped) are hoisted, so the base model's own weights are
never copied; a node is hoisted when every input is a parameter/buffer or another hoisted node and it is
deterministic. The values are computed under ``no_grad``: the graph is for inference.

``flatten_attribute_reads`` does the same for the reads themselves: the generated code of a get_attr of
``model.layers.0.self_attn.q_proj.weight`` walks five modules per call; the graph reads the same tensor
object through one root attribute instead (no copy; the nested attribute stays for everyone else).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from graphpeft.engine.match import is_stamped
from graphpeft.engine.rewriter import get_attr_path

HOISTED = "_graphpeft_hoisted"
FLAT = "_graphpeft_flat_"


def hoist_parameter_ops(gm: fx.GraphModule) -> int:
    """Move ``gm``'s stamped parameter-only computations into a weights graph; returns how many values."""
    constant: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            constant.add(node)
        elif (node.op == "call_function" and is_stamped(node) and node.all_input_nodes
              and all(n in constant for n in node.all_input_nodes) and _pure_tensor_op(node)):
            constant.add(node)
    boundary = [n for n in gm.graph.nodes if n in constant and n.op == "call_function"
                and any(user not in constant for user in n.users)]
    if not boundary:
        return 0
    weights_graph, env = fx.Graph(), {}
    wanted = _ancestors(boundary)
    for node in gm.graph.nodes:
        if node in wanted:
            env[node] = weights_graph.node_copy(node, lambda n: env[n])
    weights_graph.output(tuple(env[n] for n in boundary))
    for i, node in enumerate(boundary):
        name = f"{HOISTED}_{i}"
        gm.register_buffer(name, torch.empty(0), persistent=False)     # filled before the first call
        with gm.graph.inserting_before(node):
            read = gm.graph.get_attr(name)
        read.meta.update(node.meta)
        node.replace_all_uses_with(read)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    sources = [str(n.target).rpartition(".") for n in weights_graph.nodes if n.op == "get_attr"]
    state: dict[str, Any] = {"key": None, "owners": None}

    def refresh(module: fx.GraphModule, args: tuple, kwargs: dict) -> None:
        owners = state["owners"]
        if owners is None or owners[0] is not module:      # the modules holding them, found once (a decode step
            owners = state["owners"] = (module, [(module.get_submodule(path), leaf) for path, _, leaf in sources])
        tensors = [getattr(owner, leaf) for owner, leaf in owners[1]]    # read now: .to() may have replaced one
        key = tuple((id(t), t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)
        if key != state["key"]:
            with torch.no_grad():
                values = fx.Interpreter(module, graph=weights_graph).run()
            for i, value in enumerate(values):
                setattr(module, f"{HOISTED}_{i}", value)
            state["key"] = key

    gm.register_forward_pre_hook(refresh, with_kwargs=True)
    return len(boundary)


def _pure_tensor_op(node: fx.Node) -> bool:
    """An aten op without randomness or side effects that returns one tensor."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or node.is_impure():
        return False
    returns = target._schema.returns
    return (torch.Tag.nondeterministic_seeded not in target.tags and len(returns) == 1
            and str(returns[0].type) == "Tensor" and not target._schema.is_mutable)


def _ancestors(nodes: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(node.all_input_nodes)
    return seen


def flatten_attribute_reads(gm: fx.GraphModule) -> int:
    """Point every nested tensor get_attr of ``gm`` at a root attribute holding the same object."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "get_attr" or "." not in str(node.target):
            continue
        value = get_attr_path(gm, str(node.target))
        if not isinstance(value, torch.Tensor):
            continue
        flat = FLAT + str(node.target).replace(".", "__")
        if not hasattr(gm, flat):
            if isinstance(value, torch.nn.Parameter):
                gm.register_parameter(flat, value)
            else:
                gm.register_buffer(flat, value, persistent=False)
        node.target = flat
        count += 1
    if count:
        gm.recompile()
    return count
