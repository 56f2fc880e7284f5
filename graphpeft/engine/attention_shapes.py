"""The layout of keys and values at an attention site, read off the graph: heads, head size, repetition, folds.

A pass that puts n key/value positions in front of an attention site's keys and values on the sequence axis
needs, per site (``match.attention_sites``):

    4-D sites     q, k, v [B, H, S, d] (SDPA; eager matmul-softmax-matmul with k^T [B, H, d, S]):
                  (H, d, h): heads at the site, head size, and the key/value heads h before a repeat_kv
                  (grouped-query attention: expand + reshape of [B, h, S, d] to [B, H, S, d], H = h * r)
    3-D sites     k, v [B*H, S, d] with batch and heads folded into one axis (BLOOM's baddbmm(alibi, q, k^T),
                  DeBERTa-v2's bmm plus its relative-position terms): H = (first axis) / B, read off the graph,
                  the fold batch-major (a view / reshape of [B, H, S, d]), and the keys where they still are
                  [B*H, S, d], before any transpose, cast or scalar scaling, so every reader of them (DeBERTa's
                  position-to-content term as well as the scores) sees the new positions:

        k3 [B*H, S, d] ─ transpose ─ (* 1/scale) ─ baddbmm(alibi, q, ·) ─ ... ─ softmax ─ bmm(·, v3)
        ^ folded_key(att): the node whose readers all see keys on the sequence axis

A site that does not fit is a one-line error naming its module and ops; ``who`` (the caller's name)
opens it.
"""

from __future__ import annotations

from typing import Any, Optional

import sympy
import torch
import torch.fx as fx

from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.filler_positions import same
from graphpeft.engine.match import AttentionSite, module_stack_entry

aten = torch.ops.aten
# ops between a projection and an attention site that repeat_kv (expand + reshape) is made of
_HEAD_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
               aten.unsqueeze.default, aten.slice.Tensor, aten.transpose.int, aten.clone.default,
               aten.contiguous.default, aten.alias.default}
# ops between folded [B*H, S, d] keys and a 3-D score op that change no key's position
_COPIES = {aten.clone.default, aten.contiguous.default, aten.alias.default}
_FOLDS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_KEY_LAYOUT = {aten.transpose.int, aten.clone.default, aten.contiguous.default, aten.alias.default, aten.to.dtype,
               aten._to_copy.default, aten.to.dtype_layout}


def spoken(who: str) -> str:
    """The caller's name as words in a sentence (``a_b`` -> ``a b``)."""
    return who.replace("_", " ")


def site_shape(att: AttentionSite, seq: Any, batch: Any = None, *, who: str) -> tuple[int, int, int]:
    """(heads at the site, head size, key/value heads before any repetition) of a 4-D attention site, or of a
    3-D one on a token sequence (heads folded into the batch axis: [B*H, S, d])."""
    key, value = att.key.meta.get("val"), att.value.meta.get("val")
    where = module_stack_entry(att.node)[0] or att.node.name
    if seq is not None and three_d(att):
        heads, head_dim = _folded_heads(att, seq, batch, where, who)
        return heads, head_dim, heads
    if not isinstance(key, torch.Tensor) or not isinstance(value, torch.Tensor) or key.dim() != 4 or value.dim() != 4:
        shape = tuple(key.shape) if isinstance(key, torch.Tensor) else "?"
        raise GraphPeftError(f"{who}: the attention site {where} ({_ops(att)}, keys of shape {shape}) does not "
                             f"take 4-D [batch, heads, sequence, head size] keys and values; {spoken(who)} cannot "
                             f"put a prefix there")
    if att.key is att.value:
        raise GraphPeftError(f"{who}: the attention site {where} uses one tensor as keys and values; "
                             f"it cannot take separate key and value prefixes")
    heads, head_dim = value.shape[1], value.shape[3]
    key_seq = key.shape[3] if att.kind == "eager" else key.shape[2]
    static = isinstance(heads, int) and isinstance(head_dim, int)
    if seq is None:         # no token sequence: keys and values need only run along the same axis
        along = str(key_seq) == str(value.shape[2])
    else:
        along = same(key_seq, seq) and same(value.shape[2], seq)
    if not static or not along:
        raise GraphPeftError(f"{who}: the attention site {where} has keys of shape {tuple(key.shape)}, "
                             f"which do not run along the sequence of the input; {spoken(who)} cannot put a "
                             f"prefix there")
    return heads, head_dim, _kv_heads(att.value, heads, head_dim)


def three_d(att: AttentionSite) -> bool:
    vals = [x.meta.get("val") for x in (att.key, att.value)]
    return all(isinstance(v, torch.Tensor) and v.dim() == 3 for v in vals)


def _ops(att: AttentionSite) -> str:
    return f"{att.node.target}" + (f" after {att.scores.target}" if att.scores is not None else "")


