"""The frame sequence of a raw-audio transformer encoder, and virtual tokens inserted into it.

A speech encoder that reads a waveform (wav2vec2's and HuBERT's ``input_values`` [B, T]) embeds it with
a stack of strided convolutions, projects the F frames to the hidden size H, adds a convolutional
positional embedding (a grouped convolution over the frame axis), and runs the transformer layers
over [B, F, H]. n virtual tokens (learned vectors a rule supplies) go in front of the frames where they
enter the first transformer layer, and come out where the frames leave the last layer:

    before:  input_values ─ convs ─ projection ─ (+ pos_conv) [─ norm ─ dropout] ─ h [B, F, H] ─ layers ─ y ─ head
             mask [B, 1, F, F] ───────────────────────────────────────────────────────────────┘

    after:   input_values ─ convs ─ projection ─ (+ pos_conv) [─ norm ─ dropout] ─ h ─┐
                                  prompts [n, H] ─ type_as ─ expand(B) ─────────────── cat ─ layers ─ y[:, n:] ─ head
             mask ─ pad(keys: n "attend" columns in front; queries: n copies of row 0) ─┘

Semantics (PEFT refuses these models, so the reference is the mathematics; see the tests):

- The virtual tokens ("prompts" below) enter after the positional embedding is added, so every real
  frame's positional term is the one the base model computes and the prompts get none, as in Visual
  Prompt Tuning. Before it, the positional convolution (kernel 128 in wav2vec2-base) would mix the prompts
  into the positional terms of the first frames and give the prompts positions of their own. In the
  post-norm layout (wav2vec2-base) the encoder's layer norm and dropout also come before the insertion
  point: the prompts enter the first layer as they are.
- Every layer attends over n + F positions. The attention mask (the one the encoder builds from the
  frame padding, or the all-true one without an ``attention_mask``) gets n columns in front that attend
  (True, or 0.0 for an additive mask), so every frame sees the prompts; the prompts' own query rows copy
  the first row, which in the encoder's bidirectional mask is the key-padding pattern, so a prompt attends
  to the prompts and the valid frames and never to padding.
- Every tensor the layers hand out of the encoder (the last hidden state; intermediate hidden states a
  weighted layer sum reads) is cut back to the F real frames. So the head reads exactly the real
  frames: mean pooling (masked or not) averages over them, not over the prompts, as the class token
  stays what a ViT head reads (counting the prompts would mix n positions that are not audio into every
  clip's average, with a weight n / (n + F) that depends on the clip's length); a CTC head's per-frame
  logits keep F frames and align with the input lengths the model computes, so its CTC loss applies to
  them unchanged. ``last_hidden_state`` of a bare encoder has F frames too.

The site is found from the graph alone: the attention sites' layers (the stack entries where their
module paths part, or the innermost numbered module with a single layer), the one [B, F, H] tensor the
first layer reads from outside, and the span: the nodes inside the layers' parent module from the first
layer's first node to the last layer's last node. The frame count F is symbolic in a graph captured with
a dynamic audio length (graphpeft's default): a node of the span that reads the F symbol from outside
(a view's [B, F, heads, d]) reads F + n instead. With a fixed length F the span's shape constants equal
to F are lengthened, as in ``graphpeft.engine.patch_sequence``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.match import Site, attention_sites, find_sites, is_stamped, module_stack_entry
from graphpeft.engine.patch_sequence import _ARANGE, _INT_MAX, _SHAPE_ARG, _inside, _reads

aten = torch.ops.aten


@dataclass(frozen=True)
class FrameSequence:
    """The frames entering an audio encoder's first transformer layer: ``entry`` [B, F, H]."""

    site: Site              # a weight op of the first layer (for the device; no vocabulary)
    entry: fx.Node          # the hidden state the first layer reads
    module_path: str        # the layers' parent module (the encoder)
    span: tuple             # the encoder's nodes from the first layer's first node to the last layer's last
    length: Any             # F: an int, or the SymInt of a dynamic capture
    dim: int                # H
    ids: Any = None         # no token ids
    vocab_size: Optional[int] = None

    @property
    def node(self) -> fx.Node:
        return self.entry


