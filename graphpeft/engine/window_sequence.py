"""Virtual tokens in a windowed vision transformer (Swin): prompts kept outside the window partition.

Swin attends within windows: each block cuts the [B, L, C] patch sequence into windows, attention runs on
[B*nW, S, C], and the windows are put back; its views and reshapes take the patch grid, so tokens cannot be
inserted into the sequence. Visual Prompt Tuning for Swin (Jia et al. 2022, the reference implementation's
PromptedSwinTransformer, "prepend", shallow) keeps the V prompts beside the patches instead, as a second
stream p [B, V, C] that goes through every block and patch merging:

    block:   pn = LN_before(p)
             every window w attends over cat(pn, window w) as keys and values: the window's queries with the
             relative-position bias and shifted-window mask padded by zeros for the prompts (no position,
             never masked); the prompts' queries over the same keys with no bias or mask
             a = mean over the image's windows of o_proj(the prompts' attention output)
             p = p + a;  p = p + MLP(LN_after(p))           (the block's own per-token ops, copied)
    merging: p = reduction(norm(cat(p, p, p, p)))            (the reference tiles each prompt 4x on channels)
    head:    reads the patches only (the prompts leave after the last block)

    before:  h ─ LN ─ windows ─ q,k,v ─ attn(q, k, v, bias+mask) ─ o ─ unwindow ─ + ─ LN ─ MLP ─ + ─ ...
    after:   h ─ LN ─ windows ─ q,k,v ─ attn(q, cat(kp, k), cat(vp, v), pad(bias+mask)) ─ ...  (unchanged after)
             p ─ LN ─ qp,kp,vp (broadcast to the image's windows) ─ attn(qp, cat(kp, k), cat(vp, v)) ─ o ─ mean
               ─ + ─ LN ─ MLP ─ + ─ (next block) ...

Two choices differ from the reference code. Its windows get their prompts in window-major order while Swin's
windows are batch-major, so with more than one image a window can attend to another image's prompts and the
prompts average windows of several images; here image b's prompts go to image b's windows and average them
(the same at batch size 1). Its classifier averages the final tokens prompts included (weight V/(V+L)); here
the head pools the real patches only, as the audio path does (the base model's pooling is unchanged).

Everything is found from the graph: the attention sites on [B*nW, ...] (windowed), each block as the module
around an attention site, its q/k/v/o projections as the linears next to the site, its per-token ops before
the window partition and after the windows are put back (copied onto the prompt stream; a view or reshape
among them is refused), and patch merging as a cat of k slices on the channel axis followed by per-token ops.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.match import AttentionSite, attention_sites, module_stack_entry

aten = torch.ops.aten
_LINEAR = {aten.linear.default}
_SHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
           aten.permute.default, aten.transpose.int, aten.flatten.using_ints}
# ops that put windows back into the patch grid (cyclic shift and padding included)
_MOVES = _SHAPES | {aten.contiguous.default, aten.clone.default, aten.roll.default, aten.slice.Tensor,
                    aten.dropout.default}


def windowed_sites(gm: fx.GraphModule, batch: Any) -> list[AttentionSite]:
    """The attention sites of a windowed model (at least one attends over more than ``batch`` rows: B*nW), or
    [] when no site is windowed."""
    sites = [a for a in attention_sites(gm) if _four_d(a.value)]
    if any(str(a.value.meta["val"].shape[0]) != str(batch) for a in sites):
        return sites
    return []


def insert_beside_windows(rw: Any, output: fx.Node, prompts: fx.Node, n: int, batched: bool) -> fx.Node:
    """The prompt stream, starting at ``prompts`` ([n, C], or [B, n, C] when ``batched``) beside the embeddings'
    ``output`` [B, L, C], through every windowed block; returns the stream's first node."""
    gm = rw.gm
    batch = output.meta["val"].shape[0]
    rw.start_before(output.next)
    p = rw.call(aten.type_as.default, prompts, output)
    if not batched:
        size = rw.call(aten.sym_size.int, output, 0)
        p = rw.call(aten.expand.default, rw.call(aten.unsqueeze.default, p, 0), [size, -1, -1])
    stream = _Stream(rw, {output: p}, batch, n)
    for att in windowed_sites(gm, batch):
        stream.block(att)
    return p


