"""Key/value positions prepended to attention: the rewrite step at one attention site.

Given, per site, a key block P_k and a value block P_v of n positions ([h, n, d]: h key/value heads of size
d; past key values of length n), the site attends over them in front of its own keys and values:

    attention(q, k, v)   ->   attention(q, cat(P_k, k[:, :, n:]), cat(P_v, v[:, :, n:]))   on the sequence axis

where the sequence was extended by n filler positions (filler_positions: their keys and values are replaced,
so nothing of the fillers reaches a real token), or with no fillers (a model with no token input, e.g. a
vision transformer), attention(q, cat(P_k, k), cat(P_v, v)) with the mask given n attended columns in front.
P is repeated over heads as repeat_kv repeats the keys (grouped-query attention), expanded over the site's
attention batch (B, or B*windows on windowed attention: every window attends to the same block) and cast to
the keys' dtype:

    before:  k ──────────────────────────────┬─ sdpa ─ ...            eager:  k^T ─ matmul(q, ·) ─ softmax ─ ...
             v ──────────────────────────────┘
    after:   k ─ [:, :, n:] ─ cat(P_k, ·) ───┬─ sdpa ─ ...                    cat(P_k^T, k^T[..., n:]) ─ matmul ...
             v ─ [:, :, n:] ─ cat(P_v, ·) ───┘
             P_k [h, n, d] ─ repeat_interleave(H/h) ─ expand(B) ─ type_as(k)

On 3-D sites ([B*H, S, d], batch and heads folded batch-major, attention_shapes) the keys are replaced where
they are still [B*H, S, d], so every reader of them sees the block, through the 4-D form:

    k3 ─ reshape [B, H, S, d] ─ cat(P_k, ·[:, :, n:]) ─ reshape [B*H, S, d] ─┬─ transpose ─ baddbmm
                                                                              └─ (other key readers)
    v3 ─ reshape [B, H, S, d] ─ cat(P_v, ·[:, :, n:]) ─ reshape [B*H, S, d] ──────────────── bmm

An additive bias (ALiBi, relative positions) and masks computed by the model from the extended sequence
already cover the block at positions 0..n-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx as fx

from graphpeft.engine.attention_shapes import spoken
from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.filler_positions import INT_MAX
from graphpeft.engine.match import AttentionSite
from graphpeft.engine.rewriter import Rewriter

aten = torch.ops.aten


@dataclass(frozen=True)
class PrefixSite:
    """One attention site that reads the extended sequence: its prefix rows and head repetition."""

    attention: AttentionSite
    module_path: str
    layer: int
    key_row: int
    value_row: int
    repeat: int                                     # heads at the site / key-value heads of the prefix
    fillers: bool = True                            # keys and values carry V filler positions to replace
    folded_key: Optional[fx.Node] = None            # 3-D sites: the [B*H, S, d] keys every key reader reads
    heads: int = 0                                  # 3-D sites: the H folded into their first axis

    @property
    def node(self) -> fx.Node:
        return self.attention.node


def prepend_kv(rw: Rewriter, site: PrefixSite, row_of: Callable[[Rewriter, int], fx.Node], n: int, *,
               who: str) -> None:
    """The site's keys and values with rows ``site.key_row`` / ``site.value_row`` in front (``row_of(rw, row)``
    makes a row's [h, n, d] block at the rewriter's insertion point)."""
    att = site.attention
    if site.folded_key is not None:
        _prepend_folded(rw, site, row_of, n)
        return
    key_user = att.scores if att.kind == "eager" else att.node
    rw.start_before(key_user)
    drop = n if site.fillers else 0
    new_key = with_prefix(rw, row_of(rw, site.key_row), att.key, site.repeat, drop, transposed=att.kind == "eager")
    rw.replace_input(key_user, att.key, new_key)
    if not site.fillers:
        extend_masks(rw, att, n, site.module_path, who=who)
    rw.start_before(att.node)
    new_value = with_prefix(rw, row_of(rw, site.value_row), att.value, site.repeat, drop, transposed=False)
    rw.replace_input(att.node, att.value, new_value)


def _prepend_folded(rw: Rewriter, site: PrefixSite, row_of: Callable[[Rewriter, int], fx.Node], n: int) -> None:
    """A site on 3-D [B*H, S, d] keys and values (BLOOM's baddbmm with ALiBi, DeBERTa-v2's bmm): the keys
    every reader of the folded keys reads (the scores, and DeBERTa's position-to-content term) and the
    values get the prefix in place of their V filler positions, through the 4-D cat."""
    att, key = site.attention, site.folded_key
    rw.start_before(key.next)
    new_key = with_folded_prefix(rw, lambda: row_of(rw, site.key_row), key, site.heads, site.repeat, n)
    rw.replace_uses(key, new_key)
    rw.start_before(att.node)
    new_value = with_folded_prefix(rw, lambda: row_of(rw, site.value_row), att.value, site.heads, site.repeat, n)
    rw.replace_input(att.node, att.value, new_value)


def with_folded_prefix(rw: Rewriter, p_of: Callable[[], fx.Node], x: fx.Node, heads: int, repeat: int,
                       n: int) -> fx.Node:
    """x [B*H, S, d] (batch-major fold) -> [B, H, S, d] -> prefix ``p_of()`` in place of the first n ->
    [B*H, S, d]."""
    head_dim = x.meta["val"].shape[2]
    unfolded = rw.call(aten.reshape.default, x, [-1, heads, rw.call(aten.sym_size.int, x, 1), head_dim])
    joined = with_prefix(rw, p_of(), unfolded, repeat, n, transposed=False)
    return rw.call(aten.reshape.default, joined, [-1, rw.call(aten.sym_size.int, joined, 2), head_dim])


def with_prefix(rw: Rewriter, p: fx.Node, x: fx.Node, repeat: int, n: int, transposed: bool) -> fx.Node:
    """cat(p, x without its first n positions) on x's sequence axis (n = 0: all of x), p [h, V, d].

    x is [B, H, S, d], or [B, H, d, S] for the key operand of eager attention (``transposed``).
    """
    if repeat > 1:
        p = rw.call(aten.repeat_interleave.self_int, p, repeat, 0)         # repeat_kv's head order
    p = rw.call(aten.unsqueeze.default, p, 0)
    p = rw.call(aten.expand.default, p, [rw.call(aten.sym_size.int, x, 0), -1, -1, -1])
    p = rw.call(aten.type_as.default, p, x)
    axis = 3 if transposed else 2
    if transposed:
        p = rw.call(aten.transpose.int, p, 2, 3)
    rest = rw.call(aten.slice.Tensor, x, axis, n, INT_MAX) if n else x
    return rw.call(aten.cat.default, [p, rest], axis)


def extend_masks(rw: Rewriter, att: AttentionSite, n: int, where: str, *, who: str) -> None:
    """The site's mask gets n attended key columns in front: an additive mask 0, a boolean keep-mask True,
    a masked_fill mask False. A mask broadcast over the keys (last size 1) stays as it is.

    SDPA: its attn_mask. Eager: every tensor combined with the scores between matmul(q, k^T) and softmax."""
    if att.kind == "sdpa":
        mask = att.node.args[3] if len(att.node.args) > 3 else att.node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node):
            rw.start_before(att.node)
            rw.replace_input(att.node, mask, _pad_keys(rw, mask, n, True))
        return
    key_len = att.scores.meta["val"].shape[-1] if isinstance(att.scores.meta.get("val"), torch.Tensor) else None
    chain, node = [], att.node.args[0]
    while isinstance(node, fx.Node) and node is not att.scores:
        chain.append(node)
        node = node.args[0] if node.args else None
    for op in chain:
        for arg in op.all_input_nodes:
            if arg in chain or arg is att.scores:
                continue
            val = arg.meta.get("val")
            if not isinstance(val, torch.Tensor) or val.dim() == 0 or val.shape[-1] == 1:
                continue
            if op.target in (aten.add.Tensor, aten.sub.Tensor):
                keep = False                        # additive: 0 keeps the prefix column
            elif op.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
                keep = False                        # True masks out: False keeps
            elif op.target is aten.where.self and arg is op.args[0]:
                keep = True                         # True keeps the scores
            else:
                raise GraphPeftError(f"{who}: in the attention site {where}, {op.target} combines the "
                                     f"scores with a tensor of shape {tuple(val.shape)} that {spoken(who)} cannot "
                                     f"extend by {n} key positions")
            if str(val.shape[-1]) != str(key_len):
                continue
            rw.start_before(op)
            rw.replace_input(op, arg, _pad_keys(rw, arg, n, keep))


def _pad_keys(rw: Rewriter, mask: fx.Node, n: int, keep: bool) -> fx.Node:
    """mask with n columns in front on its last axis that let the prefix through: 0 in a float mask, ``keep``
    in a boolean one."""
    val = mask.meta.get("val")
    fill = keep if isinstance(val, torch.Tensor) and val.dtype == torch.bool else 0.0
    return rw.call(aten.constant_pad_nd.default, mask, [n, 0], fill)