def frame_sequence(gm: fx.GraphModule) -> Optional[FrameSequence]:
    """The frame sequence of ``gm``, or None when no convolution reads a floating-point graph input or no
    attention follows it."""
    inputs = {n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
              and n.meta["val"].is_floating_point()}
    sites = find_sites(gm)
    if not any(s.kind == "conv" and _reads(s.node, inputs) for s in sites):
        return None
    layers = _layers(gm)
    if not layers:
        return None
    encoder = layers[0].rpartition(".")[0]
    while encoder and not _is_stack_module(gm, encoder):
        encoder = encoder.rpartition(".")[0]
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    first = [n for n in gm.graph.nodes if n.op == "call_function" and _inside(module_stack_entry(n)[0], layers[0])]
    last = [n for n in gm.graph.nodes if n.op == "call_function" and _inside(module_stack_entry(n)[0], layers[-1])]
    begin, end = order[first[0]], order[last[-1]]
    span = tuple(n for n in gm.graph.nodes if begin <= order[n] <= end and n.op == "call_function"
                 and not is_stamped(n) and _inside(module_stack_entry(n)[0], encoder))
    members = set(span)
    entries = {a for n in first for a in n.all_input_nodes if a not in members and _is_frames(a)}
    if len(entries) != 1:
        raise GraphPeftError(f"the first transformer layer {layers[0]} reads {len(entries)} [batch, frames, hidden] "
                             f"tensors from outside; virtual tokens need the one frame sequence it reads")
    entry = next(iter(entries))
    val = entry.meta["val"]
    site = next((s for s in sites if _inside(s.module_path, layers[0]) and s.weight is not None), None)
    if site is None:
        raise GraphPeftError(f"the transformer layer {layers[0]} has no weight op; virtual tokens need one to place "
                             f"their parameters")
    return FrameSequence(site, entry, encoder, span, val.shape[1], int(val.shape[2]))


def insert_frames(rw: Any, seq: FrameSequence, prompts: fx.Node, n: int, batched: bool = False) -> fx.Node:
    """The layers read cat(prompts, h) and their masks padded for n more positions; what leaves them is cut
    back to the real frames. ``prompts`` is [n, H] or [B, n, H] when ``batched``; returns the cat node."""
    h, span = seq.entry, seq.span
    members = set(span)
    prompts = rw.call(aten.type_as.default, prompts, h)         # after h and the prompts (the rule's cursor)
    if not batched:
        batch = rw.call(aten.sym_size.int, h, 0)
        prompts = rw.call(aten.expand.default, rw.call(aten.unsqueeze.default, prompts, 0), [batch, -1, -1])
    joined = rw.call(aten.cat.default, [prompts, h], 1)
    masks = {a for node in span for a in node.all_input_nodes
             if a not in members and a is not h and a.op != "get_attr" and _has_frame_dim(a, seq.length)}
    padded = {mask: _pad_mask(rw, mask, seq.length, n) for mask in sorted(masks, key=lambda m: m.name)}
    for node in span:
        node.replace_input_with(h, joined)
        for mask, new in padded.items():
            node.replace_input_with(mask, new)
    _lengthen(span, seq.length, _longer_length(rw, seq, n), members)
    _cut_outputs(rw, seq, n, members)
    return joined


# -- helpers ----------------------------------------------------------------------------------------

def _layers(gm: fx.GraphModule) -> list[str]:
    """The transformer layers (module paths, in order) that hold the attention sites."""
    stacks = []
    for site in attention_sites(gm):
        paths = [str(p) for p, _ in (site.node.meta.get("nn_module_stack") or {}).values()]
        if paths and paths not in stacks:
            stacks.append(paths)
    if not stacks:
        return []
    if len(stacks) == 1:     # one layer: the innermost numbered module around the attention
        numbered = [p for p in stacks[0] if p.rpartition(".")[2].isdigit()]
        return numbered[-1:] if numbered else stacks[0][-1:]
    depth = 0
    while all(len(s) > depth for s in stacks) and len({s[depth] for s in stacks}) == 1:
        depth += 1
    layers: list[str] = []
    for s in stacks:
        if len(s) > depth and s[depth] not in layers:
            layers.append(s[depth])
    return layers