class _Stream:
    """The prompt stream: ``env`` maps a node of the patch stream [B, *, C] to the prompts' node at that point."""

    def __init__(self, rw: Any, env: dict[fx.Node, fx.Node], batch: Any, n: int):
        self.rw, self.env, self.batch, self.n = rw, env, batch, n

    # -- one block ------------------------------------------------------------------------------------
    def block(self, att: AttentionSite) -> None:
        rw, n = self.rw, self.n
        where = module_stack_entry(att.node)[0] or att.node.name
        block = where.rpartition(".")[0]
        proj = {role: _projection(getattr(att, role), where, role) for role in ("query", "key", "value")}
        windows = proj["query"].args[0]
        tokens = self._tokens(windows, where)
        x_in, chain = self._chain_back(tokens, block, where)
        rw.start_before(att.scores if att.kind == "eager" else att.node)     # the first reader of the keys
        p_in = self.prompt_of(x_in, where)
        pn = self._copy(chain, {x_in: p_in}, where)[tokens]
        value = att.value.meta["val"]
        heads, head_dim = int(value.shape[1]), int(value.shape[3])
        size = rw.call(aten.sym_size.int, p_in, 0)
        nw = rw.call(operator.floordiv, rw.call(aten.sym_size.int, att.value, 0), size)
        qp, kp, vp = (self._to_windows(self._linear(proj[r], pn), size, nw, heads, head_dim)
                      for r in ("query", "key", "value"))
        key = rw.call(aten.transpose.int, att.key, 2, 3) if att.kind == "eager" else att.key
        keys = rw.call(aten.cat.default, [kp, key], 2)
        values = rw.call(aten.cat.default, [vp, att.value], 2)
        # the prompts' queries: no bias, no mask
        scale = _scale(att)
        out = rw.call(aten.scaled_dot_product_attention.default, qp, keys, values, None, 0.0, False, scale=scale)
        # the windows' queries: the prompts' keys and values in front, bias and mask padded
        if att.kind == "eager":
            rw.replace_input(att.scores, att.key, rw.call(aten.transpose.int, keys, 2, 3))
        else:
            rw.replace_input(att.node, att.key, keys)
        rw.replace_input(att.node, att.value, values)
        _pad_masks(rw, att, n, where)
        # back to [B, n, C]: the block's output projection, averaged over the image's windows
        rw.start_before(att.node)
        out = rw.call(aten.transpose.int, out, 1, 2)
        out = rw.call(aten.reshape.default, out, [-1, n, heads * head_dim])
        o_proj, merged = _output_projection(att.node, self.batch, where)
        out = self._linear(o_proj, out)
        out = rw.call(aten.reshape.default, out, [size, -1, n, out_dim(o_proj)])
        attended = rw.call(aten.mean.dim, out, [1])
        tail = _downstream_in(merged, block)
        self._copy(tail, {merged: attended, x_in: p_in}, where)

    def prompt_of(self, node: fx.Node, where: str) -> fx.Node:
        """The prompts at patch-stream node ``node``: mapped already, or through a patch merging before it."""
        if node in self.env:
            return self.env[node]
        chain, x = [], node
        while x not in self.env:
            if not isinstance(x, fx.Node) or x.op != "call_function" or not x.args:
                raise GraphPeftError(f"virtual tokens: the input of {where} does not come from the patch sequence "
                                     f"through blocks and patch merging; prompts cannot follow it")
            chain.append(x)
            x = x.args[0][0] if x.target is aten.cat.default else x.args[0]
        chain.reverse()
        cats = [i for i, c in enumerate(chain) if c.target is aten.cat.default and _last_axis(c)]
        if not cats:
            raise GraphPeftError(f"virtual tokens: between two windowed blocks before {where}, the patches are "
                                 f"merged without a cat on the channel axis; prompts cannot follow them")
        cat = chain[cats[-1]]
        k = len(cat.args[0])
        start = next((i for i in range(cats[-1] + 1, len(chain)) if _tokens_shape(chain[i], self.batch)), None)
        if start is None:
            raise GraphPeftError(f"virtual tokens: the patch merging before {where} does not give [batch, tokens, "
                                 f"channels]; prompts cannot follow it")
        tiled = self.rw.call(aten.cat.default, [self.env[x]] * k, -1)
        copied = self._copy(chain[start + 1:], {chain[start]: tiled}, where)
        return copied[node] if chain[start] is not node else tiled

    # -- helpers ---------------------------------------------------------------------------------------
    def _tokens(self, windows: fx.Node, where: str) -> fx.Node:
        """The [B, L, C] node the windows are cut from."""
        x = windows
        for _ in range(16):
            if not isinstance(x, fx.Node) or x.op != "call_function" or not x.args:
                break
            if _tokens_shape(x, self.batch) and x.target not in _SHAPES:
                return x
            x = x.args[0]
        raise GraphPeftError(f"virtual tokens: the windows of {where} are not cut from one [batch, tokens, "
                             f"channels] tensor; prompts cannot be put beside them")

    def _chain_back(self, tokens: fx.Node, block: str, where: str) -> tuple[fx.Node, list[fx.Node]]:
        """(the block's input, the per-token ops of the block from it to ``tokens``)."""
        chain, x = [], tokens
        while isinstance(x, fx.Node) and x.op == "call_function" and _inside(module_stack_entry(x)[0], block):
            chain.append(x)
            x = x.args[0]
        if not isinstance(x, fx.Node) or not chain:
            raise GraphPeftError(f"virtual tokens: no per-token op of the block around {where} before its windows; "
                                 f"prompts cannot be put beside them")
        return x, chain[::-1]

    def _copy(self, nodes: list[fx.Node], env: dict[fx.Node, fx.Node], where: str) -> dict[fx.Node, fx.Node]:
        """``nodes`` (per-token ops) run again on the prompts: their patch-stream inputs read through ``env``."""
        env = dict(env)
        for node in nodes:
            if node.target in _SHAPES:
                raise GraphPeftError(f"virtual tokens: {node.target} in the per-token ops of {where} takes the patch "
                                     f"count; prompts cannot go through it")
            for arg in node.all_input_nodes:
                if arg not in env and _tokens_shape(arg, self.batch):
                    raise GraphPeftError(f"virtual tokens: {node.target} in {where} mixes the patch stream with "
                                         f"{arg.target}; prompts cannot go through it")
            args = fx.node.map_arg(node.args, lambda a: env.get(a, a))
            kwargs = fx.node.map_arg(node.kwargs, lambda a: env.get(a, a))
            env[node] = self.rw.call(node.target, *args, **kwargs)
            self.env[node] = env[node]
        return env

    def _linear(self, lin: fx.Node, x: fx.Node) -> fx.Node:
        return self.rw.call(lin.target, x, *lin.args[1:], **lin.kwargs)

    def _to_windows(self, x: fx.Node, size: fx.Node, nw: fx.Node, heads: int, head_dim: int) -> fx.Node:
        """[B, n, C] -> [B*nW, heads, n, head size], image b's prompts in each of image b's windows."""
        rw, n = self.rw, self.n
        x = rw.call(aten.transpose.int, rw.call(aten.view.default, x, [size, n, heads, head_dim]), 1, 2)
        x = rw.call(aten.expand.default, rw.call(aten.unsqueeze.default, x, 1), [size, nw, heads, n, head_dim])
        return rw.call(aten.reshape.default, x, [-1, heads, n, head_dim])


