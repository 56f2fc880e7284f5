"""Graph optimisations of a rewritten graph, generic over the nodes that rules inserted.

Rules stamp every node they insert (``node.meta["graphpeft"]``); these passes look only at that stamp
and at op kinds, never at a method. The adapter parameters stay what they are (separate, named,
saved, loaded and merged through the records); only the way the graph computes with them changes.

    drop_identity_dropout   dropout(x, p=0, *) -> x                                  exact, train and eval
    fold_scaling            mul(op(h, W), s) -> op(mul(h, s), W)   (training graphs)  W an inserted weight
                                            -> op(h, mul(W, s))   (inference graphs); s == 1 -> op(h, W)
    fuse_shared_input       linear(x, A1) .. linear(x, An) -> slices of linear(x, cat(A1 .. An))   (inference)
    share_attention_masks   sdpa(.., mask_bool) x L -> m = additive mask once, or None and is_causal
                            when the mask is plain causality (graphpeft.runtime.attention_masks)

``optimize_graph(gm)`` runs them, in that order: with identity dropout gone, branches that
read the same activation really read the same node, and folding leaves nothing between the fused
slices and the small weights. They preserve results (same outputs to float rounding, the same
gradients for every adapter parameter), so ``graphpeft.rewrite`` runs them by default
(``optimize=False`` turns them off). ``runtime.inference.merge_for_inference`` changes what the model
is (it no longer trains), so it is only ever called explicitly.

A training graph and an inference graph want different things. Training keeps, for the backward pass,
every tensor an op reads: a scaling folded onto a weight (s·B) or a fused cat(A_q, A_v) is one more
saved tensor per site, while the scaled rank-r activation h·s replaces the h the op saved anyway (and
the separate A matmuls cost no more time: a training step of the bench's Llama, LoRA all-linear, took
603.6 ms unfused, 603.7 ms fused). An inference graph
(generation's, ``inference=True``) saves nothing, and its hoist computes weight-only values once per
parameter update: there the weight-side fold and the fused matmul make each decode step shorter.

What they never touch: nodes no rule inserted (except dropout with p = 0, an identity in any mode, and
the boolean attention mask, which every attention layer would otherwise convert on its own),
an inserted dropout with p > 0 (each branch keeps its own random mask, as PEFT's modules do), a
scaling that is a tensor rather than a number, a weight op with a bias.
"""

from __future__ import annotations

from collections import defaultdict
from numbers import Number
from typing import Any, Optional

import torch
import torch.fx as fx

from graphpeft.engine.match import STAMP, is_stamped
from graphpeft.engine.rewriter import get_attr_path
from graphpeft.runtime.attention_masks import boolean_attention_masks, share_attention_masks

aten = torch.ops.aten

_DROPOUT_OPS = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
                aten.feature_alpha_dropout.default)
_FUNCTIONAL_DROPOUT = (torch.nn.functional.dropout,)
# weight op -> which operands may be the weight (the rest is the activation); bias must be absent
_WEIGHT_OPERANDS = {aten.linear.default: (1,), aten.conv1d.default: (1,), aten.conv2d.default: (1,),
                    aten.conv3d.default: (1,), aten.mm.default: (0, 1), aten.matmul.default: (0, 1)}
_VIEWS_OF_WEIGHT = (aten.t.default, aten.transpose.int, aten.permute.default)


def optimize_graph(gm: fx.GraphModule, *, inference: bool = False) -> dict[str, int]:
    """Run the result-preserving optimisations on ``gm`` in place; returns how often each one applied.

    ``inference``: the graph never trains (generation's): fold scalings onto weights and fuse shared inputs.
    """
    counts = {
        "drop_identity_dropout": drop_identity_dropout(gm, recompile=False),
        "fold_scaling": fold_scaling(gm, onto="weight" if inference else "activation", recompile=False),
    }
    if inference:
        counts["fuse_shared_input"] = fuse_shared_input(gm, recompile=False)
    counts["share_attention_masks"] = share_attention_masks(gm, recompile=False)
    if any(counts.values()):
        gm.graph.lint()
        gm.recompile()
    return counts


# -- drop identity dropout ------------------------------------------------------------------------