def _is_stack_module(gm: fx.GraphModule, path: str) -> bool:
    """Whether some node's module stack names ``path`` (a ModuleList such as ``encoder.layers`` never does)."""
    return any(path in {str(p) for p, _ in (n.meta.get("nn_module_stack") or {}).values()} for n in gm.graph.nodes)


def _is_frames(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 3 and val.is_floating_point()


def _same(size: Any, length: Any) -> bool:
    if isinstance(length, int):
        return isinstance(size, int) and size == length
    return isinstance(size, torch.SymInt) and str(size) == str(length)


def _has_frame_dim(node: fx.Node, length: Any) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and any(_same(s, length) for s in val.shape[1:])


def _longer_length(rw: Any, seq: FrameSequence, n: int) -> Any:
    """F + n: an int, or a node computing it from the span's own reading of the F symbol."""
    if isinstance(seq.length, int):
        return seq.length + n
    members = set(seq.span)
    symbols = [a for node in seq.span for a in node.all_input_nodes
               if a not in members and _same(a.meta.get("val"), seq.length)]
    if not symbols:
        return None
    rw.start_before(symbols[0].next)
    return rw.call(operator.add, symbols[0], n)


def _pad_mask(rw: Any, mask: fx.Node, length: Any, n: int) -> fx.Node:
    """n positions in front of every frame axis: on the last (keys) ones that attend (True / 0.0 / 1), on the
    others (queries) copies of the first row."""
    val = mask.meta["val"]
    dims = [d for d in range(1, val.dim()) if _same(val.shape[d], length)]
    rw.start_before(mask.next)
    out = mask
    for d in dims:
        if d == val.dim() - 1:
            fill = True if val.dtype == torch.bool else (0.0 if val.is_floating_point() else 1)
            out = rw.call(aten.constant_pad_nd.default, out, [n, 0], fill)
        else:
            row = rw.call(aten.slice.Tensor, out, d, 0, 1)
            rows = rw.call(aten.repeat.default, row, [n if i == d else 1 for i in range(val.dim())])
            out = rw.call(aten.cat.default, [rows, out], d)
    return out


def _lengthen(span: tuple, length: Any, longer: Any, members: set) -> None:
    """In the span, F becomes F + n: the F symbol read from outside, or (fixed length) shape constants."""
    if longer is None:
        return
    if not isinstance(length, int):
        for node in span:
            for arg in node.all_input_nodes:
                if arg is not longer and arg not in members and _same(arg.meta.get("val"), length):
                    node.replace_input_with(arg, longer)
        return
    for node in span:
        if node.target in _SHAPE_ARG:
            i = _SHAPE_ARG[node.target]
            shape = node.args[i] if len(node.args) > i else None
            if isinstance(shape, (list, tuple)) and length in shape:
                node.update_arg(i, [longer if s == length else s for s in shape])
        elif node.target in _ARANGE:
            i = _ARANGE[node.target]
            if len(node.args) > i and node.args[i] == length:
                node.update_arg(i, longer)
        elif node.target is aten.slice.Tensor and len(node.args) > 3 and node.args[3] == length:
            node.update_arg(3, longer)


def _cut_outputs(rw: Any, seq: FrameSequence, n: int, members: set) -> None:
    """Every tensor of the span read after it loses the n prompt positions on its frame axes."""
    for node in seq.span:
        outside = [u for u in node.users if u not in members and not is_stamped(u)]
        val = node.meta.get("val")
        if not outside or not isinstance(val, torch.Tensor):
            continue
        dims = [d for d in range(1, val.dim()) if _same(val.shape[d], seq.length)]
        if val.dim() == 3:         # [B, F, H]: only the frame axis (H may equal a fixed F)
            dims = [1] if dims and dims[0] == 1 else []
        if not dims:
            continue
        rw.start_before(node.next)
        cut = node
        for d in dims:
            cut = rw.call(aten.slice.Tensor, cut, d, n, _INT_MAX)
        for user in outside:
            user.replace_input_with(node, cut)
