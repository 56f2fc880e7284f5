"""The patch-embedding sequence of a vision transformer, and virtual tokens inserted into it.

A model that reads no token ids but images (ViT's ``pixel_values``) embeds patches with a projection (a
convolution) inside an embeddings module, which returns [B, L, H]: k leading tokens (the class token, a
distillation token) and P patch tokens, position embeddings added. Visual Prompt Tuning (Jia et al., 2022)
inserts n learned tokens right after the leading tokens, at that module's output:

    before:  pixel_values ─ conv ─ (embeddings) ─ h [B, k+P, H] ─ (encoder) ─ h[:, 0] ─ head
    after:   pixel_values ─ conv ─ (embeddings) ─ h ─┬ h[:, :k] ─┐
                         prompts [n, H] ─ expand(B) ─┼───────────┼ cat ─ [B, k+n+P, H] ─ (encoder) ─ h[:, 0] ─ head
                                                     └ h[:, k:] ─┘

The prompts get no position embedding (as in VPT) and the head still reads position 0. An image model is
captured with a fixed sequence length (the image size fixes it), so the graph after the insertion spells
L = k+P as a constant in its views, reshapes, expands and aranges (the attention mask); every such constant
on the sequence axis of a node of the backbone (the embeddings module's parent) becomes L+n.

The site is found from the graph alone: the first convolution that reads a floating-point graph input; its
outermost enclosing module that holds no attention site is the embeddings module, whose one output is h.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.match import Site, attention_sites, find_sites, module_stack_entry
from graphpeft.engine.window_sequence import insert_beside_windows, windowed_sites

aten = torch.ops.aten
_INT_MAX = 9223372036854775807
# ops whose int list argument is an output shape, and where that argument sits
_SHAPE_ARG = {aten.view.default: 1, aten.reshape.default: 1, aten._unsafe_view.default: 1, aten.expand.default: 1,
              aten.new_zeros.default: 1, aten.new_ones.default: 1, aten.new_empty.default: 1, aten.new_full.default: 1,
              aten.zeros.default: 0, aten.ones.default: 0, aten.empty.memory_format: 0, aten.full.default: 0}
_ARANGE = {aten.arange.default: 0, aten.arange.start: 1, aten.arange.start_step: 1}


@dataclass(frozen=True)
class PatchSequence:
    """The output of a vision model's embeddings module: ``leading`` tokens, then the patches."""

    site: Site              # the patch projection (a convolution)
    output: fx.Node         # the embeddings module's output [B, L, H]
    module_path: str        # the embeddings module
    length: int             # L, as captured
    leading: int            # tokens before the patches (the class token)
    dim: int                # H
    ids: Any = None         # no token ids
    vocab_size: Optional[int] = None
    windowed: bool = False  # attention within windows (Swin): prompts go beside them (graphpeft.engine.window_sequence)

    @property
    def node(self) -> fx.Node:
        return self.site.node


def patch_sequence(gm: fx.GraphModule) -> Optional[PatchSequence]:
    """The patch-embedding sequence of ``gm``, or None when no convolution reads a floating-point input."""
    inputs = {n for n in gm.graph.nodes if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)
              and n.meta["val"].is_floating_point() and n.meta["val"].dim() >= 3}
    conv = next((s for s in find_sites(gm) if s.kind == "conv" and _reads(s.node, inputs)), None)
    if conv is None:
        return None
    where = conv.module_path
    with_attention = {module_stack_entry(a.node)[0] for a in attention_sites(gm)}
    module, parts = None, where.split(".")
    for i in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:i])
        if any(_inside(p, candidate) for p in with_attention):
            break
        module = candidate
    if module is None:
        raise GraphPeftError(f"the patch projection {where} has no enclosing embeddings module without attention; "
                             f"virtual tokens need the patch-embedding sequence as one module's output")
    outputs = [n for n in gm.graph.nodes if n.op == "call_function" and _inside(module_stack_entry(n)[0], module)
               and any(not _inside(module_stack_entry(u)[0], module) or u.op == "output" for u in n.users)]
    val = outputs[0].meta.get("val") if len(outputs) == 1 else None
    if not isinstance(val, torch.Tensor) or val.dim() != 3 or not isinstance(val.shape[1], int):
        raise GraphPeftError(f"the embeddings module {module} does not return one [batch, sequence, hidden] tensor "
                             f"of fixed length; virtual tokens cannot be inserted into its sequence")
    patches = math.prod(int(d) for d in conv.node.meta["val"].shape[2:])
    length = int(val.shape[1])
    if length < patches:
        raise GraphPeftError(f"the embeddings module {module} returns {length} positions for {patches} patches; "
                             f"virtual tokens need the patch tokens in its output")
    windowed = bool(windowed_sites(gm, val.shape[0]))
    return PatchSequence(conv, outputs[0], module, length, length - patches, int(val.shape[2]), windowed=windowed)


def insert_after_leading(rw: Any, seq: PatchSequence, prompts: fx.Node, n: int, batched: bool = False) -> fx.Node:
    """Every reader of the embeddings' output reads cat(h[:, :k], prompts, h[:, k:]); returns the cat node.

    ``prompts`` is [n, H] (the same for every image) or [B, n, H] when ``batched``; then the backbone's
    constant sequence length L becomes L+n.
    """
    if seq.windowed:
        return insert_beside_windows(rw, seq.output, prompts, n, batched)
    out, k = seq.output, seq.leading
    _lengthen(rw.gm, seq, n)
    rw.start_before(out.next)
    prompts = rw.call(aten.type_as.default, prompts, out)
    if not batched:
        batch = rw.call(aten.sym_size.int, out, 0)
        prompts = rw.call(aten.expand.default, rw.call(aten.unsqueeze.default, prompts, 0), [batch, -1, -1])
    parts = [prompts, rw.call(aten.slice.Tensor, out, 1, k, _INT_MAX)]
    if k:
        parts.insert(0, rw.call(aten.slice.Tensor, out, 1, 0, k))
    joined = rw.call(aten.cat.default, parts, 1)
    rw.replace_uses(out, joined)
    return joined


def _lengthen(gm: fx.GraphModule, seq: PatchSequence, n: int) -> int:
    """Constants L on the sequence axis of shape-making ops after the embeddings, in the backbone, become L+n."""
    backbone = seq.module_path.rpartition(".")[0]
    length, count, after = seq.length, 0, False
    for node in gm.graph.nodes:
        if node is seq.output:
            after = True
            continue
        if not after or node.op != "call_function" or not _inside(module_stack_entry(node)[0], backbone):
            continue
        if node.target in _SHAPE_ARG:
            i = _SHAPE_ARG[node.target]
            shape = node.args[i] if len(node.args) > i else None
            if isinstance(shape, (list, tuple)) and length in shape:
                new = [length + n if s == length else s for s in shape]
                node.update_arg(i, new)
                count += 1
        elif node.target in _ARANGE:
            i = _ARANGE[node.target]
            if len(node.args) > i and node.args[i] == length:
                node.update_arg(i, length + n)
                count += 1
        elif node.target is aten.slice.Tensor and len(node.args) > 3 and node.args[3] == length:
            node.update_arg(3, length + n)
            count += 1
    return count


def _inside(path: str, module: str) -> bool:
    return not module or path == module or path.startswith(module + ".")


def _reads(node: fx.Node, inputs: set[fx.Node], hops: int = 4) -> bool:
    x = node.args[0] if node.args else None
    for _ in range(hops):
        if not isinstance(x, fx.Node):
            return False
        if x in inputs:
            return True
        x = x.args[0] if x.args else None
    return False