def drop_identity_dropout(gm: fx.GraphModule, *, inference: bool = False, recompile: bool = True) -> int:
    """Remove dropout nodes that are the identity; returns how many.

    dropout(x, p, train) = x  when p == 0 (in train and eval alike), and, for a graph that will only
    ever run in eval mode (``inference=True``), also when train is False. A train/eval switch of the
    graph flips the train flag of the dropout nodes it finds, so an eval-mode dropout with p > 0 is
    kept in a graph that may train again.

        before:  x ─ dropout(p=0) ─ linear(A) ─ ...      after:  x ─ linear(A) ─ ...
    """
    dropped = 0
    for node in list(gm.graph.nodes):
        p, train = _dropout_p_and_train(node)
        if p is None or not (p == 0 or (inference and train is False)):
            continue
        node.replace_all_uses_with(node.args[0] if node.args else node.kwargs["input"])
        gm.graph.erase_node(node)
        dropped += 1
    if dropped and recompile:
        gm.recompile()
    return dropped


def _dropout_p_and_train(node: fx.Node) -> tuple[Optional[float], Optional[bool]]:
    """(p, train) of a dropout node with constant arguments, else (None, None)."""
    if node.op != "call_function":
        return None, None
    if node.target in _DROPOUT_OPS and len(node.args) >= 3:
        p, train = node.args[1], node.args[2]
    elif node.target in _FUNCTIONAL_DROPOUT and not node.kwargs.get("inplace", False):
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
    else:
        return None, None
    if not isinstance(p, Number) or not isinstance(train, bool):
        return None, None
    return float(p), train


# -- fold the scaling into the small weight ---------------------------------------------------------

def fold_scaling(gm: fx.GraphModule, *, onto: str = "activation", recompile: bool = True) -> int:
    """Move a constant scaling after an inserted weight op onto one of its operands; returns how many.

    op(h, W) * s = op(h * s, W) = op(h, s * W) for a bias-free linear, convolution, mm or matmul, W an
    adapter's small factor (e.g. B [out, r]). Either way the multiply touches a rank-r tensor instead of
    the out-sized product, in the forward and in the backward pass. ``onto="activation"`` (training)
    scales h: the op saves h * s for W's gradient in place of h, so nothing is added to what training
    keeps. ``onto="weight"`` (inference) scales W, which the hoist then computes once per parameter
    update. An op whose other operand is an inserted weight too (a weight product), or an activation
    that something else reads as well, scales the smaller weight. With s == 1 the multiply just goes.

        before:  h ─ linear(B) ─ mul(s) ─ add      activation:  h ─ mul(s) ─ linear(B) ─ add
                                                   weight:      h ─ linear(·) ─ add
                                                                B ─ mul(s) ┘
    """
    if onto not in ("activation", "weight"):
        raise ValueError(f"onto must be 'activation' or 'weight', got {onto!r}")
    folded = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is aten.mul.Tensor and is_stamped(node)
                and len(node.args) == 2 and not node.kwargs) or node.meta[STAMP].get("optimized") == "fold_scaling":
            continue                 # (a scaling this pass placed stays there: h * s must not move on to x)
        op, scale = node.args
        if _is_number(op) and isinstance(scale, fx.Node):   # mul(s, h) as well as mul(h, s)
            op, scale = scale, op
        if not (isinstance(op, fx.Node) and _is_number(scale)):
            continue
        weight = _inserted_weight_operand(gm, op)
        if weight is None or len(op.users) != 1:
            continue
        if scale != 1:
            target = _activation_operand(gm, op, weight) if onto == "activation" else None
            with gm.graph.inserting_before(op):
                scaled = gm.graph.call_function(aten.mul.Tensor, (target or weight, scale))
            _stamp_like(scaled, node, "fold_scaling")
            op.replace_input_with(target or weight, scaled)
        node.replace_all_uses_with(op)
        gm.graph.erase_node(node)
        folded += 1
    if folded and recompile:
        gm.recompile()
    return folded


def _activation_operand(gm: fx.GraphModule, op: fx.Node, weight: fx.Node) -> Optional[fx.Node]:
    """The operand of ``op`` that is neither ``weight`` nor another inserted weight and that only ``op`` reads,
    if there is one. Read elsewhere too (a layer input that the base op also saves), h * s would be kept
    beside h: the weight is scaled instead."""
    operands = op.args[:2] if op.target in (aten.mm.default, aten.matmul.default) else op.args[:1]
    for arg in operands:
        if (isinstance(arg, fx.Node) and arg is not weight and _inserted_tensor(gm, arg) is None
                and set(arg.users) == {op}):
            return arg
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, Number) and not isinstance(value, bool)


