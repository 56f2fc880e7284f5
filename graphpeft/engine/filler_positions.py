"""Filler positions in front of a token sequence: where it enters the graph, what reads positions, what leaves.

A pass that puts n key/value positions in front of every attention site's keys and values (past key values
of length n, with no cache API and no knowledge of the model) first makes the whole graph see a sequence
n positions longer. n filler positions are prepended to the sequence inputs where they enter the graph:

    ids            ->   cat(full((B, n), f), ids)        f: any id but the pad id (padding-derived positions count it)
    attention_mask ->   cat(ones(B, n), attention_mask)
    token_type_ids ->   cat(zeros(B, n), token_type_ids)
    position_ids   ->   cat(zeros(B, n), position_ids + n)

so every position, causal mask and padding mask the model computes covers n+L positions with the real
tokens at n..n+L-1, as with a cache of past length n. Graph outputs on the sequence axis drop the fillers
(out[:, n:]), and an op that picks given positions on the sequence axis (select index 0, BERT's first-token
pooling; a slice with a start) reads them n positions on:

    before:  input_ids ───────────────── (model) ─ logits [B, L, .]         (model) ─ h ─ select(1, 0) ─ pooler
    after:   input_ids ─ cat(fill*n, ·) ─ (model) ─ logits[:, n:]           (model) ─ h ─ select(1, n) ─ pooler

What then replaces the fillers' keys and values at each attention site is the caller's (kv_prepend).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from graphpeft.engine.capture import capture_info
from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.rewriter import Rewriter
from graphpeft.engine.sequence import placeholder

aten = torch.ops.aten
INT_MAX = 9223372036854775807
_MAIN_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds", "input_ids", "inputs_embeds")


@dataclass(frozen=True)
class SequenceEntry:
    """Where the sequence enters the graph: the main input, the inputs on its axis, what reads positions."""

    node: fx.Node                                   # the main input (input_ids, or decoder_input_ids)
    module_path: str = ""
    inputs: tuple[fx.Node, ...] = ()
    filler: Any = 0
    dims: Any = None                                # the caller's resolved sizes
    pooling: tuple[fx.Node, ...] = ()               # select / slice ops on the sequence axis
    outputs: tuple[fx.Node, ...] = ()               # graph outputs laid out on the sequence axis


def extend_entry(rw: Rewriter, gm: fx.GraphModule, entry: SequenceEntry, n: int) -> None:
    """n filler positions in front of every input on the sequence axis; first-token pooling reads the first
    real position; sequence outputs drop the fillers."""
    # V filler positions in front of every input on the sequence axis
    for node in entry.inputs:
        name = str(node.target)
        fill = 1 if "mask" in name else (entry.filler if node is entry.node else 0)
        prepend(rw, node, n, fill, offset=n if name.endswith("position_ids") else 0)
    # first-token pooling reads the first real position; sequence outputs drop the fillers
    for op in entry.pooling:
        rw.start_before(op.next)
        moved = rw.call(op.target, *shifted_args(op, n))
        rw.replace_uses(op, moved)
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    rw.start_before(output)
    for node in entry.outputs:      # contiguous, as the model's own outputs are (losses .view them)
        kept = rw.call(aten.slice.Tensor, node, 1, n, INT_MAX)
        rw.replace_input(output, node, rw.call(aten.clone.default, kept, memory_format=torch.contiguous_format))


def main_input(gm: fx.GraphModule) -> Optional[fx.Node]:
    """The decoder's ids for an encoder-decoder, else input_ids; else the one 2-D integer input."""
    for name in _MAIN_INPUTS:
        node = placeholder(gm, name)
        if node is not None:
            return node
    ids = [n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
           and n.meta["val"].dim() == 2 and not n.meta["val"].is_floating_point() and "mask" not in str(n.target)]
    return ids[0] if len(ids) == 1 else None


def sequence_dim(main: fx.Node, *, who: str) -> Any:
    """The (symbolic) sequence length of the main input; ``who`` (the caller's name) opens the errors."""
    val = main.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        raise GraphPeftError(f"{who} needs the graph's shapes: capture the model with torch.export "
                             "(pass example_inputs when rewriting a model that is not a Hugging Face model)")
    if isinstance(val.shape[1], int):
        raise GraphPeftError(f"{who}: {main.target} was captured with a fixed sequence length "
                             f"({val.shape[1]}); capture with a dynamic sequence dimension "
                             f"(graphpeft.engine.capture's default)")
    return val.shape[1]