def out_dim(lin: fx.Node) -> int:
    return int(lin.meta["val"].shape[-1])


def _projection(x: fx.Node, where: str, role: str) -> fx.Node:
    """The linear that computes the site's ``role`` operand, through head views and transposes."""
    for _ in range(8):
        if isinstance(x, fx.Node) and x.op == "call_function" and x.target in _LINEAR:
            return x
        if not isinstance(x, fx.Node) or x.op != "call_function" or x.target not in _SHAPES | {
                aten.contiguous.default, aten.clone.default}:
            break
        x = x.args[0]
    raise GraphPeftError(f"virtual tokens: the {role} of {where} is not a linear projection of the windows; "
                         f"prompts cannot be projected the same way")


def _output_projection(node: fx.Node, batch: Any, where: str) -> tuple[fx.Node, fx.Node]:
    """(the linear after the attention op, the [B, L, C] node after it where the windows are put back: the
    last of the moves after the linear, before the op that reads it, the residual add)."""
    x, lin = node, None
    for _ in range(24):
        users = [u for u in x.users if u.users or u.op == "output"]
        if len(users) != 1:
            break
        if lin is not None and users[0].target not in _MOVES:
            if _tokens_shape(x, batch):
                return lin, x
            break
        x = users[0]
        if lin is None and x.target in _LINEAR:
            lin = x
    raise GraphPeftError(f"virtual tokens: the output of {where} does not go through one linear projection back "
                         f"to [batch, tokens, channels]; prompts cannot follow it")