def _inserted_weight_operand(gm: fx.GraphModule, op: fx.Node) -> Optional[fx.Node]:
    """The smallest operand of an inserted, bias-free weight op that reads an inserted parameter, if any."""
    if not (op.op == "call_function" and op.target in _WEIGHT_OPERANDS and is_stamped(op)) or op.kwargs:
        return None
    if op.target not in (aten.mm.default, aten.matmul.default) and len(op.args) > 2 and op.args[2] is not None:
        return None   # a bias would be scaled too
    candidates = []
    for i in _WEIGHT_OPERANDS[op.target]:
        arg = op.args[i] if i < len(op.args) else None
        tensor = _inserted_tensor(gm, arg)
        if tensor is not None and op.args.count(arg) == 1:
            candidates.append((tensor.numel(), i, arg))
    return min(candidates)[2] if candidates else None


def _inserted_tensor(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    """The tensor behind an inserted get_attr node, or behind an inserted transpose of one."""
    if not isinstance(node, fx.Node) or not is_stamped(node):
        return None
    if node.op == "call_function" and node.target in _VIEWS_OF_WEIGHT:
        return _inserted_tensor(gm, node.args[0])
    if node.op != "get_attr":
        return None
    value = get_attr_path(gm, str(node.target))
    return value if isinstance(value, torch.Tensor) else None


# -- fuse the projections that share an input ----------------------------------------------------

def fuse_shared_input(gm: fx.GraphModule, *, recompile: bool = True) -> int:
    """Compute inserted bias-free linear ops that read the same input as one matmul; returns the groups fused.

    [linear(x, A1), .., linear(x, An)] = split(linear(x, cat(A1, .., An)), r1, .., rn) along the last
    dim. The q/k/v (or gate/up) adapters of one layer read one normalised activation: one pass over x
    instead of n, in the forward and in the backward pass. The A weights stay separate parameters
    (the concatenation is in the graph, so each gets its own gradient); slices, not a split node, so
    exporters keep the gradient path.

        before:  x ─┬─ linear(A_q) ─ ...           after:  x ─ linear(cat(A_q, A_v)) ─┬─ slice[0:r] ─ ...
                    └─ linear(A_v) ─ ...                                              └─ slice[r:2r] ─ ...
    """
    groups: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        key = _fusable_key(gm, node)
        if key is not None:
            groups[key].append(node)
    fused = 0
    for members in groups.values():
        if len({m.args[1].target for m in members}) >= 2:
            _fuse(gm, members)
            fused += 1
    if fused and recompile:
        gm.recompile()
    return fused


def _fusable_key(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple]:
    """(input, adapter, dtype, device, in_features) for an inserted linear(x, A) with an inserted 2-D A."""
    if not (node.op == "call_function" and node.target is aten.linear.default and is_stamped(node)):
        return None
    if node.kwargs or len(node.args) < 2 or (len(node.args) > 2 and node.args[2] is not None):
        return None
    x, weight = node.args[0], node.args[1]
    if not isinstance(x, fx.Node) or not (isinstance(weight, fx.Node) and weight.op == "get_attr" and is_stamped(weight)):
        return None
    value = get_attr_path(gm, str(weight.target))
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        return None
    return x, node.meta[STAMP].get("adapter"), value.dtype, value.device, value.shape[1]


def _fuse(gm: fx.GraphModule, members: list[fx.Node]) -> None:
    graph, first = gm.graph, members[0]
    targets = list(dict.fromkeys(str(m.args[1].target) for m in members))   # a shared weight is read once
    rows = {t: get_attr_path(gm, t).shape[0] for t in targets}
    with graph.inserting_before(first):
        weights = [graph.get_attr(t) for t in targets]
        stacked = graph.call_function(aten.cat.default, (weights, 0))
        out = graph.call_function(aten.linear.default, (first.args[0], stacked))
        slices, start = {}, 0
        for t in targets:
            slices[t] = graph.call_function(aten.slice.Tensor, (out, -1, start, start + rows[t]))
            start += rows[t]
    for node in (*weights, stacked, out, *slices.values()):
        _stamp_like(node, first, "fuse_shared_input")
    for member in members:
        old_weight = member.args[1]
        member.replace_all_uses_with(slices[str(old_weight.target)])
        graph.erase_node(member)
        if not old_weight.users:
            graph.erase_node(old_weight)


def _stamp_like(node: fx.Node, like: fx.Node, how: str) -> None:
    """Stamp a node made by an optimisation as the rule's own, noting the optimisation."""
    node.meta[STAMP] = {**like.meta.get(STAMP, {}), "optimized": how}
    if "nn_module_stack" in like.meta:
        node.meta["nn_module_stack"] = dict(like.meta["nn_module_stack"])


__all__ = ["boolean_attention_masks", "drop_identity_dropout", "fold_scaling", "fuse_shared_input", "optimize_graph",
           "share_attention_masks"]