def same(a: Any, b: Any) -> bool:
    """Two symbolic sizes that are the same symbol (a plain int is never the dynamic sequence)."""
    return not isinstance(a, int) and not isinstance(b, int) and str(a) == str(b)


def downstream(starts: list[fx.Node]) -> set[fx.Node]:
    """Nodes whose tensor value depends on ``starts`` through tensors (sizes read off a tensor do not count)."""
    seen: set[fx.Node] = set()
    frontier = list(starts)
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            val = user.meta.get("val")
            if isinstance(val, torch.Tensor) or (isinstance(val, (tuple, list)) and val
                                                 and all(isinstance(v, torch.Tensor) for v in val)):
                frontier.append(user)
    return seen


def filler(gm: fx.GraphModule, main: fx.Node) -> Any:
    """A filler value for the main input: any id but the pad id (padding-derived positions then count it)."""
    if main.meta["val"].is_floating_point():
        return 0.0
    config = getattr(capture_info(gm), "hf_config", None)
    pad = getattr(config, "pad_token_id", None) if config is not None else None
    return 1 if pad == 0 else 0


def pooling_ops(gm: fx.GraphModule, reach: set[fx.Node], seq: Any) -> tuple[fx.Node, ...]:
    """select / slice ops on the sequence axis (dim 1) of token-derived tensors that pick given positions.

    A whole-axis slice is left alone (it keeps the fillers, which the outputs then drop).
    """
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (aten.select.int, aten.slice.Tensor):
            continue
        x = node.args[0]
        val = x.meta.get("val") if isinstance(x, fx.Node) else None
        if x not in reach or not isinstance(val, torch.Tensor) or val.dim() < 2 or not same(val.shape[1], seq):
            continue
        dim = node.args[1] if len(node.args) > 1 else 0
        if dim % val.dim() != 1:
            continue
        if node.target is aten.select.int:
            if isinstance(node.args[2], int) and node.args[2] >= 0:
                found.append(node)
            continue
        start = node.args[2] if len(node.args) > 2 else None
        end = node.args[3] if len(node.args) > 3 else None
        start = 0 if start is None else start
        whole = start == 0 and (end is None or isinstance(end, fx.Node) or end >= INT_MAX // 2)
        if isinstance(start, int) and start >= 0 and not whole:
            found.append(node)
    return tuple(found)


def shifted_args(op: fx.Node, n: int) -> tuple:
    """The args of a select / slice on the sequence axis with its positions moved n on."""
    args = list(op.args)
    if op.target is aten.select.int:
        args[2] = args[2] + n
        return tuple(args)
    args += [None] * (4 - len(args))
    args[2] = (args[2] or 0) + n
    if isinstance(args[3], int) and 0 <= args[3] < INT_MAX // 2:
        args[3] = args[3] + n
    return tuple(args)


def sequence_outputs(gm: fx.GraphModule, reach: set[fx.Node], seq: Any) -> tuple[fx.Node, ...]:
    """Graph outputs that depend on the tokens and run along the sequence axis (dim 1)."""
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    found = []
    for node in output.all_input_nodes:
        val = node.meta.get("val")
        if node in reach and isinstance(val, torch.Tensor) and val.dim() >= 2 and same(val.shape[1], seq):
            found.append(node)
    return tuple(found)


def first_computation(gm: fx.GraphModule) -> fx.Node:
    """The first node after the inputs: where graph-wide values (a learned table) are computed once."""
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    return last.next


def prepend(rw: Rewriter, node: fx.Node, n: int, fill: Any, offset: int = 0) -> None:
    """Every reader of input ``node`` reads cat([full((B, n, ...), fill), node + offset], dim=1)."""
    rank = node.meta["val"].dim() if isinstance(node.meta.get("val"), torch.Tensor) else 2
    sizes = [rw.call(aten.sym_size.int, node, 0), n, *(rw.call(aten.sym_size.int, node, d) for d in range(2, rank))]
    pad = rw.call(aten.new_full.default, node, sizes, fill)
    body = rw.call(aten.add.Tensor, node, offset) if offset else node
    joined = rw.call(aten.cat.default, [pad, body], 1)
    rw.replace_uses(node, joined)