def _downstream_in(start: fx.Node, block: str) -> list[fx.Node]:
    """The live nodes of ``block`` after ``start`` that depend on it, in graph order."""
    found, seen = [], {start}
    node = start.next
    while node.op != "output":
        if (node.op == "call_function" and _inside(module_stack_entry(node)[0], block)
                and any(a in seen for a in node.all_input_nodes) and node.users):
            found.append(node)
            seen.add(node)
        node = node.next
    return found


def _scale(att: AttentionSite) -> Optional[float]:
    """The site's score scale: SDPA's ``scale``, or the scalar multiplying eager scores (None: 1/sqrt(d))."""
    if att.kind == "sdpa":
        return att.node.kwargs.get("scale", att.node.args[6] if len(att.node.args) > 6 else None)
    x = att.scores
    for _ in range(8):
        users = list(x.users)
        if len(users) != 1:
            break
        x = users[0]
        if x.target in (aten.mul.Tensor, aten.mul.Scalar) and isinstance(x.args[1], float):
            return x.args[1]
        if x.target in (aten.div.Tensor, aten.div.Scalar) and isinstance(x.args[1], float):
            return 1.0 / x.args[1]
        if x.target in (aten._softmax.default, aten.softmax.int):
            break
    return None


def _pad_masks(rw: Any, att: AttentionSite, n: int, where: str) -> None:
    """The windows' bias and mask get n zero columns in front (the prompts: no position, never masked)."""
    if att.kind == "sdpa":
        mask = att.node.args[3] if len(att.node.args) > 3 else att.node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node):
            rw.start_before(att.node)
            rw.replace_input(att.node, mask, rw.call(aten.constant_pad_nd.default, mask, [n, 0], 0.0))
        return
    chain, node = [], att.node.args[0]
    while isinstance(node, fx.Node) and node is not att.scores:
        chain.append(node)
        node = node.args[0] if node.args else None
    key_len = att.scores.meta["val"].shape[-1]
    for op in chain:
        for arg in op.all_input_nodes:
            val = arg.meta.get("val")
            if arg in chain or arg is att.scores or not isinstance(val, torch.Tensor) or val.dim() == 0:
                continue
            if op.target is not aten.add.Tensor or val.dtype == torch.bool:
                raise GraphPeftError(f"virtual tokens: in {where}, {op.target} combines the scores with a tensor "
                                     f"that cannot be padded for the prompts' columns")
            if str(val.shape[-1]) == str(key_len):
                rw.start_before(op)
                rw.replace_input(op, arg, rw.call(aten.constant_pad_nd.default, arg, [n, 0], 0.0))


def _four_d(x: Any) -> bool:
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 4


def _tokens_shape(x: Any, batch: Any) -> bool:
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 3 and str(val.shape[0]) == str(batch)


def _last_axis(cat: fx.Node) -> bool:
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    val = cat.meta.get("val")
    return isinstance(val, torch.Tensor) and dim % val.dim() == val.dim() - 1


def _inside(path: str, module: str) -> bool:
    return not module or path == module or path.startswith(module + ".")