def _folded_heads(att: AttentionSite, seq: Any, batch: Any, where: str, who: str) -> tuple[int, int]:
    """(H, d) of a site on 3-D values [B*H, S, d]: H is the first axis over the input's batch size B. The keys
    and values must be folded batch-major, from [B, H, S, d] (a reshape of it), as the prefix is laid in."""
    value = att.value.meta["val"]
    head_dim = value.shape[2]
    heads = _quotient(value.shape[0], batch)
    if att.key is att.value or not same(value.shape[1], seq) or not isinstance(head_dim, int) or heads is None:
        raise GraphPeftError(f"{who}: the attention site {where} ({_ops(att)}) takes 3-D values of shape "
                             f"{tuple(value.shape)}, not [batch*heads, sequence, head size] over the input's "
                             f"batch {batch} and sequence {seq}; {spoken(who)} cannot put a prefix there")
    for role, x in (("keys", folded_key(att, seq, head_dim, who=who)), ("values", att.value)):
        if not _folded_from(x, batch, heads):
            raise GraphPeftError(f"{who}: the attention site {where} ({_ops(att)}) takes 3-D {role} "
                                 f"({x.target}) that are not a reshape of [batch, heads, sequence, head size]; "
                                 f"{spoken(who)} cannot tell which heads they fold")
    return heads, head_dim


def _folded_from(x: fx.Node, batch: Any, heads: int) -> bool:
    """x is a view / reshape of a [B, H, S, d] tensor (through copies): batch-major B*H."""
    for _ in range(4):
        if x.op != "call_function" or x.target not in _COPIES or not isinstance(x.args[0], fx.Node):
            break
        x = x.args[0]
    if x.op != "call_function" or x.target not in _FOLDS or not isinstance(x.args[0], fx.Node):
        return False
    val = x.args[0].meta.get("val")
    return (isinstance(val, torch.Tensor) and val.dim() == 4 and str(val.shape[0]) == str(batch)
            and val.shape[1] == heads)


def _quotient(folded: Any, batch: Any) -> Optional[int]:
    """folded / batch when it is a positive whole number, for plain and symbolic sizes (4*s0 / s0 = 4)."""
    if isinstance(folded, int) and isinstance(batch, int):
        return folded // batch if batch > 0 and folded % batch == 0 else None
    if isinstance(folded, int) or isinstance(batch, int):
        return None
    ratio = sympy.simplify(folded.node.expr / batch.node.expr)
    return int(ratio) if ratio.is_Integer and int(ratio) > 0 else None


def folded_key(att: AttentionSite, seq: Any, head_dim: int, *, who: str) -> fx.Node:
    """The [B*H, S, d] keys behind the score operand of a 3-D site, through transposes, casts and scalings
    (DeBERTa's k^T / scale): the node whose readers all see keys on the sequence axis."""
    node = att.key
    for _ in range(8):
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if (isinstance(val, torch.Tensor) and val.dim() == 3 and same(val.shape[1], seq) and val.shape[2] == head_dim
                and str(val.shape[0]) == str(att.value.meta["val"].shape[0])):
            return node
        if not isinstance(node, fx.Node) or node.op != "call_function" or not _key_preserving(node):
            break
        node = node.args[0]
    where = module_stack_entry(att.node)[0] or att.node.name
    seen = f"{node.target}" if isinstance(node, fx.Node) else repr(node)
    shape = tuple(att.key.meta["val"].shape) if isinstance(att.key.meta.get("val"), torch.Tensor) else "?"
    raise GraphPeftError(f"{who}: the attention site {where} ({_ops(att)}) takes 3-D keys of shape {shape} "
                         f"that do not come from [batch*heads, sequence, head size] keys through transposes, casts "
                         f"or scalings (it reached {seen}); {spoken(who)} cannot put a prefix there")


def _key_preserving(node: fx.Node) -> bool:
    """An op that moves, casts or scales keys by a scalar: the prefix may enter before it."""
    if node.target in _KEY_LAYOUT:
        return True
    if node.target in (aten.div.Tensor, aten.mul.Tensor) and len(node.args) == 2:
        other = node.args[1]
        val = other.meta.get("val") if isinstance(other, fx.Node) else other
        return isinstance(val, (int, float)) or (isinstance(val, torch.Tensor) and val.dim() == 0)
    return False


def four_d(att: AttentionSite) -> bool:
    vals = [x.meta.get("val") for x in (att.query, att.key, att.value)]
    return all(isinstance(v, torch.Tensor) and v.dim() == 4 for v in vals)


def refuse_causal(att: AttentionSite, *, who: str) -> None:
    """SDPA's is_causal aligns the causal mask to the top left when keys are longer than queries."""
    causal = att.node.kwargs.get("is_causal", att.node.args[5] if len(att.node.args) > 5 else False)
    if att.kind == "sdpa" and causal:
        where = module_stack_entry(att.node)[0] or att.node.name
        raise GraphPeftError(f"{who}: the attention site {where} ({att.node.target}) is causal "
                             f"(is_causal=True) and the graph has no token input to offset positions by; "
                             f"{spoken(who)} without token inputs needs non-causal attention")


def _kv_heads(x: fx.Node, heads: int, head_dim: int) -> int:
    """Key/value heads before a repeat_kv (expand + reshape) on the way to the site; ``heads`` if none."""
    node, best = x, heads
    for _ in range(12):
        if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _HEAD_VIEWS:
            break
        node = node.args[0]
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if isinstance(val, torch.Tensor) and val.dim() == 4 and val.shape[3] == head_dim:
            h = val.shape[1]
            if isinstance(h, int) and 0 < h < best and heads % h == 0:
                best = h
    return best
